//! Map and program names both sides agree on, and the layout version of the pinned maps.

/// Bumped whenever a map's key, value or size changes meaning: pins live under a directory
/// named after it, so a new layout never silently reuses an old map.
pub const ABI_VERSION: u32 = 10;

pub const FLOWS: &str = "FLOWS";
pub const NAT_REVERSE: &str = "NAT_REVERSE";
pub const PENDING_FLOWS: &str = "PENDING_FLOWS";
pub const PENDING_REVERSE: &str = "PENDING_REVERSE";
pub const UPLINKS: &str = "UPLINKS";
pub const UPLINK_BY_IFINDEX: &str = "UPLINK_BY_IFINDEX";
pub const SCHEDULE: &str = "SCHEDULE";
pub const SCHEDULE_LENGTH: &str = "SCHEDULE_LENGTH";
pub const SCHEDULE_CURSOR: &str = "SCHEDULE_CURSOR";
pub const DESTINATIONS: &str = "DESTINATIONS";
pub const SETTINGS: &str = "SETTINGS";
pub const UPLINK_COUNTERS: &str = "UPLINK_COUNTERS";
pub const REASONS: &str = "REASONS";
pub const FRAGMENTS: &str = "FRAGMENTS";
pub const INBOUND: &str = "INBOUND";
pub const MAPPINGS: &str = "MAPPINGS";
pub const FORWARDED_UDP_PORTS: &str = "FORWARDED_UDP_PORTS";
pub const MAPPING_PORTS: &str = "MAPPING_PORTS";
pub const RESERVED_PORTS: &str = "RESERVED_PORTS";
pub const UNSOLICITED_BUDGET: &str = "UNSOLICITED_BUDGET";
/// The program array `lan_ingress` tail-calls for hairpinning (slot 0: `lan_hairpin`).
pub const HAIRPIN: &str = "HAIRPIN";

/// Default capacity of `FLOWS`, `NAT_REVERSE` and the pending pair; user space may set another
/// at load time.
pub const DEFAULT_FLOW_ENTRIES: u32 = 262_144;

/// Capacity of `FRAGMENTS`: datagrams in flight as fragments at once (LRU, so the oldest go).
pub const FRAGMENT_ENTRIES: u32 = 8192;

/// Capacity of `INBOUND`: connections from the internet (port forwards, the gateway's own
/// services) whose LAN-side replies are steered back out of the uplink they came in on. A map
/// of its own, so unsolicited packets can never take the room of outbound flows.
pub const INBOUND_ENTRIES: u32 = 65_536;

/// Capacity of `MAPPINGS`: LAN endpoints (address, port, protocol) with a mapping. LRU: an
/// evicted mapping costs only that the endpoint's next new flow may get another one.
pub const MAPPING_ENTRIES: u32 = 65_536;

/// Capacity of `FORWARDED_UDP_PORTS`: every port, so any set of forwards fits.
pub const FORWARDED_UDP_PORT_ENTRIES: u32 = 65_536;

/// New unsolicited flows (endpoint-independent filtering) one LAN endpoint may get per second:
/// plenty for peers reaching a game console, and a bound on how fast an inbound flood toward
/// one mapping can churn the pending table that other hosts' new flows share.
pub const UNSOLICITED_FLOWS_PER_SECOND: u32 = 64;

/// Capacity of `RESERVED_PORTS`: every TCP and UDP port.
pub const RESERVED_PORT_ENTRIES: u32 = 2 * 65_536;

/// Program names (the function names of the classifiers).
pub const PROGRAM_LAN_INGRESS: &str = "lan_ingress";
/// Tail-called by `lan_ingress`, never attached.
pub const PROGRAM_LAN_HAIRPIN: &str = "lan_hairpin";
pub const PROGRAM_UPLINK_EGRESS: &str = "uplink_egress";
pub const PROGRAM_UPLINK_INGRESS: &str = "uplink_ingress";
/// The uplink programs built for interfaces without a link-layer header (raw IP: PPP, LTE, TUN).
pub const PROGRAM_UPLINK_EGRESS_RAW_IP: &str = "uplink_egress_raw_ip";
pub const PROGRAM_UPLINK_INGRESS_RAW_IP: &str = "uplink_ingress_raw_ip";
/// Reference programs `cargo xtask bench` measures beside ours; never loaded by the daemon.
pub const PROGRAM_REFERENCE_EMPTY: &str = "reference_empty";
pub const PROGRAM_REFERENCE_NAIVE_SNAT: &str = "reference_naive_snat";
pub const PROGRAM_REFERENCE_FLOW_LOOKUP: &str = "reference_flow_lookup";
pub const PROGRAM_REFERENCE_HELPER_CALL: &str = "reference_helper_call";
pub const PROGRAM_REFERENCE_TRANSLATION_FLOOR: &str = "reference_translation_floor";
