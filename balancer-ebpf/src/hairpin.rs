//! Hairpinning (RFC 4787 REQ-9): a LAN client sending UDP to another LAN endpoint's public
//! mapping (an uplink address and a translated port) reaches it, with the sender's own public
//! endpoint on that uplink as source. Both translations happen here, at LAN ingress: the
//! sender's side as if the packet left by the uplink (a flow of its own, `PROTOCOL_UDP_HAIRPIN`,
//! with the sender's mapping), the receiver's as if it had arrived on it (the receiver's flow
//! toward that public endpoint, or, under endpoint-independent filtering, its mapping); then
//! the packet goes straight back out of the LAN interface (`bpf_redirect_neigh`): routed by
//! the stack it would meet a source address of the gateway's own, which Linux drops as a
//! martian. Only packets to an uplink address come here, never an ordinary flow's: the
//! `lan_hairpin` program, tail-called by `lan_ingress`.

use aya_ebpf::{
    bindings::TC_ACT_REDIRECT, helpers::bpf_redirect_neigh, maps::lpm_trie::Key,
    programs::TcContext,
};
use balancer_common::{
    counters::COUNTER_HAIRPINNED,
    flow::{
        FLOW_STATE_ESTABLISHED, FlowKey, MappingKey, PROTOCOL_UDP, PROTOCOL_UDP_HAIRPIN,
        REVERSE_FLAG_ANSWERED, REVERSE_FLAG_UNSOLICITED, ReverseKey,
    },
    policy::{flow_after_packet, nat_port_range},
    stats::{DROP_REWRITE_FAILED, PASS_LOCAL_DESTINATION},
    uplink::{DESTINATION_UPLINK_ADDRESS, FILTERING_ENDPOINT_INDEPENDENT, Settings, UplinkInfo},
};

use crate::{
    filtering,
    flow::{self, Found},
    headers::ETH_HDR_LEN,
    lan_ingress::set_mark,
    mapping,
    maps::{DESTINATIONS, NAT_REVERSE, SETTINGS, UPLINKS, bump},
    nat::{Side, csum_replace4, rewrite},
    parse::{Ipv4, Packet, parse_ipv4, parse_l4},
    tcp_window,
    verdict::REDIRECTED,
};

/// `lan_hairpin`: the packet, which `lan_ingress` already counted and found addressed to an
/// uplink's address, parsed again.
#[inline(always)]
pub fn try_lan_hairpin(ctx: &TcContext) -> Result<(), u32> {
    let ip = parse_ipv4::<ETH_HDR_LEN>(ctx)?;
    if ip.later_fragment || ip.protocol != PROTOCOL_UDP {
        return Err(PASS_LOCAL_DESTINATION);
    }
    let packet = parse_l4(ctx, ip)?;
    let id = match DESTINATIONS.get(Key::new(32, packet.ip.dst)) {
        Some(&value) if value & DESTINATION_UPLINK_ADDRESS != 0 => value & 0xff,
        _ => return Err(PASS_LOCAL_DESTINATION),
    };
    let settings = SETTINGS.get(0).ok_or(PASS_LOCAL_DESTINATION)?;
    let now = crate::clock::now_ns();
    steer(ctx, &packet, id, settings, now)
}

/// UDP `packet` is addressed to uplink `id`'s address: hairpin it to the LAN endpoint whose
/// public endpoint it names, or pass it to the gateway's own stack when it names none.
#[inline(always)]
fn steer(
    ctx: &TcContext,
    packet: &Packet,
    id: u32,
    settings: &Settings,
    now: u64,
) -> Result<(), u32> {
    let uplink = UPLINKS.get(id).ok_or(PASS_LOCAL_DESTINATION)?;
    let uplink_addr = packet.ip.dst;
    if uplink.source_addr == 0 || uplink.source_addr != uplink_addr {
        return Err(PASS_LOCAL_DESTINATION);
    }
    let key = FlowKey::new(
        packet.ip.src,
        uplink_addr,
        packet.src_port,
        packet.dst_port,
        PROTOCOL_UDP_HAIRPIN,
    );
    // The sender's public endpoint on this uplink.
    let nat_port = match flow::find(&key, settings, now) {
        Found::Live(entry) => {
            // SAFETY: a pointer into the map value, valid for this run; fields independent.
            let entry = unsafe { &mut *entry };
            entry.last_seen_ns = now;
            entry.nat_port
        }
        Found::Stale(reverse) => open(&key, Some(reverse), id, uplink, settings, now)?,
        Found::Missing => open(&key, None, id, uplink, settings, now)?,
    };
    // The packet as the receiver's side would see it arrive on the uplink.
    let reverse = ReverseKey::new(
        uplink_addr,
        uplink_addr,
        packet.dst_port,
        nat_port,
        PROTOCOL_UDP_HAIRPIN,
    );
    let found = match NAT_REVERSE.get_ptr_mut(&reverse) {
        Some(value) => Some(value),
        None => flow::promote(&reverse, false),
    };
    let target = match found {
        Some(value) => value,
        // No flow of a LAN endpoint toward the sender's public endpoint: with the default
        // filtering nothing reaches it (the gateway's own stack gets the packet, as before).
        None => filtering::admit(&reverse).ok_or(PASS_LOCAL_DESTINATION)?,
    };
    // SAFETY: a pointer into the map value, valid for this run; fields independent.
    let value = unsafe { &mut *target };
    let (receiver, flags) = (value.flow, value.flags);
    if value.last_reply_ns != now {
        value.last_reply_ns = now;
    }
    // The receiver's flow is answered now, like a reply from the internet answers it.
    if flags & (REVERSE_FLAG_ANSWERED | REVERSE_FLAG_UNSOLICITED) == 0 {
        if let Some(entry) = flow::lookup(&receiver) {
            // SAFETY: as above.
            let (state, old_flags) = unsafe { ((*entry).state, (*entry).flags) };
            let (state, new_flags) = flow_after_packet(PROTOCOL_UDP, state, old_flags, 0, true);
            tcp_window::record(entry, state.max(FLOW_STATE_ESTABLISHED), new_flags, false);
        }
        value.flags |= REVERSE_FLAG_ANSWERED;
    }

    rewrite(ctx, packet, Side::Source, uplink_addr, nat_port)?;
    // The header as it is now, for the second rewrite's incremental checksums.
    let translated = Packet {
        ip: Ipv4 {
            l3_off: packet.ip.l3_off,
            src: uplink_addr,
            dst: packet.ip.dst,
            check: csum_replace4(packet.ip.check, packet.ip.src, uplink_addr),
            protocol: packet.ip.protocol,
            later_fragment: packet.ip.later_fragment,
            more_fragments: packet.ip.more_fragments,
            id: packet.ip.id,
            l4_off: packet.ip.l4_off,
            l4_len: packet.ip.l4_len,
        },
        src_port: nat_port,
        dst_port: packet.dst_port,
        icmp_type: packet.icmp_type,
        tcp_flags: packet.tcp_flags,
        seq: packet.seq,
        seq_len: packet.seq_len,
        ack: packet.ack,
        window: packet.window,
    };
    rewrite(
        ctx,
        &translated,
        Side::Destination,
        receiver.client_addr,
        receiver.client_port,
    )?;
    // Not for any uplink: the LAN route.
    set_mark(ctx, 0);
    bump(COUNTER_HAIRPINNED, 1);
    // SAFETY: `skb` is the context pointer the kernel passed in; `ifindex` is readable.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: no parameters (the kernel resolves the next hop from the packet's destination).
    let action = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) };
    if action == i64::from(TC_ACT_REDIRECT) {
        Err(REDIRECTED)
    } else {
        Err(DROP_REWRITE_FAILED)
    }
}

/// Creates the sender's hairpin flow `key` on uplink `id`, translated to the port of the
/// sender's mapping there, else to the sender's own port (which then becomes its mapping).
/// One port, no search: this runs inside LAN ingress beside the ordinary port search, and the
/// verifier's budget has room for one. A port taken by another flow toward the same public
/// endpoint fails the hairpin (the packet goes to the gateway's stack, as before).
#[inline(always)]
fn open(
    key: &FlowKey,
    stale: Option<ReverseKey>,
    id: u32,
    uplink: &UplinkInfo,
    settings: &Settings,
    now: u64,
) -> Result<u16, u32> {
    if let Some(old) = &stale {
        flow::release_stale(key, old);
    }
    let endpoint = MappingKey {
        client_addr: key.client_addr,
        client_port: key.client_port,
        protocol: PROTOCOL_UDP,
        _pad: 0,
    };
    let mapped = mapping::find(&endpoint, key, settings, now);
    let nat_port = match &mapped {
        Some(m) if u32::from(m.uplink_id) == id => m.nat_port,
        _ => {
            let (min, max) = nat_port_range(settings);
            let port = u16::from_be(key.client_port);
            let exclusive = settings.filtering == FILTERING_ENDPOINT_INDEPENDENT;
            if port < min
                || port > max
                || flow::is_reserved(PROTOCOL_UDP, key.client_port)
                || (exclusive
                    && !mapping::port_free_for(
                        &endpoint,
                        uplink.source_addr,
                        key.client_port,
                        settings,
                        now,
                    ))
            {
                return Err(PASS_LOCAL_DESTINATION);
            }
            key.client_port
        }
    };
    let reverse = flow::reverse_key(key, uplink.source_addr, nat_port);
    flow::create_at(key, &reverse, id, uplink, false, now).ok_or(PASS_LOCAL_DESTINATION)?;
    if mapped.is_none() {
        mapping::record(
            &endpoint,
            key,
            None,
            id,
            uplink.generation,
            uplink.source_addr,
            nat_port,
            settings,
            now,
        );
    }
    Ok(nat_port)
}
