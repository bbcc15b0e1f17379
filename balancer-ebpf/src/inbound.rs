//! Connections that arrive on an uplink (port forwards by the host's DNAT, the gateway's own
//! services): uplink ingress marks every untranslated packet with its uplink's mark (so strict
//! rp_filter and the `fwmark` rules agree with the way it came) and records the remote end of
//! each new one in `INBOUND` (a TCP SYN, or UDP to a port the host forwards); LAN ingress marks a LAN host's reply to such a connection for the
//! same uplink without giving it a flow or a NAT port, and conntrack translates it back.

use aya_ebpf::programs::TcContext;
use balancer_common::{
    flow::{InboundEntry, InboundKey, PROTOCOL_TCP, PROTOCOL_UDP},
    policy::{TCP_ACK, TCP_SYN, inbound_timeout_ns, starts_inbound},
    uplink::Settings,
};

use crate::{
    lan_ingress::set_mark,
    maps::{FORWARDED_UDP_PORTS, INBOUND, UPLINK_BY_IFINDEX, UPLINKS},
    parse::Packet,
};

/// At uplink ingress, for a packet no flow of ours answers: mark it for the uplink it arrived
/// on and, if it starts a connection to the uplink's address, remember the remote end.
#[inline(always)]
pub fn arrived(ctx: &TcContext, packet: &Packet) {
    // SAFETY: `skb` is the context pointer the kernel passed in; `ifindex` is readable.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is a plain u32, copied out at once.
    let Some(&id) = (unsafe { UPLINK_BY_IFINDEX.get(ifindex) }) else {
        return;
    };
    let Some(uplink) = UPLINKS.get(id) else {
        return;
    };
    if uplink.source_addr == 0 {
        return;
    }
    set_mark(ctx, uplink.mark);
    // SAFETY: the value is a plain u8 and only its presence is used.
    let udp_forwarded = packet.ip.protocol == PROTOCOL_UDP
        && unsafe { FORWARDED_UDP_PORTS.get(&packet.dst_port) }.is_some();
    let starts = starts_inbound(packet.ip.protocol, packet.tcp_flags, udp_forwarded);
    if !starts || packet.ip.dst != uplink.source_addr {
        return;
    }
    let key = InboundKey {
        remote_addr: packet.ip.src,
        remote_port: packet.src_port,
        protocol: packet.ip.protocol,
        _pad: 0,
    };
    let entry = InboundEntry {
        last_seen_ns: crate::clock::now_ns(),
        mark: uplink.mark,
        uplink_id: id as u8,
        _pad: [0; 3],
    };
    // A full map forgets its least recently used entry; nothing useful to do on failure.
    let _ = INBOUND.insert(&key, &entry, 0);
}

/// At LAN ingress, for a TCP or UDP packet of no flow: if it answers a live inbound connection
/// (its destination is that connection's remote end), the uplink mark to steer it with.
#[inline(always)]
pub fn reply_mark(packet: &Packet, settings: &Settings, now: u64) -> Option<u32> {
    // A SYN opens a connection of the LAN host's own; only answers belong to an inbound one.
    if packet.ip.protocol == PROTOCOL_TCP && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return None;
    }
    let key = InboundKey {
        remote_addr: packet.ip.dst,
        remote_port: packet.dst_port,
        protocol: packet.ip.protocol,
        _pad: 0,
    };
    let entry = INBOUND.get_ptr_mut(&key)?;
    // SAFETY: a pointer into the map value, valid for this run; fields are independent.
    let entry = unsafe { &mut *entry };
    if now.saturating_sub(entry.last_seen_ns) > inbound_timeout_ns(packet.ip.protocol, settings) {
        return None;
    }
    if entry.last_seen_ns != now {
        entry.last_seen_ns = now;
    }
    Some(entry.mark)
}
