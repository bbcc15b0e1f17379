//! Pure decisions both sides must make identically: flow timeouts (the kernel when it meets a
//! flow, user space when it sweeps), the translated port range, and TCP state transitions.
//!
//! A zeroed `Settings` (user space has not written `SETTINGS` yet) means "built-in defaults",
//! never "every flow expires at once" or "no port is free".

use crate::{
    flow::{
        FLOW_FLAG_ANSWERED, FLOW_FLAG_CLIENT_FIN, FLOW_FLAG_FORCED, FLOW_FLAG_REMOTE_FIN,
        FLOW_FLAG_RESET, FLOW_STATE_CLOSED, FLOW_STATE_CLOSING, FLOW_STATE_ESTABLISHED,
        FLOW_STATE_NEW, FlowEntry, PROTOCOL_TCP, PROTOCOL_UDP, PROTOCOL_UDP_HAIRPIN, WSCALE_NONE,
    },
    uplink::{MARK_MASK, Settings},
};

const NS_PER_SEC: u64 = 1_000_000_000;
/// A SYN nobody answered, a transitory state: RFC 5382 REQ-5 asks for at least 4 minutes.
pub const DEFAULT_TCP_SYN_TIMEOUT_NS: u64 = 240 * NS_PER_SEC;
/// RFC 5382 REQ-5: at least 2 h 4 min for an established TCP flow.
pub const DEFAULT_TCP_ESTABLISHED_TIMEOUT_NS: u64 = 7440 * NS_PER_SEC;
/// After FIN or RST, a transitory state: at least 4 minutes (RFC 5382 REQ-5). A flow that is
/// over still gives its port to a new one once the range is crowded (see `flow_over`).
pub const DEFAULT_TCP_CLOSING_TIMEOUT_NS: u64 = 240 * NS_PER_SEC;
/// RFC 4787 REQ-5 asks for at least 2 min.
pub const DEFAULT_UDP_TIMEOUT_NS: u64 = 120 * NS_PER_SEC;
pub const DEFAULT_ICMP_TIMEOUT_NS: u64 = 30 * NS_PER_SEC;
/// The upper half of the port space, where clients' own ephemeral ports lie (Linux 32768-60999,
/// Windows and macOS 49152-65535), so a client's port is kept (RFC 4787 REQ-1 with port
/// preservation). The daemon moves the gateway's own `ip_local_port_range` below it.
pub const DEFAULT_NAT_PORT_MIN: u16 = 32_768;
pub const DEFAULT_NAT_PORT_MAX: u16 = 65_535;

/// TCP header flag bits (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[inline(always)]
fn or_default(value: u64, default: u64) -> u64 {
    if value == 0 { default } else { value }
}

/// How long a flow may stay idle, by protocol and state. A zero setting means the default.
#[inline(always)]
pub fn flow_timeout_ns(entry: &FlowEntry, protocol: u8, settings: &Settings) -> u64 {
    match protocol {
        PROTOCOL_TCP => match tcp_phase(entry.state, entry.flags) {
            FLOW_STATE_NEW => or_default(settings.tcp_syn_timeout_ns, DEFAULT_TCP_SYN_TIMEOUT_NS),
            FLOW_STATE_ESTABLISHED => or_default(
                settings.tcp_established_timeout_ns,
                DEFAULT_TCP_ESTABLISHED_TIMEOUT_NS,
            ),
            _ => or_default(
                settings.tcp_closing_timeout_ns,
                DEFAULT_TCP_CLOSING_TIMEOUT_NS,
            ),
        },
        PROTOCOL_UDP => or_default(settings.udp_timeout_ns, DEFAULT_UDP_TIMEOUT_NS),
        PROTOCOL_UDP_HAIRPIN => or_default(settings.udp_timeout_ns, DEFAULT_UDP_TIMEOUT_NS),
        // ICMP echo, and anything else that ever ends up in the table.
        _ => or_default(settings.icmp_timeout_ns, DEFAULT_ICMP_TIMEOUT_NS),
    }
}

/// The TCP state that decides a timeout: the recorded state, raised to what the flags (set
/// atomically, never lost) prove, so a state written late by another CPU cannot lower it.
#[inline(always)]
pub fn tcp_phase(state: u8, flags: u8) -> u8 {
    let proven = if flags & (FLOW_FLAG_CLIENT_FIN | FLOW_FLAG_REMOTE_FIN | FLOW_FLAG_RESET) != 0 {
        FLOW_STATE_CLOSING
    } else if flags & FLOW_FLAG_ANSWERED != 0 {
        FLOW_STATE_ESTABLISHED
    } else {
        FLOW_STATE_NEW
    };
    if state > proven { state } else { proven }
}

/// A TCP flow that is over (reset, or FIN from both ends): its translated port may go to a
/// new flow once the range is crowded.
#[inline(always)]
pub fn flow_over(flags: u8) -> bool {
    let both_fins = FLOW_FLAG_CLIENT_FIN | FLOW_FLAG_REMOTE_FIN;
    flags & FLOW_FLAG_RESET != 0 || flags & both_fins == both_fins
}

/// A window in bytes: `raw` shifted by the sender's announced scale, when both ends announced
/// one (RFC 7323); unscaled otherwise. Shifts above 14 are taken as 14.
#[inline(always)]
pub fn scaled_window(raw: u16, own_scale: u8, other_scale: u8) -> u32 {
    if own_scale == WSCALE_NONE || other_scale == WSCALE_NONE {
        return u32::from(raw);
    }
    let shift = if own_scale > 14 { 14 } else { own_scale };
    u32::from(raw) << shift
}

/// Whether an RST with sequence number `seq` may change a flow's state (the window check of
/// RFC 5961 section 3, which a NAT applies before it lets an RST end anything): an exact match with `next`, the receiver's next expected sequence number,
/// always counts; otherwise it must lie within the receiver's window `window` (bytes) after
/// `next`. Out of window, the RST is passed on (the receiver judges it) but the flow stays.
#[inline(always)]
pub fn rst_in_window(seq: u32, next: u32, window: u32) -> bool {
    seq == next || seq.wrapping_sub(next) < window
}

/// Whether the flow has been idle longer than its timeout at `now_ns` (`bpf_ktime_get_ns`,
/// i.e. CLOCK_MONOTONIC). A `last_seen_ns` in the future (another CPU just touched the flow)
/// counts as idle for zero time.
#[inline(always)]
pub fn flow_expired(entry: &FlowEntry, protocol: u8, settings: &Settings, now_ns: u64) -> bool {
    flow_expired_with_replies(entry, 0, protocol, settings, now_ns)
}

/// [`flow_expired`], with the flow's last reply (`ReverseEntry::last_reply_ns`, which ordinary
/// replies update instead of the flow) counting as activity too.
#[inline(always)]
pub fn flow_expired_with_replies(
    entry: &FlowEntry,
    last_reply_ns: u64,
    protocol: u8,
    settings: &Settings,
    now_ns: u64,
) -> bool {
    let last = if last_reply_ns > entry.last_seen_ns {
        last_reply_ns
    } else {
        entry.last_seen_ns
    };
    now_ns.saturating_sub(last) > flow_timeout_ns(entry, protocol, settings)
}

/// The translated port range `(min, max)`, host order, inclusive. A zero or inverted range in
/// `settings` means the default.
#[inline(always)]
pub fn nat_port_range(settings: &Settings) -> (u16, u16) {
    let (min, max) = (settings.nat_port_min, settings.nat_port_max);
    if min == 0 || max < min {
        (DEFAULT_NAT_PORT_MIN, DEFAULT_NAT_PORT_MAX)
    } else {
        (min, max)
    }
}

/// A destination the data plane never balances: multicast (224.0.0.0/4), the limited broadcast
/// 255.255.255.255, and link-local 169.254.0.0/16. `addr` is network order, as in the packet.
#[inline(always)]
pub fn is_non_unicast_destination(addr: u32) -> bool {
    let host = u32::from_be(addr);
    host >> 28 == 0xe || host == u32::MAX || host >> 16 == 0xa9fe
}

/// A source no uplink could answer: 0.0.0.0 (DHCP discovery) and link-local 169.254.0.0/16.
/// Network order.
#[inline(always)]
pub fn is_unroutable_source(addr: u32) -> bool {
    let host = u32::from_be(addr);
    host == 0 || host >> 16 == 0xa9fe
}

/// Whether an untranslated packet arriving on an uplink starts a connection whose LAN-side
/// replies must go back out of that uplink (`INBOUND`): a TCP SYN (not a SYN-ACK, which
/// answers the gateway's own connect), or UDP to a port the host's firewall forwards
/// (`udp_forwarded`, from `FORWARDED_UDP_PORTS`). Any other UDP datagram is unsolicited
/// or a reply to the gateway's own sockets: recording it would let a spoofed source take a LAN
/// client's own new flows to that remote end for replies and send them out untranslated.
#[inline(always)]
pub fn starts_inbound(protocol: u8, tcp_flags: u8, udp_forwarded: bool) -> bool {
    match protocol {
        PROTOCOL_TCP => tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN,
        PROTOCOL_UDP => udp_forwarded,
        _ => false,
    }
}

/// How long an inbound connection without LAN-side replies keeps its uplink: the established
/// TCP or the UDP timeout.
#[inline(always)]
pub fn inbound_timeout_ns(protocol: u8, settings: &Settings) -> u64 {
    if protocol == PROTOCOL_TCP {
        or_default(
            settings.tcp_established_timeout_ns,
            DEFAULT_TCP_ESTABLISHED_TIMEOUT_NS,
        )
    } else {
        or_default(settings.udp_timeout_ns, DEFAULT_UDP_TIMEOUT_NS)
    }
}

/// `skb->mark` steered to an uplink: the balancer's bits (`MARK_MASK`) replaced by the uplink's
/// mark, every other bit kept for whoever else uses marks on the gateway.
#[inline(always)]
pub fn steered_mark(skb_mark: u32, uplink_mark: u32) -> u32 {
    (skb_mark & !MARK_MASK) | (uplink_mark & MARK_MASK)
}

/// Fills `schedule` with one cycle of smooth weighted round robin (nginx's algorithm: the
/// heaviest uplink never gets a long run of consecutive flows) over `(id, weight)` pairs and
/// returns how many slots it used; write that to `SCHEDULE_LENGTH`. Weights are reduced by their
/// greatest common divisor; if they still sum to more than the slots available, they are scaled
/// down proportionally, each kept at least 1. Zero weights and more than 256 uplinks are
/// skipped.
pub fn smooth_weighted_schedule(uplinks: &[(u32, u32)], schedule: &mut [u32]) -> usize {
    const MAX: usize = 256;
    let mut weights = [0u64; MAX];
    let mut count = 0;
    let mut divisor = 0u64;
    for &(_, weight) in uplinks.iter().take(MAX) {
        weights[count] = u64::from(weight);
        divisor = gcd(divisor, u64::from(weight));
        count += 1;
    }
    let active = weights[..count]
        .iter()
        .filter(|&&weight| weight > 0)
        .count() as u64;
    if divisor == 0 || schedule.len() < active as usize {
        return 0;
    }
    let mut total: u64 = weights[..count].iter().map(|weight| weight / divisor).sum();
    let room = schedule.len() as u64;
    let scale = total > room;
    let budget = room - active;
    let original_total = total;
    total = 0;
    for weight in &mut weights[..count] {
        if *weight == 0 {
            continue;
        }
        *weight /= divisor;
        if scale {
            *weight = (*weight * budget / original_total).max(1);
        }
        total += *weight;
    }
    let mut current = [0i64; MAX];
    for slot in schedule.iter_mut().take(total as usize) {
        let mut best = usize::MAX;
        for index in 0..count {
            if weights[index] == 0 {
                continue;
            }
            current[index] += weights[index] as i64;
            if best == usize::MAX || current[index] > current[best] {
                best = index;
            }
        }
        current[best] -= total as i64;
        *slot = uplinks[best].0;
    }
    total as usize
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// `(state, flags)` after a packet of the flow. `tcp_flags` is ignored for UDP and ICMP;
/// `from_remote` is true for replies (uplink ingress).
#[inline(always)]
pub fn flow_after_packet(
    protocol: u8,
    state: u8,
    flags: u8,
    tcp_flags: u8,
    from_remote: bool,
) -> (u8, u8) {
    let answered = if from_remote { FLOW_FLAG_ANSWERED } else { 0 };
    if protocol != PROTOCOL_TCP {
        let state = if from_remote && state == FLOW_STATE_NEW {
            FLOW_STATE_ESTABLISHED
        } else {
            state
        };
        return (state, flags | answered);
    }
    if tcp_flags & TCP_RST != 0 {
        // Closing, never ended outright (RFC 7857 section 2.3): a stray RST must not cut a
        // connection whose endpoints go on; the closing timeout ends it if they do not.
        return (FLOW_STATE_CLOSING, flags | FLOW_FLAG_RESET | answered);
    }
    let pure_syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if !from_remote && pure_syn && (state == FLOW_STATE_CLOSING || state == FLOW_STATE_CLOSED) {
        // The client reuses the port pair after a close (TIME_WAIT reuse): a fresh connection
        // on the same uplink and translated port, so the remote sees a consistent peer.
        return (FLOW_STATE_NEW, flags & FLOW_FLAG_FORCED);
    }
    if tcp_flags & TCP_FIN != 0 {
        let fin = if from_remote {
            FLOW_FLAG_REMOTE_FIN
        } else {
            FLOW_FLAG_CLIENT_FIN
        };
        return (FLOW_STATE_CLOSING, flags | fin | answered);
    }
    let state = if from_remote && state == FLOW_STATE_NEW {
        FLOW_STATE_ESTABLISHED
    } else {
        state
    };
    (state, flags | answered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::PROTOCOL_ICMP;

    fn entry(state: u8, last_seen_ns: u64) -> FlowEntry {
        FlowEntry {
            state,
            last_seen_ns,
            ..FlowEntry::default()
        }
    }

    #[test]
    fn zeroed_settings_use_defaults() {
        let zero = Settings::default();
        let cases = [
            (PROTOCOL_TCP, FLOW_STATE_NEW, DEFAULT_TCP_SYN_TIMEOUT_NS),
            (
                PROTOCOL_TCP,
                FLOW_STATE_ESTABLISHED,
                DEFAULT_TCP_ESTABLISHED_TIMEOUT_NS,
            ),
            (
                PROTOCOL_TCP,
                FLOW_STATE_CLOSING,
                DEFAULT_TCP_CLOSING_TIMEOUT_NS,
            ),
            (
                PROTOCOL_TCP,
                FLOW_STATE_CLOSED,
                DEFAULT_TCP_CLOSING_TIMEOUT_NS,
            ),
            (PROTOCOL_UDP, FLOW_STATE_NEW, DEFAULT_UDP_TIMEOUT_NS),
            (
                PROTOCOL_ICMP,
                FLOW_STATE_ESTABLISHED,
                DEFAULT_ICMP_TIMEOUT_NS,
            ),
        ];
        for (protocol, state, want) in cases {
            assert_eq!(flow_timeout_ns(&entry(state, 0), protocol, &zero), want);
        }
        assert_eq!(nat_port_range(&zero), (32_768, 65_535));
    }

    #[test]
    fn settings_override_defaults() {
        let settings = Settings {
            nat_port_min: 40_000,
            nat_port_max: 40_001,
            tcp_syn_timeout_ns: 1,
            tcp_established_timeout_ns: 2,
            tcp_closing_timeout_ns: 3,
            udp_timeout_ns: 4,
            icmp_timeout_ns: 5,
            ..Settings::default()
        };
        let timeout = |protocol, state| flow_timeout_ns(&entry(state, 0), protocol, &settings);
        assert_eq!(timeout(PROTOCOL_TCP, FLOW_STATE_NEW), 1);
        assert_eq!(timeout(PROTOCOL_TCP, FLOW_STATE_ESTABLISHED), 2);
        assert_eq!(timeout(PROTOCOL_TCP, FLOW_STATE_CLOSING), 3);
        assert_eq!(timeout(PROTOCOL_UDP, FLOW_STATE_NEW), 4);
        assert_eq!(timeout(PROTOCOL_ICMP, FLOW_STATE_NEW), 5);
        assert_eq!(nat_port_range(&settings), (40_000, 40_001));
        let inverted = Settings {
            nat_port_min: 2,
            nat_port_max: 1,
            ..settings
        };
        assert_eq!(nat_port_range(&inverted), (32_768, 65_535));
    }

    #[test]
    fn expiry_is_strictly_after_the_timeout() {
        let settings = Settings {
            udp_timeout_ns: 100,
            ..Settings::default()
        };
        let flow = entry(FLOW_STATE_NEW, 1_000);
        assert!(!flow_expired(&flow, PROTOCOL_UDP, &settings, 500));
        assert!(!flow_expired(&flow, PROTOCOL_UDP, &settings, 1_100));
        assert!(flow_expired(&flow, PROTOCOL_UDP, &settings, 1_101));
    }

    #[test]
    fn marks_keep_foreign_bits() {
        assert_eq!(steered_mark(0x0300_1234, 0x0100_0000), 0x0100_1234);
        assert_eq!(steered_mark(0, 0x02ff_ffff), 0x0200_0000);
    }

    #[test]
    fn smooth_schedules() {
        let mut out = [0u32; 1024];
        let len = smooth_weighted_schedule(&[(1, 2), (2, 2), (3, 1)], &mut out);
        assert_eq!(&out[..len], &[1, 2, 3, 1, 2]);
        let len = smooth_weighted_schedule(&[(1, 50), (2, 30), (3, 0)], &mut out);
        assert_eq!(&out[..len], &[1, 2, 1, 1, 2, 1, 2, 1]);
        assert_eq!(smooth_weighted_schedule(&[(1, 0)], &mut out), 0);
        assert_eq!(smooth_weighted_schedule(&[], &mut out), 0);
        // Too many slots for the table: scaled, every uplink keeps at least one slot.
        let mut small = [0u32; 10];
        let len = smooth_weighted_schedule(&[(1, 1000), (2, 999), (3, 1)], &mut small);
        assert!(len <= 10);
        for id in 1..=3 {
            assert!(small[..len].contains(&id), "{id} missing from {small:?}");
        }
    }

    #[test]
    fn tcp_transitions() {
        use FLOW_STATE_CLOSED as CLOSED;
        use FLOW_STATE_CLOSING as CLOSING;
        use FLOW_STATE_ESTABLISHED as EST;
        use FLOW_STATE_NEW as NEW;
        let cases = [
            // (state, flags, tcp flags, from remote) -> (state, flags)
            ((NEW, 0, TCP_SYN, false), (NEW, 0)),
            ((NEW, 0, TCP_SYN | TCP_ACK, true), (EST, FLOW_FLAG_ANSWERED)),
            ((EST, 1, TCP_ACK, false), (EST, 1)),
            (
                (EST, 1, TCP_FIN | TCP_ACK, false),
                (CLOSING, 1 | FLOW_FLAG_CLIENT_FIN),
            ),
            (
                (CLOSING, 3, TCP_FIN | TCP_ACK, true),
                (CLOSING, 3 | FLOW_FLAG_REMOTE_FIN),
            ),
            ((EST, 1, TCP_RST, true), (CLOSING, 1 | FLOW_FLAG_RESET)),
            (
                (CLOSING, 9, TCP_FIN, false),
                (CLOSING, 9 | FLOW_FLAG_CLIENT_FIN),
            ),
            (
                (CLOSING, 9 | FLOW_FLAG_FORCED, TCP_SYN, false),
                (NEW, FLOW_FLAG_FORCED),
            ),
            (
                (CLOSED, 9 | FLOW_FLAG_FORCED, TCP_SYN, false),
                (NEW, FLOW_FLAG_FORCED),
            ),
            ((CLOSING, 3, TCP_SYN | TCP_ACK, true), (CLOSING, 3)),
        ];
        for ((state, flags, tcp, remote), want) in cases {
            assert_eq!(
                flow_after_packet(PROTOCOL_TCP, state, flags, tcp, remote),
                want,
                "{state} {flags:#x} {tcp:#x} remote={remote}"
            );
        }
    }

    #[test]
    fn udp_and_icmp_are_established_by_a_reply() {
        for protocol in [PROTOCOL_UDP, PROTOCOL_ICMP] {
            assert_eq!(
                flow_after_packet(protocol, FLOW_STATE_NEW, 0, 0xff, false),
                (FLOW_STATE_NEW, 0)
            );
            assert_eq!(
                flow_after_packet(protocol, FLOW_STATE_NEW, 0, 0, true),
                (FLOW_STATE_ESTABLISHED, FLOW_FLAG_ANSWERED)
            );
        }
    }

    fn net(a: u8, b: u8, c: u8, d: u8) -> u32 {
        u32::from_ne_bytes([a, b, c, d])
    }

    #[test]
    fn non_unicast_addresses() {
        for (addr, non_unicast) in [
            (net(224, 0, 0, 251), true),
            (net(239, 255, 255, 250), true),
            (net(255, 255, 255, 255), true),
            (net(169, 254, 1, 2), true),
            (net(198, 18, 9, 1), false),
            (net(240, 0, 0, 1), false),
            (net(198, 18, 0, 255), false),
        ] {
            assert_eq!(is_non_unicast_destination(addr), non_unicast, "{addr:#x}");
        }
        assert!(is_unroutable_source(net(0, 0, 0, 0)));
        assert!(is_unroutable_source(net(169, 254, 7, 7)));
        assert!(!is_unroutable_source(net(198, 18, 0, 11)));
    }

    #[test]
    fn what_starts_an_inbound_connection() {
        assert!(starts_inbound(PROTOCOL_TCP, TCP_SYN, false));
        assert!(
            !starts_inbound(PROTOCOL_TCP, TCP_SYN | TCP_ACK, false),
            "a SYN-ACK answers the gateway's own connect"
        );
        assert!(!starts_inbound(PROTOCOL_TCP, TCP_ACK, false));
        assert!(starts_inbound(PROTOCOL_UDP, 0, true), "a forwarded port");
        assert!(
            !starts_inbound(PROTOCOL_UDP, 0, false),
            "unsolicited, or a reply to the gateway's own socket"
        );
        assert!(!starts_inbound(PROTOCOL_ICMP, 0, true));
        assert_eq!(
            inbound_timeout_ns(PROTOCOL_UDP, &Settings::default()),
            DEFAULT_UDP_TIMEOUT_NS
        );
    }

    #[test]
    fn rsts_count_only_within_the_window() {
        // Exact match always; within the window after `next`; not before it, not beyond.
        assert!(rst_in_window(1000, 1000, 0));
        assert!(rst_in_window(1500, 1000, 1000));
        assert!(!rst_in_window(2000, 1000, 1000));
        assert!(!rst_in_window(999, 1000, 1000));
        assert!(rst_in_window(5, u32::MAX - 5, 100), "across the wrap");
        assert_eq!(scaled_window(1000, 7, 2), 128_000);
        assert_eq!(
            scaled_window(1000, 7, WSCALE_NONE),
            1000,
            "scaling needs both ends"
        );
        assert_eq!(scaled_window(1, 20, 0), 1 << 14);
    }

    #[test]
    fn the_flags_keep_the_phase_from_going_backwards() {
        use crate::flow::FLOW_FLAG_ANSWERED as ANSWERED;
        assert_eq!(tcp_phase(FLOW_STATE_NEW, 0), FLOW_STATE_NEW);
        assert_eq!(tcp_phase(FLOW_STATE_NEW, ANSWERED), FLOW_STATE_ESTABLISHED);
        assert_eq!(
            tcp_phase(FLOW_STATE_ESTABLISHED, ANSWERED | FLOW_FLAG_REMOTE_FIN),
            FLOW_STATE_CLOSING,
            "a FIN recorded in the flags wins over a state written late"
        );
        assert!(flow_over(FLOW_FLAG_RESET));
        assert!(flow_over(FLOW_FLAG_CLIENT_FIN | FLOW_FLAG_REMOTE_FIN));
        assert!(!flow_over(FLOW_FLAG_CLIENT_FIN | ANSWERED));
    }
}
