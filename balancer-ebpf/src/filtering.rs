//! Endpoint-independent filtering (RFC 4787 REQ-8, "full cone"), when the config asks for it:
//! a UDP packet from any remote to a LAN endpoint's live mapping (uplink address, translated
//! port) that no flow answers creates an unsolicited flow for that endpoint and that remote,
//! and reaches the endpoint. The flow lives in the pending pair (an inbound flood evicts only
//! unanswered flows, and takes no port: the mapping holds it already) until the client
//! answers, and one endpoint gets at most `UNSOLICITED_FLOWS_PER_SECOND` new ones a second, so
//! a flood toward one mapping cannot churn that table faster than ordinary traffic. The
//! default, address-and-port-dependent filtering admits nothing here. TCP stays address-and-
//! port dependent in both modes. Asked only for packets that matched no flow.

use balancer_common::{
    counters::{COUNTER_UNSOLICITED_ADMITTED, COUNTER_UNSOLICITED_REFUSED},
    flow::{FlowKey, MappingKey, PROTOCOL_UDP, PROTOCOL_UDP_HAIRPIN, ReverseEntry, ReverseKey},
    maps::UNSOLICITED_FLOWS_PER_SECOND,
    uplink::FILTERING_ENDPOINT_INDEPENDENT,
};

use crate::{
    flow, mapping,
    maps::{FORWARDED_UDP_PORTS, SETTINGS, UNSOLICITED_BUDGET, UPLINKS, bump},
};

/// The unsolicited flow's reverse entry for packet `reverse` (as it arrived, or as a hairpinned
/// packet would have), if the filtering admits it.
#[inline(always)]
pub fn admit(reverse: &ReverseKey) -> Option<*mut ReverseEntry> {
    if reverse.protocol != PROTOCOL_UDP && reverse.protocol != PROTOCOL_UDP_HAIRPIN {
        return None;
    }
    let settings = SETTINGS.get(0)?;
    if settings.filtering != FILTERING_ENDPOINT_INDEPENDENT {
        return None;
    }
    // A port the host forwards belongs to the forward (it is never mapped anyway).
    // SAFETY: the value is a plain u8 and only its presence is used.
    if unsafe { FORWARDED_UDP_PORTS.get(&reverse.nat_port) }.is_some() {
        return None;
    }
    let now = crate::clock::now_ns();
    let port = mapping::port_key(reverse.uplink_addr, reverse.nat_port);
    let (endpoint, held) = mapping::endpoint_at(&port, settings, now)?;
    let id = u32::from(held.uplink_id);
    let uplink = UPLINKS.get(id)?;
    if !within_budget(&endpoint, now) {
        bump(COUNTER_UNSOLICITED_REFUSED, 1);
        return None;
    }
    let key = FlowKey {
        client_addr: endpoint.client_addr,
        remote_addr: reverse.remote_addr,
        client_port: endpoint.client_port,
        remote_port: reverse.remote_port,
        protocol: reverse.protocol,
        _pad: [0; 3],
    };
    let created = flow::create_at(&key, reverse, id, uplink, true, now)?;
    bump(COUNTER_UNSOLICITED_ADMITTED, 1);
    Some(created)
}

/// Counts one more unsolicited flow for `endpoint` this second; false once it had its share.
#[inline(always)]
fn within_budget(endpoint: &MappingKey, now: u64) -> bool {
    let second = (now / 1_000_000_000) as u32;
    let (window, used) = match UNSOLICITED_BUDGET.get_ptr(endpoint) {
        // SAFETY: a successful lookup returns a pointer to the value; copied out at once.
        Some(value) => {
            let value = unsafe { *value };
            ((value >> 32) as u32, value as u32)
        }
        None => (second, 0),
    };
    let used = if window == second { used } else { 0 };
    if used >= UNSOLICITED_FLOWS_PER_SECOND {
        return false;
    }
    // Two CPUs may count one flow once between them: the bound is approximate, which is all a
    // flood limit needs.
    let _ = UNSOLICITED_BUDGET.insert(
        endpoint,
        &((u64::from(second) << 32) | u64::from(used + 1)),
        0,
    );
    true
}
