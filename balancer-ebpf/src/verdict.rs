//! The one place a program's decision becomes a tc action code.
//!
//! Every `try_*` function returns `Ok(())` when it handled the packet (translated, marked, or
//! simply passed a packet it had nothing to do with) and `Err(reason)` with a
//! `balancer_common::stats` reason otherwise; the reason is counted here and decides between
//! passing untouched and dropping.

use aya_ebpf::bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC};
use balancer_common::stats::is_drop;

use crate::maps::bump_reason;

/// Hand the packet on.
///
/// Under TCX, `TC_ACT_OK` (TCX_PASS) ends the hook's program chain: any program attached after
/// ours, and any legacy clsact filter, would never see the packet. `TC_ACT_UNSPEC` (TCX_NEXT)
/// runs the next program and, after the last one, lets the stack deliver the packet as usual.
/// Counting, marking and translating must not hide traffic from other tools on the same
/// interface, so "pass" means "next" here.
pub const PASS: i32 = TC_ACT_UNSPEC;

/// Free the packet. Only for the `DROP_*` reasons: the gateway never drops traffic it merely
/// fails to understand.
pub const DROP: i32 = TC_ACT_SHOT as i32;

/// Not a reason: the program redirected the packet (`hairpin`), and tc must be told so.
pub const REDIRECTED: u32 = u32::MAX - 1;

/// The tc action for a program's result.
#[inline(always)]
pub fn action(result: Result<(), u32>) -> i32 {
    match result {
        Ok(()) => PASS,
        Err(REDIRECTED) => TC_ACT_REDIRECT as i32,
        Err(reason) => {
            bump_reason(reason);
            if is_drop(reason) { DROP } else { PASS }
        }
    }
}
