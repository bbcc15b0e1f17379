//! What TCP state tracking needs from a segment beyond its fixed header: the window scale a SYN
//! announces (RFC 7323), so an RST can be checked against the receiver's real window, and the
//! monotonic update of a flow's state and flags (several CPUs may handle one flow at once).

use aya_ebpf::programs::TcContext;
use balancer_common::{
    flow::{FlowEntry, WSCALE_NONE},
    policy::TCP_SYN,
};

use crate::{headers::TcpHdr, parse::Packet};

const TCP_OPT_EOL: u8 = 0;
const TCP_OPT_NOP: u8 = 1;
const TCP_OPT_WSCALE: u8 = 3;
const TCP_OPT_WSCALE_LEN: u8 = 3;
/// Most option bytes a TCP header holds (data offset 15: 60 - 20), hence most options to walk.
const TCP_OPTIONS_MAX: usize = 40;

/// The window scale shift a SYN announces, or `WSCALE_NONE` (not a SYN, no or a malformed
/// option). Bytes are read through `bpf_skb_load_bytes`, like the MSS walk: only SYNs pay.
#[inline(always)]
pub fn scale(ctx: &TcContext, packet: &Packet) -> u8 {
    if packet.tcp_flags & TCP_SYN == 0 {
        return WSCALE_NONE;
    }
    let tcp_off = packet.ip.l4_off;
    let Ok(data_off) = ctx.load::<u8>(tcp_off + 12) else {
        return WSCALE_NONE;
    };
    let end = tcp_off + usize::from(data_off >> 4) * 4;
    let mut off = tcp_off + core::mem::size_of::<TcpHdr>();
    for _ in 0..TCP_OPTIONS_MAX {
        if off >= end {
            break;
        }
        let Ok(kind) = ctx.load::<u8>(off) else {
            break;
        };
        if kind == TCP_OPT_EOL {
            break;
        }
        if kind == TCP_OPT_NOP {
            off += 1;
            continue;
        }
        let Ok(len) = ctx.load::<u8>(off + 1) else {
            break;
        };
        if len < 2 || off + usize::from(len) > end {
            break;
        }
        if kind == TCP_OPT_WSCALE {
            if len != TCP_OPT_WSCALE_LEN {
                break;
            }
            return ctx.load::<u8>(off + 2).unwrap_or(WSCALE_NONE);
        }
        off += usize::from(len);
    }
    WSCALE_NONE
}

/// Records a TCP transition in `entry`: new flag bits are ORed in atomically and the state is
/// only raised, so an update computed from an older read on another CPU cannot undo one made
/// meanwhile. `reuse` (a SYN reopening a closed flow's ports) is the one transition that
/// starts over, and writes both plainly.
#[inline(always)]
pub fn record(entry: *mut FlowEntry, state: u8, flags: u8, reuse: bool) {
    // SAFETY: `entry` points into a map value, valid for this program run.
    let e = unsafe { &mut *entry };
    if reuse {
        e.state = state;
        e.flags = flags;
        return;
    }
    if state > e.state {
        e.state = state;
    }
    let new_bits = flags & !e.flags;
    if new_bits != 0 {
        // SAFETY: `flags` starts an 8-byte aligned word (asserted in balancer-common; the BPF
        // target has 64-bit atomics only) whose other bytes (window scales and sizes, padding)
        // an OR of zeros leaves alone; little endian, so the flags are its low byte.
        // core's atomic types offer no read-modify-write on this target; the intrinsic is the
        // BPF atomic OR instruction itself.
        unsafe {
            core::intrinsics::atomic_or::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                core::ptr::addr_of_mut!(e.flags).cast::<u64>(),
                u64::from(new_bits),
            );
        }
    }
}
