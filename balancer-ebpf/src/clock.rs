//! The coarse monotonic clock, read once per tick per CPU.
//!
//! Flow timestamps are `CLOCK_MONOTONIC_COARSE` nanoseconds, which user space compares with its
//! own clock. That clock only moves when the tick updates the timekeeper, which is also when
//! `jiffies` moves; `bpf_jiffies64` is inlined by the verifier (a load), while
//! `bpf_ktime_get_coarse_ns` is a helper call, and on hosts with return-thunk mitigations a
//! call costs more than the rest of an established packet's bookkeeping. So each CPU keeps the
//! clock's value for the jiffy it read it in. A reader that catches the tick between the two
//! updates keeps a value one tick old for one tick: the clock's own resolution.

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::PerCpuArray,
};

/// This CPU's last reading: the jiffy it was taken in, and the clock's value then.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Reading {
    jiffies: u64,
    ns: u64,
}

/// Private to each loaded object: a restarted daemon's programs start with an empty cache.
#[map]
static CLOCK_READINGS: PerCpuArray<Reading> = PerCpuArray::with_max_entries(1, 0);

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments (inlined by the verifier as a load of `jiffies`).
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(reading) = CLOCK_READINGS.get_ptr_mut(0) else {
        // SAFETY: a plain helper call without arguments.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it during this run.
    let reading = unsafe { &mut *reading };
    if reading.jiffies != jiffies || reading.ns == 0 {
        // SAFETY: a plain helper call without arguments.
        reading.ns = unsafe { bpf_ktime_get_coarse_ns() };
        reading.jiffies = jiffies;
    }
    reading.ns
}
