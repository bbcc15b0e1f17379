//! Fragments. A first fragment (offset 0) carries the L4 header and is translated like any
//! packet of its flow (the L4 checksum covers the whole datagram, and an incremental update of
//! the fields in the first fragment keeps it right). Later fragments carry no ports: when a
//! first fragment with "more fragments" passes, its datagram (source, destination, IP id,
//! protocol) is remembered in `FRAGMENTS` with the flow's translation, and later fragments of
//! that datagram get the same address rewrite and mark. A later fragment of a datagram not
//! seen (its first fragment lost or reordered behind it, or the gateway's own) is passed
//! untouched and counted (`PASS_FRAGMENT`). No reassembly: the gateway never holds packets.

use aya_ebpf::programs::TcContext;
use balancer_common::{
    flow::{FragmentEntry, FragmentKey},
    stats::{PASS_FRAGMENT, PASS_WRONG_UPLINK},
};

use crate::{
    lan_ingress::set_mark,
    maps::FRAGMENTS,
    nat::{Side, store_ip_addr},
    parse::Ipv4,
};

/// The datagram `ip` is a fragment of.
#[inline(always)]
pub fn key(ip: &Ipv4) -> FragmentKey {
    FragmentKey {
        src: ip.src,
        dst: ip.dst,
        id: ip.id,
        protocol: ip.protocol,
        _pad: 0,
    }
}

/// After a first fragment of a flow passed: its later fragments get `addr` on the translated
/// side, `mark`, and (LAN side) leave only by `uplink_id`. A failed insert (out of memory)
/// leaves the later fragments to pass untouched, counted.
#[inline(always)]
pub fn remember(ip: &Ipv4, addr: u32, mark: u32, uplink_id: u8) {
    if ip.more_fragments && !ip.later_fragment {
        let entry = FragmentEntry {
            addr,
            mark,
            uplink_id,
            _pad: [0; 3],
        };
        let _ = FRAGMENTS.insert(&key(ip), &entry, 0);
    }
}

/// The remembered translation of a later fragment, or `PASS_FRAGMENT`.
#[inline(always)]
pub fn lookup(ip: &Ipv4) -> Result<FragmentEntry, u32> {
    let entry = FRAGMENTS.get_ptr(&key(ip)).ok_or(PASS_FRAGMENT)?;
    // SAFETY: a successful lookup returns a pointer to the value; copied out at once.
    Ok(unsafe { *entry })
}

/// A later fragment at LAN ingress: marked like its flow, so it leaves by the same uplink.
#[inline(always)]
pub fn steer(ctx: &TcContext, ip: &Ipv4) -> Result<(), u32> {
    let entry = lookup(ip)?;
    set_mark(ctx, entry.mark);
    Ok(())
}

/// A later fragment at uplink egress (`side` source, leaving by uplink `id`) or ingress
/// (`side` destination): the address rewritten, and at ingress the flow's mark set.
#[inline(always)]
pub fn translate(ctx: &TcContext, ip: &Ipv4, side: Side, id: u32) -> Result<(), u32> {
    let entry = lookup(ip)?;
    if side == Side::Source && u32::from(entry.uplink_id) != id {
        return Err(PASS_WRONG_UPLINK);
    }
    store_ip_addr(ctx, ip.l3_off, (ip.check, ip.src, ip.dst), side, entry.addr)?;
    if side == Side::Destination {
        set_mark(ctx, entry.mark);
    }
    Ok(())
}
