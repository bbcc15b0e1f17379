//! Indices into the `COUNTERS` per-CPU array.
//!
//! Per-CPU slots avoid atomics on the hot path; user space sums the CPUs when it reads them.
//! Indices are `u32` because that is the key type of a BPF array map.

/// Name of the per-CPU `u64` array map both sides agree on.
pub const COUNTERS_MAP: &str = "COUNTERS";

/// Every packet the LAN ingress program saw.
pub const COUNTER_PACKETS: u32 = 0;
/// Bytes of those packets, as `skb->len` (the frame including the Ethernet header).
pub const COUNTER_BYTES: u32 = 1;
/// Packets that parsed as IPv4.
pub const COUNTER_IPV4: u32 = 2;
/// Number of slots; the map is declared with exactly this many entries.
pub const COUNTERS_LEN: u32 = 3;
