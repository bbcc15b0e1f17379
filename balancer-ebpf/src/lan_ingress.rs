//! LAN ingress: count every frame, then give each new flow an uplink (weighted round robin, or
//! the one a destination forces) and a translated port, and mark every packet of a known flow
//! so the `fwmark` rules route it out of its uplink. The translation itself happens on the
//! uplink's egress, after routing. LAN hosts' replies to inbound connections are steered back
//! out of the uplink they came in on (`inbound`); what cannot be translated and is headed for
//! the internet is dropped (`untranslated`).

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use balancer_common::{
    counters::{COUNTER_BYTES, COUNTER_IPV4, COUNTER_PACKETS},
    flow::{FlowEntry, FlowKey, PROTOCOL_ICMP, PROTOCOL_TCP, PROTOCOL_UDP, WSCALE_NONE},
    policy::{
        TCP_ACK, TCP_RST, TCP_SYN, flow_after_packet, is_non_unicast_destination,
        is_unroutable_source, rst_in_window, scaled_window, steered_mark,
    },
    stats::{
        PASS_ICMP_OTHER, PASS_INBOUND_REPLY, PASS_LOCAL_DESTINATION, PASS_NO_UPLINK,
        PASS_NON_UNICAST, PASS_TCP_WITHOUT_FLOW, PASS_UNROUTABLE_SOURCE,
    },
    uplink::{
        DESTINATION_PASS, DESTINATION_UPLINK_ADDRESS, FILTERING_ENDPOINT_INDEPENDENT,
        SCHEDULE_SLOTS,
    },
};

use crate::{
    clock,
    flow::{self, Found},
    fragments,
    headers::{ETH_HDR_LEN, ICMP_ECHO_REQUEST},
    icmp_error, inbound, mapping,
    maps::{
        DESTINATIONS, HAIRPIN, SCHEDULE, SCHEDULE_CURSOR, SCHEDULE_LENGTH, SETTINGS, UPLINKS, bump,
    },
    parse::{Ipv4, parse_ipv4, parse_l4},
    tcp_window, untranslated,
};

#[inline(always)]
pub fn try_lan_ingress(ctx: &TcContext) -> Result<(), u32> {
    bump(COUNTER_PACKETS, 1);
    bump(COUNTER_BYTES, u64::from(ctx.len()));

    let ip = parse_ipv4::<ETH_HDR_LEN>(ctx)?;
    bump(COUNTER_IPV4, 1);
    // Multicast, broadcast and link-local stay on the link: no flow, no port.
    if is_non_unicast_destination(ip.dst) {
        return Err(PASS_NON_UNICAST);
    }
    let dst = ip.dst;
    steer(ctx, ip).map_err(|reason| untranslated::verdict(dst, reason))
}

/// Everything after the first checks: the flow of a unicast IPv4 packet, or why it has none.
#[inline(always)]
fn steer(ctx: &TcContext, ip: Ipv4) -> Result<(), u32> {
    if is_unroutable_source(ip.src) {
        return Err(PASS_UNROUTABLE_SOURCE);
    }
    if ip.later_fragment {
        return fragments::steer(ctx, &ip);
    }
    let packet = parse_l4(ctx, ip)?;
    let protocol = packet.ip.protocol;
    if protocol == PROTOCOL_ICMP && icmp_error::is_error(packet.icmp_type) {
        // A client's error about a reply leaves by the flow's uplink, translated there.
        let (_, entry) = icmp_error::client_flow(ctx, &packet.ip)?;
        set_mark(ctx, entry.mark);
        return Ok(());
    }
    if protocol == PROTOCOL_ICMP && packet.icmp_type != ICMP_ECHO_REQUEST {
        return Err(PASS_ICMP_OTHER);
    }
    let key = FlowKey::new(
        packet.ip.src,
        packet.ip.dst,
        packet.src_port,
        if protocol == PROTOCOL_ICMP {
            0
        } else {
            packet.dst_port
        },
        protocol,
    );
    let settings = SETTINGS.get(0).ok_or(PASS_NO_UPLINK)?;
    // The coarse clock (same monotonic base, tick resolution) is plenty for timeouts of
    // seconds, and read once per tick it costs an established packet no helper call.
    let now = clock::now_ns();
    let seq_next = packet.seq.wrapping_add(packet.seq_len);

    let stale = match flow::find(&key, settings, now) {
        Found::Live(entry) => {
            // SAFETY: a pointer into the map value, valid for this run. Other CPUs may write
            // the same entry; each field is independent (see `FlowEntry`).
            let entry = unsafe { &mut *entry };
            entry.last_seen_ns = now;
            if protocol == PROTOCOL_TCP {
                // An RST changes the flow only within the window the remote end advertised,
                // around what the client sent last (the remote's next expected number lies
                // within a window before it); an exact match always counts.
                let mut tcp_flags = packet.tcp_flags;
                if tcp_flags & TCP_RST != 0 {
                    let window = scaled_window(
                        entry.remote_window,
                        entry.remote_wscale,
                        entry.client_wscale,
                    );
                    let from = entry.client_seq_next.wrapping_sub(window);
                    if !rst_in_window(packet.seq, entry.client_seq_next, 0)
                        && !rst_in_window(packet.seq, from, window.saturating_mul(2))
                    {
                        tcp_flags &= !TCP_RST;
                    }
                }
                let (state, flags) =
                    flow_after_packet(protocol, entry.state, entry.flags, tcp_flags, false);
                let reuse = state < entry.state;
                if reuse {
                    entry.client_wscale = tcp_window::scale(ctx, &packet);
                }
                tcp_window::record(entry as *mut FlowEntry, state, flags, reuse);
                // A rejected RST says nothing about the connection's sequence space.
                if tcp_flags == packet.tcp_flags {
                    entry.client_window = packet.window;
                    entry.client_seq_next = seq_next;
                    // What the client acknowledges is exactly what it expects next from the
                    // remote (its RCV.NXT): the sequence number a reset on its behalf must carry.
                    if packet.tcp_flags & TCP_ACK != 0 {
                        entry.remote_seq_next = packet.ack;
                    }
                }
            }
            fragments::remember(&packet.ip, entry.uplink_addr, entry.mark, entry.uplink_id);
            set_mark(ctx, entry.mark);
            return Ok(());
        }
        Found::Stale(reverse) => Some(reverse),
        Found::Missing => None,
    };

    // LAN networks and the gateway's own addresses are never balanced; a modem's subnet is
    // reachable only through that modem. Asked only for packets without a live flow: the trie
    // walk is the dearest lookup here, and no flow is ever created to a passed destination
    // (user space removes the flows to a destination that becomes one).
    let forced = match DESTINATIONS.get(Key::new(32, packet.ip.dst)) {
        Some(&DESTINATION_PASS) => return Err(PASS_LOCAL_DESTINATION),
        // An uplink's own address: another LAN endpoint's public mapping (`hairpin`), or the
        // gateway. The tail call returns only while no hairpin program is installed.
        Some(&value) if value & DESTINATION_UPLINK_ADDRESS != 0 => {
            if protocol == PROTOCOL_UDP {
                // SAFETY: the context is the one the kernel passed in.
                unsafe { HAIRPIN.tail_call(ctx, 0) };
            }
            return Err(PASS_LOCAL_DESTINATION);
        }
        Some(&id) => Some(id),
        None => None,
    };

    // A LAN host answering a connection that came in on an uplink: back out of that uplink,
    // untranslated (conntrack undoes the port forward's DNAT).
    if let Some(mark) = inbound::reply_mark(&packet, settings, now) {
        set_mark(ctx, mark);
        return Err(PASS_INBOUND_REPLY);
    }

    // Mid-stream TCP without a flow (the gateway restarted, or the flow idled out): inventing
    // a translation would only make the remote answer with a RST; it is not translated.
    if protocol == PROTOCOL_TCP && packet.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Err(PASS_TCP_WITHOUT_FLOW);
    }
    // A balanced flow follows its endpoint's mapping, if it has a usable one.
    let endpoint = mapping::key_of(&key);
    let mapped = match (&endpoint, forced) {
        (Some(endpoint), None) => mapping::find(endpoint, &key, settings, now),
        _ => None,
    };
    let id = match (forced, &mapped) {
        (Some(id), _) => id,
        (None, Some(mapped)) => u32::from(mapped.uplink_id),
        (None, None) => next_scheduled()?,
    };
    let uplink = UPLINKS.get(id).ok_or(PASS_NO_UPLINK)?;
    // A forced uplink is used even when it takes no balanced flows: a modem's admin page
    // matters most while its line is down.
    if uplink.source_addr == 0 || (forced.is_none() && uplink.enabled != 1) {
        return Err(PASS_NO_UPLINK);
    }
    let syn = if protocol == PROTOCOL_TCP {
        flow::ClientSyn {
            seq_next,
            window: packet.window,
            wscale: tcp_window::scale(ctx, &packet),
        }
    } else {
        flow::ClientSyn {
            seq_next: 0,
            window: 0,
            wscale: WSCALE_NONE,
        }
    };
    // Endpoint-independent filtering lets anyone reach a UDP mapping: its port must serve one
    // endpoint only.
    let exclusive = match (&endpoint, forced) {
        (Some(endpoint), None)
            if protocol == PROTOCOL_UDP && settings.filtering == FILTERING_ENDPOINT_INDEPENDENT =>
        {
            Some(endpoint)
        }
        _ => None,
    };
    let (mark, nat_port) = flow::create(
        &key,
        id,
        uplink,
        forced.is_some(),
        stale,
        mapped.map(|m| m.nat_port),
        exclusive,
        syn,
        settings,
        now,
    )?;
    // A forced destination (a modem's admin page) says nothing about the endpoint's mapping.
    if let (Some(endpoint), None) = (&endpoint, forced) {
        mapping::record(
            endpoint,
            &key,
            mapped,
            id,
            uplink.generation,
            uplink.source_addr,
            nat_port,
            settings,
            now,
        );
    }
    fragments::remember(&packet.ip, uplink.source_addr, mark, id as u8);
    set_mark(ctx, mark);
    Ok(())
}

/// The next uplink in this CPU's walk through `SCHEDULE`.
#[inline(always)]
fn next_scheduled() -> Result<u32, u32> {
    let length = SCHEDULE_LENGTH.get(0).map_or(0, |length| length.length);
    let length = if length > SCHEDULE_SLOTS {
        SCHEDULE_SLOTS
    } else {
        length
    };
    if length == 0 {
        return Err(PASS_NO_UPLINK);
    }
    let cursor = SCHEDULE_CURSOR.get_ptr_mut(0).ok_or(PASS_NO_UPLINK)?;
    // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it during this run.
    let index = unsafe { *cursor };
    // The cursor is kept below the length, but the length may have shrunk since.
    let index = if index >= length { 0 } else { index };
    let id = *SCHEDULE.get(index).ok_or(PASS_NO_UPLINK)?;
    // SAFETY: as above.
    unsafe { *cursor = if index + 1 >= length { 0 } else { index + 1 } };
    Ok(id)
}

/// Steers the packet: the balancer's mark bits replaced, the others kept.
///
/// Volatile on purpose: with a plain read-modify-write, LLVM sees that only the top byte
/// changes and emits a one-byte store to `skb->mark`, which the verifier rejects ("invalid
/// bpf_context access off=11 size=1": context fields take full-width stores only).
#[inline(always)]
pub fn set_mark(ctx: &TcContext, uplink_mark: u32) {
    // SAFETY: `skb` is the context pointer the kernel passed in; `mark` is readable and
    // writable by tc programs, as a whole u32.
    unsafe {
        let mark = core::ptr::addr_of_mut!((*ctx.skb.skb).mark);
        core::ptr::write_volatile(
            mark,
            steered_mark(core::ptr::read_volatile(mark), uplink_mark),
        );
    }
}
