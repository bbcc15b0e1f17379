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
/// Evictions as the programs see them: a half of an unanswered flow found alone (the other
/// half evicted from the pending LRU by newer flows) and removed, so no port stays held by a
/// flow that no longer exists.
pub const COUNTER_HALVES_REMOVED: u32 = 3;
/// Answered flows that could not enter the main table (`FLOWS` full): they go on working
/// from the pending table, where a flood can evict them.
pub const COUNTER_PROMOTIONS_REFUSED: u32 = 4;
/// Translated ports taken from a flow that was over (closed TCP, quiet) or from a pending
/// reverse entry whose flow was evicted.
pub const COUNTER_PORT_TAKEOVERS: u32 = 5;
/// New flows of an endpoint with a mapping that could not have the mapping's port (another
/// flow to the same destination holds it): they got another port.
pub const COUNTER_MAPPING_COLLISIONS: u32 = 6;
/// Unsolicited flows created by endpoint-independent filtering: a remote's packet to a LAN
/// endpoint's mapping that no flow answered.
pub const COUNTER_UNSOLICITED_ADMITTED: u32 = 7;
/// Packets from one LAN client to another's mapping on an uplink address, translated both ways
/// at LAN ingress and sent back to the LAN (hairpinning, RFC 4787 REQ-9).
pub const COUNTER_HAIRPINNED: u32 = 8;
/// Unsolicited datagrams endpoint-independent filtering turned away because their LAN endpoint
/// already had `UNSOLICITED_FLOWS_PER_SECOND` new unsolicited flows this second.
pub const COUNTER_UNSOLICITED_REFUSED: u32 = 9;
/// Number of slots; the map is declared with exactly this many entries.
pub const COUNTERS_LEN: u32 = 10;
