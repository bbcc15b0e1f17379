//! Rewriting one side (source or destination) of a packet: address and port or echo id, with
//! every checksum kept right.
//!
//! - The IPv4 header checksum is never offloaded, so it is updated here (RFC 1624) and written
//!   with the addresses, which follow it.
//! - The L4 checksum goes through `bpf_l4_csum_replace`, which knows the skb's checksum state:
//!   under CHECKSUM_PARTIAL (veth, local senders) the field holds only the pseudo-header sum, so
//!   an address change (`BPF_F_PSEUDO_HDR`) must update it and a port change must not; under
//!   CHECKSUM_COMPLETE the helper also fixes `skb->csum`. UDP adds `BPF_F_MARK_MANGLED_0` so
//!   a zero ("no checksum") field stays zero.
//! - ICMP has no pseudo-header: only the echo id enters its checksum.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use balancer_common::{
    flow::{PROTOCOL_TCP, PROTOCOL_UDP},
    stats::DROP_REWRITE_FAILED,
};

use crate::{
    headers::{ICMP_CHECK_OFF, ICMP_ID_OFF, IP_CHECK_FIELD, TCP_CHECK_OFF, UDP_CHECK_OFF, ptr_at},
    parse::Packet,
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// `check` after replacing the 32-bit word `from` by `to` (RFC 1624, eqn. 3). All values as
/// they sit in the packet: one's complement sums do not care about byte order as long as every
/// word is read the same way.
#[inline(always)]
pub fn csum_replace4(check: u16, from: u32, to: u32) -> u16 {
    let from = !from;
    let mut sum = u32::from(!check) + (from & 0xffff) + (from >> 16) + (to & 0xffff) + (to >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// `check` after replacing the 16-bit word `from` by `to`, both at an even offset of the
/// summed data (an odd offset needs both byte-swapped).
#[inline(always)]
pub fn csum_replace2(check: u16, from: u16, to: u16) -> u16 {
    let mut sum = u32::from(!check) + u32::from(!from) + u32::from(to);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Rewrites `side` of the IPv4 header at frame offset `ip_off` (its checksum `check`, addresses
/// `src`, `dst`) to `addr`: checksum, source and destination in one store.
#[inline(always)]
pub fn store_ip_addr(
    ctx: &TcContext,
    ip_off: usize,
    (check, src, dst): (u16, u32, u32),
    side: Side,
    addr: u32,
) -> Result<u16, u32> {
    let (old, src, dst) = match side {
        Side::Source => (src, addr, dst),
        Side::Destination => (dst, src, addr),
    };
    let check = csum_replace4(check, old, addr);
    // Three scalar writes, not one of a 10-byte array: the BPF target copies an array with a
    // call of `memmove`, a bpf-to-bpf call per packet.
    write_at(ctx, ip_off + IP_CHECK_FIELD, check)?;
    write_at(ctx, ip_off + IP_CHECK_FIELD + 2, src)?;
    write_at(ctx, ip_off + IP_CHECK_FIELD + 6, dst)?;
    Ok(check)
}

/// Writes `value` at `offset` into the packet. Headers in the linear part (all the parser
/// pulled in, so every header of an ordinary packet) are written through a direct pointer:
/// the verifier's prologue for programs that write packet data unclones a shared skb first,
/// so this is what `bpf_skb_store_bytes` does, minus a helper call. Anything beyond (deep in
/// an ICMP error with options) goes through the helper.
#[inline(always)]
pub fn write_at<T>(ctx: &TcContext, offset: usize, value: T) -> Result<(), u32> {
    match ptr_at::<T>(ctx, offset) {
        Some(target) => {
            // SAFETY: `ptr_at` checked that the whole `T` lies inside the packet; packet data
            // has no alignment guarantee, hence the unaligned write.
            unsafe { (target as *mut T).write_unaligned(value) };
            Ok(())
        }
        None => ctx
            .store(offset, &value, 0)
            .map_err(|_| DROP_REWRITE_FAILED),
    }
}

/// Rewrites `side` of `packet` to `addr`:`port` (both network order; `port` is the echo id for
/// ICMP). Any helper failure is a drop: part of the packet may already be rewritten.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    packet: &Packet,
    side: Side,
    addr: u32,
    port: u16,
) -> Result<(), u32> {
    let ip = &packet.ip;
    let (old_addr, old_port) = match side {
        Side::Source => (ip.src, packet.src_port),
        Side::Destination => (ip.dst, packet.dst_port),
    };
    let (check_off, port_off, l4_flags) = match ip.protocol {
        PROTOCOL_TCP => (TCP_CHECK_OFF, 0, 0),
        PROTOCOL_UDP => (UDP_CHECK_OFF, 0, u64::from(BPF_F_MARK_MANGLED_0)),
        _ => (ICMP_CHECK_OFF, ICMP_ID_OFF, 0),
    };
    let check_off = ip.l4_off + check_off;
    // TCP and UDP: source port first, destination port second. ICMP: one id for both.
    let port_off = ip.l4_off
        + port_off
        + if side == Side::Destination && port_off == 0 {
            2
        } else {
            0
        };

    if addr != old_addr {
        store_ip_addr(ctx, ip.l3_off, (ip.check, ip.src, ip.dst), side, addr)?;
        if ip.protocol == PROTOCOL_TCP || ip.protocol == PROTOCOL_UDP {
            let flags = u64::from(BPF_F_PSEUDO_HDR) | 4 | l4_flags;
            ctx.l4_csum_replace(check_off, u64::from(old_addr), u64::from(addr), flags)
                .map_err(|_| DROP_REWRITE_FAILED)?;
        }
    }
    if port != old_port {
        write_at(ctx, port_off, port)?;
        ctx.l4_csum_replace(
            check_off,
            u64::from(old_port),
            u64::from(port),
            2 | l4_flags,
        )
        .map_err(|_| DROP_REWRITE_FAILED)?;
    }
    Ok(())
}
