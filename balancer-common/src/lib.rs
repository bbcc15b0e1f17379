//! The ABI shared by the eBPF programs (`balancer-ebpf`) and user space (`balancer`).
//!
//! Only plain `#[repr(C)]` data and constants live here: fixed-width integers, explicit padding,
//! sizes asserted at compile time. No `Option`, `bool` or data-carrying enums cross the boundary.
//! `policy` adds the pure functions both sides must evaluate identically (timeouts, port range,
//! marks, TCP state, the round-robin schedule).
#![cfg_attr(not(test), no_std)]

pub mod counters;
pub mod flow;
pub mod maps;
pub mod policy;
pub mod stats;
pub mod uplink;
