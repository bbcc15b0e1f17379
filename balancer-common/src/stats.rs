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
/// Multicast, limited broadcast or link-local destinations: never balanced or translated, they
/// reach the gateway and the LAN untouched.
pub const PASS_NON_UNICAST: u32 = 14;
/// From 0.0.0.0 or a link-local source (DHCP, zeroconf) to the gateway, the LAN or an office
/// destination: untouched. Toward the internet such a packet is dropped instead.
pub const PASS_UNROUTABLE_SOURCE: u32 = 15;
/// A LAN host's reply to a connection that came in on an uplink (a port forward): marked for
/// that uplink, never given a flow or a NAT port; conntrack translates it back.
pub const PASS_INBOUND_REPLY: u32 = 16;
/// The drops of untranslatable LAN traffic bound for the internet (item "nothing leaves with a
/// private source"), one per pass reason it would otherwise have been passed with.
pub const DROP_OTHER_PROTOCOL: u32 = 17;
pub const DROP_TCP_WITHOUT_FLOW: u32 = 18;
pub const DROP_NO_UPLINK: u32 = 19;
pub const DROP_UNROUTABLE_SOURCE: u32 = 20;
/// Any other LAN packet the data plane cannot translate (an unmatched later fragment, ICMP
/// other than echo, an ICMP error about no flow, a malformed L4 header).
pub const DROP_UNTRANSLATED: u32 = 21;
pub const REASONS_LEN: u32 = 22;

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
    "pass_non_unicast",
    "pass_unroutable_source",
    "pass_inbound_reply",
    "drop_other_protocol",
    "drop_tcp_without_flow",
    "drop_no_uplink",
    "drop_unroutable_source",
    "drop_untranslated",
];

/// Whether packets counted with `reason` are dropped (every other reason passes them on).
pub const fn is_drop(reason: u32) -> bool {
    matches!(
        reason,
        DROP_NAT_EXHAUSTED
            | DROP_REWRITE_FAILED
            | DROP_OTHER_PROTOCOL
            | DROP_TCP_WITHOUT_FLOW
            | DROP_NO_UPLINK
            | DROP_UNROUTABLE_SOURCE
            | DROP_UNTRANSLATED
    )
}

/// The drop that replaces pass `reason` for a LAN packet headed for the internet untranslated
/// (it would leave with its private source); `None` for reasons that never leak.
pub const fn untranslated_drop(reason: u32) -> Option<u32> {
    match reason {
        PASS_OTHER_PROTOCOL => Some(DROP_OTHER_PROTOCOL),
        PASS_TCP_WITHOUT_FLOW => Some(DROP_TCP_WITHOUT_FLOW),
        PASS_NO_UPLINK => Some(DROP_NO_UPLINK),
        PASS_UNROUTABLE_SOURCE => Some(DROP_UNROUTABLE_SOURCE),
        PASS_FRAGMENT
        | PASS_ICMP_OTHER
        | PASS_ICMP_ERROR_MALFORMED
        | PASS_ICMP_ERROR_UNMATCHED
        | PASS_MALFORMED => Some(DROP_UNTRANSLATED),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_drop_has_a_name_and_every_leak_a_drop() {
        for reason in 0..REASONS_LEN {
            let name = REASON_NAMES[reason as usize];
            assert_eq!(is_drop(reason), name.starts_with("drop_"), "{name}");
            if let Some(drop) = untranslated_drop(reason) {
                assert!(is_drop(drop), "{name} -> {drop}");
                assert!(name.starts_with("pass_"), "{name}");
            }
        }
        assert_eq!(untranslated_drop(PASS_NON_UNICAST), None);
        assert_eq!(untranslated_drop(PASS_INBOUND_REPLY), None);
        assert_eq!(untranslated_drop(PASS_LOCAL_DESTINATION), None);
    }
}
