//! Releasing the flows of a dead uplink: the LAN clients' TCP connections on it are reset, so
//! they reconnect (and get a live uplink) instead of hanging until their own timeouts, and the
//! uplink's generation moves on, so its other flows get a live uplink with their next packet.
//!
//! When that happens is decided in one place, `health::release`, which the proxy follows too.
//!
//! The data plane saw both directions of every flow, so the flow table holds the sequence
//! number the client expects next from the server (`remote_seq_next`). An RST from the server's
//! address and port with exactly that sequence number is accepted by the client (RFC 5961
//! accepts an exact match without a challenge), also when the client was only receiving and
//! sends nothing that could trigger a reset. It is sent from user space through a raw socket:
//! the packet leaves by the LAN route to the client like any reply.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use aya::maps::HashMap;
use balancer_common::{
    flow::{FLOW_FLAG_RESET, FlowEntry, FlowKey, PROTOCOL_TCP},
    maps as names,
    uplink::UplinkInfo,
};
use socket2::{Domain, Protocol, Socket, Type};

use super::{Dataplane, DataplaneError, maps::typed};
use crate::packet::internet_checksum;

impl Dataplane {
    /// Gives up uplink `id`'s flows (`health::release` decides when): resets their TCP clients
    /// and moves the uplink's generation on. Returns how many clients were reset.
    pub fn release(&mut self, id: u32) -> Result<usize, DataplaneError> {
        let reset = self.reset_flows_of(id)?;
        self.release_flows_of(id)?;
        Ok(reset)
    }

    /// Moves uplink `id`'s generation on: every flow still pinned to it is stale for the
    /// programs, and its next packet (a SYN or datagram) gets a live uplink.
    fn release_flows_of(&mut self, id: u32) -> Result<(), DataplaneError> {
        let mut uplinks: aya::maps::Array<_, UplinkInfo> = typed(&mut self.ebpf, names::UPLINKS)?;
        let mut slot = uplinks.get(&id, 0).map_err(|source| DataplaneError::Map {
            map: names::UPLINKS,
            source: Box::new(source),
        })?;
        slot.generation = slot.generation.wrapping_add(1);
        uplinks
            .set(id, slot, 0)
            .map_err(|source| DataplaneError::WriteMap {
                map: names::UPLINKS,
                source: Box::new(source),
            })
    }

    /// Sends an RST to the client of every TCP flow on uplink `id` and removes those flows.
    /// Returns how many clients were reset.
    pub fn reset_flows_of(&mut self, id: u32) -> Result<usize, DataplaneError> {
        let stuck: Vec<(FlowKey, FlowEntry)> = {
            let flows: HashMap<_, FlowKey, FlowEntry> = typed(&mut self.ebpf, names::FLOWS)?;
            flows
                .iter()
                .filter_map(Result::ok)
                .filter(|(key, entry)| {
                    key.protocol == PROTOCOL_TCP
                        && u32::from(entry.uplink_id) == id
                        && entry.flags & FLOW_FLAG_RESET == 0
                })
                .collect()
        };
        if stuck.is_empty() {
            return Ok(0);
        }
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
        .map_err(|source| DataplaneError::Reset { source })?;
        let mut sent = 0;
        for (key, entry) in &stuck {
            let packet = rst_to_client(key, entry);
            let client = Ipv4Addr::from(key.client_addr.to_ne_bytes());
            let destination: socket2::SockAddr =
                SocketAddr::from(SocketAddrV4::new(client, 0)).into();
            match socket.send_to(&packet, &destination) {
                Ok(_) => sent += 1,
                Err(error) => tracing::warn!(%client, %error, "sending a reset to a LAN client"),
            }
        }
        for (key, entry) in &stuck {
            self.remove_flow(key, entry)?;
        }
        Ok(sent)
    }
}

/// An IPv4 + TCP RST|ACK from the flow's server to its client, with the sequence number the
/// client expects and acknowledging what the client sent.
pub(super) fn rst_to_client(key: &FlowKey, entry: &FlowEntry) -> Vec<u8> {
    let source = key.remote_addr.to_ne_bytes();
    let destination = key.client_addr.to_ne_bytes();
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&key.remote_port.to_ne_bytes());
    tcp[2..4].copy_from_slice(&key.client_port.to_ne_bytes());
    tcp[4..8].copy_from_slice(&entry.remote_seq_next.to_be_bytes());
    tcp[8..12].copy_from_slice(&entry.client_seq_next.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x14; // RST | ACK
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&source);
    pseudo.extend_from_slice(&destination);
    pseudo.extend_from_slice(&[0, PROTOCOL_TCP, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let checksum = internet_checksum(&pseudo);
    tcp[16..18].copy_from_slice(&checksum.to_be_bytes());

    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = PROTOCOL_TCP;
    ip[12..16].copy_from_slice(&source);
    ip[16..20].copy_from_slice(&destination);
    let checksum = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    let mut packet = ip.to_vec();
    packet.extend_from_slice(&tcp);
    packet
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reset_carries_the_expected_sequence_number_and_valid_checksums() {
        let key = FlowKey {
            client_addr: u32::from_ne_bytes([198, 18, 0, 11]),
            remote_addr: u32::from_ne_bytes([198, 18, 9, 1]),
            client_port: 40_000u16.to_be(),
            remote_port: 9001u16.to_be(),
            protocol: PROTOCOL_TCP,
            _pad: [0; 3],
        };
        let entry = FlowEntry {
            remote_seq_next: 0x1234_5678,
            client_seq_next: 0x0abc_def0,
            ..FlowEntry::default()
        };
        let packet = rst_to_client(&key, &entry);
        assert_eq!(packet.len(), 40);
        assert_eq!(internet_checksum(&packet[..20]), 0, "IPv4 header checksum");
        assert_eq!(&packet[12..16], &[198, 18, 9, 1], "from the server");
        assert_eq!(&packet[16..20], &[198, 18, 0, 11], "to the client");
        let tcp = &packet[20..];
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 9001);
        assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 40_000);
        assert_eq!(
            u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            0x1234_5678,
            "the client's RCV.NXT"
        );
        assert_eq!(tcp[13], 0x14);
        let mut pseudo = packet[12..20].to_vec();
        pseudo.extend_from_slice(&[0, PROTOCOL_TCP, 0, 20]);
        pseudo.extend_from_slice(tcp);
        assert_eq!(internet_checksum(&pseudo), 0, "TCP checksum");
    }
}
