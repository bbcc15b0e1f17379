//! Flows an uplink can no longer carry because their address is gone: the uplink was renumbered
//! (a new DHCP lease, an LTE reconnect) or removed from the config. Replies to the old address
//! never come back, so such flows are released at once: TCP clients get a reset (as for a dead
//! uplink, see `reset`) and both halves of every stale flow are removed, so nothing of the old
//! address stays in the NAT maps.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use aya::maps::HashMap;
use balancer_common::{
    flow::{FLOW_STATE_CLOSED, FlowEntry, FlowKey, PROTOCOL_TCP},
    maps as names,
};
use socket2::{Domain, Protocol, Socket, Type};

use super::{
    Dataplane, DataplaneError,
    desired::{DataplaneDesired, UplinkSlot},
    maps::typed,
    reset::rst_to_client,
};

/// Each configured uplink's current address (unspecified while it has none).
pub(super) fn addresses(slots: &[UplinkSlot]) -> BTreeMap<u32, Ipv4Addr> {
    slots.iter().map(|slot| (slot.id, slot.source)).collect()
}

/// Whether a flow on uplink `uplink_id` translated to `flow_addr` has lost its address: the
/// uplink is no longer configured, or it has a new address. An uplink with no address now
/// (interface gone, lease lost) keeps its flows: the same address may come back.
pub(super) fn is_stale(
    current: &BTreeMap<u32, Ipv4Addr>,
    uplink_id: u32,
    flow_addr: Ipv4Addr,
) -> bool {
    match current.get(&uplink_id) {
        None => true,
        Some(address) => !address.is_unspecified() && *address != flow_addr,
    }
}

impl Dataplane {
    /// Resets and removes every flow whose uplink address is gone. Returns how many it removed.
    pub(super) fn release_stale_flows(
        &mut self,
        desired: &DataplaneDesired,
    ) -> Result<usize, DataplaneError> {
        let current = addresses(&desired.uplinks);
        let stale: Vec<(FlowKey, FlowEntry)> = {
            let flows: HashMap<_, FlowKey, FlowEntry> = typed(&mut self.ebpf, names::FLOWS)?;
            flows
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, entry)| {
                    let address = Ipv4Addr::from(entry.uplink_addr.to_ne_bytes());
                    is_stale(&current, u32::from(entry.uplink_id), address)
                })
                .collect()
        };
        if stale.is_empty() {
            return Ok(0);
        }
        let resets: Vec<&(FlowKey, FlowEntry)> = stale
            .iter()
            .filter(|(key, entry)| key.protocol == PROTOCOL_TCP && entry.state != FLOW_STATE_CLOSED)
            .collect();
        if !resets.is_empty() {
            let socket = Socket::new(
                Domain::IPV4,
                Type::RAW,
                Some(Protocol::from(libc::IPPROTO_RAW)),
            )
            .map_err(|source| DataplaneError::Reset { source })?;
            for (key, entry) in &resets {
                let client = Ipv4Addr::from(key.client_addr.to_ne_bytes());
                let destination: socket2::SockAddr =
                    SocketAddr::from(SocketAddrV4::new(client, 0)).into();
                if let Err(error) = socket.send_to(&rst_to_client(key, entry), &destination) {
                    tracing::warn!(%client, %error, "resetting a LAN client's connection on an old address");
                }
            }
        }
        let mut removed = 0;
        for (key, entry) in &stale {
            if self.remove_flow(key, entry)? {
                removed += 1;
            }
        }
        tracing::info!(
            removed,
            reset = resets.len(),
            "released the flows of uplink addresses that are gone"
        );
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_are_stale_only_when_their_address_is_replaced_or_the_uplink_removed() {
        let old = Ipv4Addr::new(198, 18, 1, 2);
        let new = Ipv4Addr::new(198, 18, 1, 7);
        let current: BTreeMap<u32, Ipv4Addr> =
            [(1, new), (2, Ipv4Addr::UNSPECIFIED)].into_iter().collect();
        assert!(is_stale(&current, 1, old), "renumbered");
        assert!(!is_stale(&current, 1, new), "already on the new address");
        assert!(
            !is_stale(&current, 2, old),
            "no address now: it may come back"
        );
        assert!(is_stale(&current, 3, old), "uplink removed from the config");
    }
}
