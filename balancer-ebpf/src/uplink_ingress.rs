//! Uplink ingress: count, then reverse-NAT replies to translated flows (and later fragments of
//! their datagrams, and ICMP errors about their packets) and mark them with the flow's mark, so they pass rp_filter (`src_valid_mark`) and the `fwmark` rules like the
//! flow's outgoing packets. Everything else (replies to the gateway's own sockets, whose ports
//! lie outside the translated range, and connections from outside) goes to the stack with its
//! bytes untouched, marked for this uplink (`inbound`, which also records new inbound
//! connections so the LAN side's replies leave the way they came).

use aya_ebpf::programs::TcContext;
use balancer_common::{
    flow::{
        FLOW_FLAG_ANSWERED, FlowKey, PROTOCOL_ICMP, PROTOCOL_TCP, REVERSE_FLAG_ANSWERED,
        REVERSE_FLAG_UNSOLICITED, ReverseKey,
    },
    policy::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, flow_after_packet, rst_in_window, scaled_window},
    stats::{
        PASS_ICMP_OTHER, PASS_NOT_TRANSLATED, UPLINK_RX_BYTES, UPLINK_RX_PACKETS,
        UPLINK_RX_UNSOLICITED, UPLINK_TCP_ANSWERED,
    },
};

use crate::{
    clock, filtering, flow, fragments,
    headers::ICMP_ECHO_REPLY,
    icmp_error, inbound,
    lan_ingress::set_mark,
    maps::{NAT_REVERSE, UPLINK_BY_IFINDEX, bump_uplink},
    nat::{Side, rewrite},
    own_socket,
    parse::{Packet, parse_ipv4, parse_l4},
    tcp_window,
};

/// `translate`'s verdict for a packet of one of the gateway's own connections: passed
/// untouched like any untranslated packet, but an answer for health, not unsolicited.
const OWN_REPLY: u32 = u32::MAX;

/// `L2`: the uplink's link-layer header length (`headers::ETH_HDR_LEN` or `RAW_IP_HDR_LEN`).
#[inline(always)]
pub fn try_uplink_ingress<const L2: usize>(ctx: &TcContext) -> Result<(), u32> {
    let result = translate::<L2>(ctx);
    // A reply of a flow is counted on the flow's uplink, which is the interface it arrived on:
    // that saves the hot path a hash lookup. Everything else finds its uplink by interface.
    if let Ok(Some(id)) = result {
        bump_uplink(u32::from(id), UPLINK_RX_PACKETS, 1);
        bump_uplink(u32::from(id), UPLINK_RX_BYTES, u64::from(ctx.len()));
        return Ok(());
    }
    // SAFETY: `skb` is the context pointer the kernel passed in; `ifindex` is readable.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is a plain u32, copied out at once.
    if let Some(id) = unsafe { UPLINK_BY_IFINDEX.get(ifindex) }.copied() {
        bump_uplink(id, UPLINK_RX_PACKETS, 1);
        bump_uplink(id, UPLINK_RX_BYTES, u64::from(ctx.len()));
        if result != Err(OWN_REPLY) {
            bump_uplink(id, UPLINK_RX_UNSOLICITED, 1);
        }
    }
    match result {
        Err(OWN_REPLY) => Err(PASS_NOT_TRANSLATED),
        other => other.map(|_| ()),
    }
}

/// Reverse-translates the packet if it belongs to a flow; `Ok(Some(uplink id))` for a reply
/// of a flow, `Ok(None)` for the other packets it translated, `Err(OWN_REPLY)` for a packet of
/// one of the gateway's own connections (passed untouched).
#[inline(always)]
fn translate<const L2: usize>(ctx: &TcContext) -> Result<Option<u8>, u32> {
    let ip = parse_ipv4::<L2>(ctx)?;
    if ip.later_fragment {
        return fragments::translate(ctx, &ip, Side::Destination, 0).map(|()| None);
    }
    let packet = parse_l4(ctx, ip)?;
    let protocol = packet.ip.protocol;
    if protocol == PROTOCOL_ICMP && icmp_error::is_error(packet.icmp_type) {
        let (quoted, key, mark) = icmp_error::remote_flow(ctx, &packet.ip)?;
        icmp_error::rewrite(
            ctx,
            &packet.ip,
            &quoted,
            Side::Destination,
            key.client_addr,
            key.client_port,
        )?;
        set_mark(ctx, mark);
        return Ok(None);
    }
    if protocol == PROTOCOL_ICMP && packet.icmp_type != ICMP_ECHO_REPLY {
        return Err(PASS_ICMP_OTHER);
    }
    let reverse = ReverseKey::new(
        packet.ip.dst,
        packet.ip.src,
        packet.dst_port,
        if protocol == PROTOCOL_ICMP {
            0
        } else {
            packet.src_port
        },
        protocol,
    );
    // An answered flow's reply: one lookup. Otherwise maybe the first answer of a pending
    // flow, which moves it into the main table.
    let found = match NAT_REVERSE.get_ptr_mut(&reverse) {
        Some(value) => Some(value),
        None => flow::promote(&reverse, false),
    };
    let found = match found {
        Some(value) => Some(value),
        None => {
            if own_socket::answers(ctx, &packet) {
                return Err(OWN_REPLY);
            }
            // A packet from anywhere to a LAN endpoint's mapping, if the filtering lets it in.
            filtering::admit(&reverse)
        }
    };
    let Some(value) = found else {
        // Not one of our flows nor the gateway's own connection: a connection from outside.
        inbound::arrived(ctx, &packet);
        return Err(PASS_NOT_TRANSLATED);
    };
    // SAFETY: a pointer into the map value, valid for this run; what the translation needs is
    // copied out at once, since LRU entries may be reused under us.
    let value = unsafe { &mut *value };
    let (client_addr, client_port) = (value.flow.client_addr, value.flow.client_port);
    let (mark, id) = (value.mark, value.uplink_id);
    // The coarse clock (same monotonic base, tick resolution) is plenty for timeouts of
    // seconds, and read once per tick it costs a reply no helper call.
    let now = clock::now_ns();
    // An ordinary reply of an answered flow needs nothing from `FLOWS`: the first answer and
    // the TCP packets that move the flow's state go through it.
    let changes_state =
        protocol == PROTOCOL_TCP && packet.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0;
    if value.flags & REVERSE_FLAG_ANSWERED == 0 || changes_state {
        if value.flags & REVERSE_FLAG_UNSOLICITED != 0 {
            // Not an answer to anything: translated to the client, counted as unsolicited,
            // and the flow stays pending until the client answers.
            rewrite(ctx, &packet, Side::Destination, client_addr, client_port)?;
            set_mark(ctx, mark);
            return Ok(None);
        }
        let flow = value.flow;
        if !update_flow(ctx, &flow, &reverse, &packet, now) {
            return Err(PASS_NOT_TRANSLATED);
        }
        value.flags |= REVERSE_FLAG_ANSWERED;
    }
    // Written once per clock tick, not per packet: a line other CPUs read stays clean.
    if value.last_reply_ns != now {
        value.last_reply_ns = now;
    }
    fragments::remember(&packet.ip, client_addr, mark, id);
    rewrite(ctx, &packet, Side::Destination, client_addr, client_port)?;
    set_mark(ctx, mark);
    Ok(Some(id))
}

/// Records a reply in flow `key`: activity, TCP state, the first answer. An RST changes the
/// state only within the client's window after what the client expects next (an exact match
/// always counts); before the client's first ACK, only one that acknowledges its SYN.
#[inline(never)]
fn update_flow(
    ctx: &TcContext,
    key: &FlowKey,
    reverse: &ReverseKey,
    packet: &Packet,
    now: u64,
) -> bool {
    let protocol = packet.ip.protocol;
    let Some(entry_ptr) = flow::lookup(key) else {
        return false;
    };
    // SAFETY: a pointer into the map value, valid for this run (see `FlowEntry` on sharing).
    let entry = unsafe { &mut *entry_ptr };
    // A reverse entry left behind by a replaced or evicted flow must not steer replies into a
    // flow that now uses another translation.
    if entry.nat_port != reverse.nat_port || entry.uplink_addr != reverse.uplink_addr {
        return false;
    }
    entry.last_seen_ns = now;
    let was_answered = entry.flags & FLOW_FLAG_ANSWERED != 0;
    let mut tcp_flags = packet.tcp_flags;
    if protocol == PROTOCOL_TCP {
        if tcp_flags & TCP_RST != 0 {
            let acceptable = if entry.remote_seq_next == 0 {
                tcp_flags & TCP_ACK != 0 && packet.ack == entry.client_seq_next
            } else {
                let window = scaled_window(
                    entry.client_window,
                    entry.client_wscale,
                    entry.remote_wscale,
                );
                rst_in_window(packet.seq, entry.remote_seq_next, window)
            };
            if !acceptable {
                tcp_flags &= !TCP_RST;
            }
        }
        if tcp_flags & TCP_SYN != 0 {
            entry.remote_wscale = tcp_window::scale(ctx, packet);
        }
        entry.remote_window = packet.window;
    }
    let (state, flags) = flow_after_packet(protocol, entry.state, entry.flags, tcp_flags, true);
    tcp_window::record(entry_ptr, state, flags, false);
    if protocol == PROTOCOL_TCP && !was_answered {
        bump_uplink(u32::from(entry.uplink_id), UPLINK_TCP_ANSWERED, 1);
    }
    true
}
