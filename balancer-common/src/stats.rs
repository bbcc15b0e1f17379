//! Counters the programs keep, per CPU, and user space sums.

/// Per-uplink counters: `UPLINK_COUNTERS[id * UPLINK_COUNTER_FIELDS + field]`.
pub const UPLINK_TX_PACKETS: u32 = 0;
pub const UPLINK_TX_BYTES: u32 = 1;
pub const UPLINK_RX_PACKETS: u32 = 2;
pub const UPLINK_RX_BYTES: u32 = 3;
/// Transparent flows assigned to the uplink.
pub const UPLINK_NEW_FLOWS: u32 = 4;
/// New flows refused because no translated port was free.
pub const UPLINK_NAT_EXHAUSTED: u32 = 5;
/// New TCP flows (SYNs) assigned to the uplink, and those that got any answer from the remote
/// end (SYN-ACK or RST): a line that passes pings but drops TCP shows as new flows without answers.
pub const UPLINK_TCP_NEW_FLOWS: u32 = 6;
pub const UPLINK_TCP_ANSWERED: u32 = 7;
/// Packets received on the uplink that answer nothing: neither a reply of a translated flow nor
/// a packet of one of the gateway's own connections (scans, stray datagrams, ICMP). Received
/// minus unsolicited is what proves the line carries traffic both ways (health liveness).
/// Counted off the reply path, so an ordinary reply pays nothing for it.
pub const UPLINK_RX_UNSOLICITED: u32 = 8;
pub const UPLINK_COUNTER_FIELDS: u32 = 9;
pub const UPLINK_COUNTERS_LEN: u32 = crate::uplink::UPLINK_SLOTS * UPLINK_COUNTER_FIELDS;

/// Why a packet was passed untouched or dropped: `REASONS[reason]`.
pub const PASS_NOT_IPV4: u32 = 0;
/// To a LAN network or one of the gateway's own addresses.
pub const PASS_LOCAL_DESTINATION: u32 = 1;
/// An IP protocol the data plane does not balance (documented: left to the routing tables).
pub const PASS_OTHER_PROTOCOL: u32 = 2;
/// A TCP packet that is not a SYN and belongs to no known flow.
pub const PASS_TCP_WITHOUT_FLOW: u32 = 3;
/// No uplink is enabled: the packet follows the routing tables unmarked.
pub const PASS_NO_UPLINK: u32 = 4;
/// A non-first fragment of a datagram whose first fragment was not seen (lost, reordered, or
/// the gateway's own): no ports to look at, so it is not translated.
pub const PASS_FRAGMENT: u32 = 5;
/// On an uplink: not a translated flow (the gateway's own traffic).
pub const PASS_NOT_TRANSLATED: u32 = 6;
/// ICMP that is neither echo nor an error the data plane translates (redirects, timestamps...).
pub const PASS_ICMP_OTHER: u32 = 7;
/// A packet too short or malformed to parse (bad IHL, truncated header): passed untouched.
pub const PASS_MALFORMED: u32 = 8;
/// A new flow refused: no free translated port.
pub const DROP_NAT_EXHAUSTED: u32 = 9;
/// A flow left by an uplink other than the one it was assigned to (routing and marks disagree).
pub const PASS_WRONG_UPLINK: u32 = 10;
/// A checksum or store helper failed halfway through a translation (out of memory while
/// un-cloning the packet): dropped, because a half-rewritten packet must never leave.
pub const DROP_REWRITE_FAILED: u32 = 11;
/// An ICMP error whose embedded packet is too short or malformed to name a flow (truncated,
/// bad IHL, lying lengths): passed untouched.
pub const PASS_ICMP_ERROR_MALFORMED: u32 = 12;
/// An ICMP error about a packet of no translated flow (the gateway's own traffic), or about
/// something without ports (a later fragment, another protocol): passed untouched.
pub const PASS_ICMP_ERROR_UNMATCHED: u32 = 13;
pub const REASONS_LEN: u32 = 14;

/// Names of the reasons, indexed like `REASONS`, for `balancer stats`.
pub const REASON_NAMES: [&str; REASONS_LEN as usize] = [
    "pass_not_ipv4",
    "pass_local_destination",
    "pass_other_protocol",
    "pass_tcp_without_flow",
    "pass_no_uplink",
    "pass_fragment",
    "pass_not_translated",
    "pass_icmp_other",
    "pass_malformed",
    "drop_nat_exhausted",
    "pass_wrong_uplink",
    "drop_rewrite_failed",
    "pass_icmp_error_malformed",
    "pass_icmp_error_unmatched",
];
