//! MSS clamping: a TCP SYN leaving by an uplink announces at most the MSS that uplink's MTU
//! allows (`UplinkInfo::mss_max`, MTU - 40), so connections through an uplink with a smaller
//! MTU (PPPoE's 1492) work even where ICMP "fragmentation needed" is filtered upstream.
//! Applies to translated flows and to the gateway's own connections alike.

use aya_ebpf::programs::TcContext;
use balancer_common::{flow::PROTOCOL_TCP, policy::TCP_SYN, stats::DROP_REWRITE_FAILED};

use crate::{
    headers::{TCP_CHECK_OFF, TcpHdr},
    parse::Packet,
};

const TCP_OPT_EOL: u8 = 0;
const TCP_OPT_NOP: u8 = 1;
const TCP_OPT_MSS: u8 = 2;
const TCP_OPT_MSS_LEN: u8 = 4;
/// Most option bytes a TCP header holds (data offset 15: 60 - 20), hence most options to walk.
const TCP_OPTIONS_MAX: usize = 40;

/// One byte of the packet, or `None` past its end. Through `bpf_skb_load_bytes`, which checks
/// the (variable, loop-carried) offset at run time: direct packet access here would need
/// bounds the verifier cannot follow through the option walk. Only SYNs come here.
#[inline(always)]
fn byte(ctx: &TcContext, off: usize) -> Option<u8> {
    ctx.load::<u8>(off).ok()
}

/// The frame offset of the MSS option's value in the TCP header at `tcp_off` with `header_len`
/// bytes, if there is a well-formed one.
#[inline(always)]
fn find_mss(ctx: &TcContext, tcp_off: usize, header_len: usize) -> Option<usize> {
    let end = tcp_off + header_len;
    let mut off = tcp_off + core::mem::size_of::<TcpHdr>();
    for _ in 0..TCP_OPTIONS_MAX {
        if off >= end {
            return None;
        }
        let kind = byte(ctx, off)?;
        if kind == TCP_OPT_EOL {
            return None;
        }
        if kind == TCP_OPT_NOP {
            off += 1;
            continue;
        }
        let len = byte(ctx, off + 1)?;
        if len < 2 || off + usize::from(len) > end {
            return None;
        }
        if kind == TCP_OPT_MSS {
            return if len == TCP_OPT_MSS_LEN {
                Some(off + 2)
            } else {
                None
            };
        }
        off += usize::from(len);
    }
    None
}

/// Lowers the MSS a SYN announces to `mss_max` (host order; 0: no clamping).
#[inline(always)]
pub fn clamp(ctx: &TcContext, packet: &Packet, mss_max: u16) -> Result<(), u32> {
    if packet.ip.protocol != PROTOCOL_TCP || packet.tcp_flags & TCP_SYN == 0 || mss_max == 0 {
        return Ok(());
    }
    let tcp_off = packet.ip.l4_off;
    let Some(data_off) = byte(ctx, tcp_off + 12) else {
        return Ok(());
    };
    let Some(at) = find_mss(ctx, tcp_off, usize::from(data_off >> 4) * 4) else {
        return Ok(());
    };
    let (Some(high), Some(low)) = (byte(ctx, at), byte(ctx, at + 1)) else {
        return Ok(());
    };
    if u16::from_be_bytes([high, low]) <= mss_max {
        return Ok(());
    }
    let new = mss_max.to_be_bytes();
    ctx.store(at, &new, 0).map_err(|_| DROP_REWRITE_FAILED)?;
    // The checksum sums 16-bit words from the start of the TCP header: a value at an odd
    // offset straddles two words, which amounts to summing it byte-swapped.
    let (from, to) = if (at - tcp_off) % 2 == 0 {
        ([high, low], new)
    } else {
        ([low, high], [new[1], new[0]])
    };
    ctx.l4_csum_replace(
        tcp_off + TCP_CHECK_OFF,
        u64::from(u16::from_ne_bytes(from)),
        u64::from(u16::from_ne_bytes(to)),
        2,
    )
    .map_err(|_| DROP_REWRITE_FAILED)
}
