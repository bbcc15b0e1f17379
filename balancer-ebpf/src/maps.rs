//! Every map the programs share with user space, declared once. Names are part of the ABI:
//! user space looks them up by these identifiers (`balancer_common::maps`), and the static's
//! name is the map's name in the object.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use balancer_common::{
    counters::COUNTERS_LEN,
    flow::{
        FlowEntry, FlowKey, FragmentEntry, FragmentKey, InboundEntry, InboundKey, MappingEntry,
        MappingKey, MappingPortEntry, MappingPortKey, ReservedPortKey, ReverseEntry, ReverseKey,
    },
    maps::{
        DEFAULT_FLOW_ENTRIES, FORWARDED_UDP_PORT_ENTRIES, FRAGMENT_ENTRIES, INBOUND_ENTRIES,
        MAPPING_ENTRIES, RESERVED_PORT_ENTRIES,
    },
    stats::{REASONS_LEN, UPLINK_COUNTER_FIELDS, UPLINK_COUNTERS_LEN},
    uplink::{
        DESTINATION_ENTRIES, SCHEDULE_SLOTS, ScheduleLength, Settings, UPLINK_BY_IFINDEX_ENTRIES,
        UPLINK_SLOTS, UplinkInfo,
    },
};

/// Packet/byte counters indexed by `balancer_common::counters::COUNTER_*`. Per-CPU, so the hot
/// path needs no atomics; user space sums the slots.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

/// Answered flows as the LAN client sent them -> their uplink and translation. A plain hash,
/// never an LRU: an answered flow is never evicted to make room (a full table refuses the
/// promotion instead, and the flow goes on from `PENDING_FLOWS`). Flows enter it on their
/// first answer (`flow::promote`).
#[map]
pub static FLOWS: HashMap<FlowKey, FlowEntry> = HashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);

/// Replies of answered flows as they arrive on an uplink -> the flow they belong to and how
/// to translate them. The other half of `FLOWS`, inserted before it.
#[map]
pub static NAT_REVERSE: HashMap<ReverseKey, ReverseEntry> =
    HashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);

/// Flows not answered yet -> their uplink and translation. An LRU of its own: a flood of
/// unanswered flows (a scan, a host opening thousands of UDP flows) evicts only unanswered
/// flows, never an answered one.
#[map]
pub static PENDING_FLOWS: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);

/// The reverse half of `PENDING_FLOWS`. Its `BPF_NOEXIST` insert reserves a translated port
/// (after the port was found free in `NAT_REVERSE` too). LRU eviction may take one half of a
/// pending pair alone: a half found alone is removed (`flow::find`, `flow::promote`, the port
/// search), so no port is ever held by two flows.
#[map]
pub static PENDING_REVERSE: LruHashMap<ReverseKey, ReverseEntry> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);

/// Fragmented datagrams of known flows -> the translation of their later fragments, which
/// carry no ports. Filled by the first fragment; LRU, short-lived by nature.
#[map]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentEntry> =
    LruHashMap::with_max_entries(FRAGMENT_ENTRIES, 0);

/// Remote ends of connections that arrived on an uplink -> that uplink (`inbound`). Apart from
/// `FLOWS`, so unsolicited packets cannot evict outbound flows or take NAT ports.
#[map]
pub static INBOUND: LruHashMap<InboundKey, InboundEntry> =
    LruHashMap::with_max_entries(INBOUND_ENTRIES, 0);

/// UDP ports (network order) the host's firewall forwards (DNAT), as the daemon read them from
/// the nftables ruleset; the value is unused. Only datagrams to these ports are recorded in
/// `INBOUND`.
#[map]
pub static FORWARDED_UDP_PORTS: HashMap<u16, u8> =
    HashMap::with_max_entries(FORWARDED_UDP_PORT_ENTRIES, 0);

/// LAN endpoints -> their unsolicited-flow budget this second: the second (coarse clock, in
/// seconds) in the high 32 bits, the flows admitted in it in the low 32 (`filtering::admit`).
#[map]
pub static UNSOLICITED_BUDGET: LruHashMap<MappingKey, u64> =
    LruHashMap::with_max_entries(MAPPING_ENTRIES, 0);

/// Ports the gateway listens on (TCP listeners, bound UDP sockets on any or an uplink address)
/// or the host's nftables DNAT forwards, within the NAT range, as the daemon read them; the
/// value is unused. The port search never picks one (`flow::create`).
#[map]
pub static RESERVED_PORTS: HashMap<ReservedPortKey, u8> =
    HashMap::with_max_entries(RESERVED_PORT_ENTRIES, 0);

/// LAN endpoints -> the uplink and translated port all their flows get (`mapping`).
#[map]
pub static MAPPINGS: LruHashMap<MappingKey, MappingEntry> =
    LruHashMap::with_max_entries(MAPPING_ENTRIES, 0);

/// Translated UDP ports on uplink addresses -> the LAN endpoint mapped there and when, written
/// with the mapping under endpoint-independent filtering (`mapping::record`). A packet from
/// the internet trusts an entry only while that endpoint's mapping still names the port
/// (`mapping::endpoint_at`); the port search, only while it is recent (`port_free_for`). LRU,
/// sized like `MAPPINGS`.
#[map]
pub static MAPPING_PORTS: LruHashMap<MappingPortKey, MappingPortEntry> =
    LruHashMap::with_max_entries(MAPPING_ENTRIES, 0);

/// Slot 0: the `lan_hairpin` program, which `lan_ingress` tail-calls for packets to an uplink
/// address. A program of its own so that the verifier checks it apart from `lan_ingress`'s
/// port search (together they pass its budget). Filled by the daemon when it loads the
/// programs and not pinned: while no daemon runs, such packets go to the gateway's stack.
#[map]
pub static HAIRPIN: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[map]
pub static UPLINKS: Array<UplinkInfo> = Array::with_max_entries(UPLINK_SLOTS, 0);

/// ifindex -> uplink id, for the programs attached to uplinks.
#[map]
pub static UPLINK_BY_IFINDEX: HashMap<u32, u32> =
    HashMap::with_max_entries(UPLINK_BY_IFINDEX_ENTRIES, 0);

/// Uplink ids in smooth weighted round-robin order; `SCHEDULE_LENGTH[0]` slots are in use.
#[map]
pub static SCHEDULE: Array<u32> = Array::with_max_entries(SCHEDULE_SLOTS, 0);

#[map]
pub static SCHEDULE_LENGTH: Array<ScheduleLength> = Array::with_max_entries(1, 0);

/// Each CPU's position in `SCHEDULE`. Per-CPU: no atomics, and every CPU walks the whole
/// cycle, so the split holds per CPU and therefore overall.
#[map]
pub static SCHEDULE_CURSOR: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Destination prefix -> `DESTINATION_PASS` or a forced uplink id. aya-ebpf adds
/// `BPF_F_NO_PREALLOC`, which the kernel requires for LPM tries.
#[map]
pub static DESTINATIONS: LpmTrie<u32, u32> = LpmTrie::with_max_entries(DESTINATION_ENTRIES, 0);

#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// `UPLINK_COUNTERS[id * UPLINK_COUNTER_FIELDS + field]`, per CPU.
#[map]
pub static UPLINK_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(UPLINK_COUNTERS_LEN, 0);

/// Why packets were passed untouched or dropped, per CPU.
#[map]
pub static REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASONS_LEN, 0);

/// Adds `by` to slot `index` of a per-CPU counter array. A missing slot only happens if `index`
/// is out of range, which the shared constants rule out; there is nothing better to do than
/// skip it.
#[inline(always)]
fn add(map: &PerCpuArray<u64>, index: u32, by: u64) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup, so it is valid and
        // only this CPU writes it while this program runs (BPF programs do not migrate).
        unsafe { *slot = (*slot).wrapping_add(by) };
    }
}

/// LAN ingress counters (`balancer_common::counters`).
#[inline(always)]
pub fn bump(index: u32, by: u64) {
    add(&COUNTERS, index, by);
}

/// Per-uplink counters (`balancer_common::stats::UPLINK_*`).
#[inline(always)]
pub fn bump_uplink(id: u32, field: u32, by: u64) {
    if id < UPLINK_SLOTS {
        add(&UPLINK_COUNTERS, id * UPLINK_COUNTER_FIELDS + field, by);
    }
}

/// Pass/drop reasons (`balancer_common::stats::PASS_*`, `DROP_*`).
#[inline(always)]
pub fn bump_reason(reason: u32) {
    add(&REASONS, reason, 1);
}
