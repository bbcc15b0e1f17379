//! Endpoint-independent mapping (RFC 4787 REQ-1, RFC 5382 REQ-1): the flows of one LAN
//! endpoint (address, port, protocol) leave by one uplink with one translated port, whatever
//! their destination, so a peer-to-peer application's address learned from one server (STUN)
//! is the one every other peer sees. Consulted and written only when a flow is created, and
//! (endpoint-independent filtering, hairpinning) when a packet to an uplink address matches no
//! flow: `MAPPING_PORTS` then finds the endpoint a translated port belongs to.

use balancer_common::{
    counters::COUNTER_MAPPING_COLLISIONS,
    flow::{
        FlowKey, MappingEntry, MappingKey, MappingPortEntry, MappingPortKey, PROTOCOL_TCP,
        PROTOCOL_UDP,
    },
    policy::DEFAULT_UDP_TIMEOUT_NS,
    uplink::{FILTERING_ENDPOINT_INDEPENDENT, Settings},
};

use crate::{
    flow,
    maps::{MAPPING_PORTS, MAPPINGS, UPLINKS, bump},
};

/// The endpoint's key in `MAPPINGS`, or `None` for flows without one (ICMP echo).
#[inline(always)]
pub fn key_of(key: &FlowKey) -> Option<MappingKey> {
    if key.protocol != PROTOCOL_TCP && key.protocol != PROTOCOL_UDP {
        return None;
    }
    Some(MappingKey {
        client_addr: key.client_addr,
        client_port: key.client_port,
        protocol: key.protocol,
        _pad: 0,
    })
}

/// The endpoint's mapping if a new flow should follow it: its uplink is unchanged and in the
/// rotation, and a flow made with it is recent or still lives. A flow started while the
/// mapping's uplink is out of the rotation gets a new mapping elsewhere.
#[inline(always)]
pub fn find(
    endpoint: &MappingKey,
    key: &FlowKey,
    settings: &Settings,
    now_ns: u64,
) -> Option<MappingEntry> {
    // SAFETY: a successful lookup returns a pointer to the value; copied out at once.
    let mapping = unsafe { *MAPPINGS.get_ptr(endpoint)? };
    let uplink = UPLINKS.get(u32::from(mapping.uplink_id))?;
    if uplink.source_addr == 0
        || uplink.enabled != 1
        || uplink.generation != mapping.uplink_generation
    {
        return None;
    }
    let lifetime = if key.protocol == PROTOCOL_TCP {
        settings.tcp_established_timeout_ns
    } else {
        settings.udp_timeout_ns
    };
    if now_ns.saturating_sub(mapping.last_flow_ns) < lifetime || anchor_lives(endpoint, &mapping) {
        Some(mapping)
    } else {
        None
    }
}

/// Whether the flow the mapping was last used for is still in the tables with its translation.
#[inline(always)]
fn anchor_lives(endpoint: &MappingKey, mapping: &MappingEntry) -> bool {
    let anchor = FlowKey {
        client_addr: endpoint.client_addr,
        remote_addr: mapping.anchor_remote_addr,
        client_port: endpoint.client_port,
        remote_port: mapping.anchor_remote_port,
        protocol: endpoint.protocol,
        _pad: [0; 3],
    };
    // SAFETY: a successful lookup returns a pointer to the value; read at once.
    flow::lookup(&anchor).is_some_and(|entry| unsafe {
        (*entry).nat_port == mapping.nat_port && (*entry).uplink_id == mapping.uplink_id
    })
}

/// How long a UDP mapping lives after its last new flow: the UDP timeout (zero: the default).
#[inline(always)]
fn udp_lifetime(settings: &Settings) -> u64 {
    if settings.udp_timeout_ns == 0 {
        DEFAULT_UDP_TIMEOUT_NS
    } else {
        settings.udp_timeout_ns
    }
}

/// The key of `MAPPING_PORTS` for UDP port `nat_port` on `uplink_addr`.
#[inline(always)]
pub fn port_key(uplink_addr: u32, nat_port: u16) -> MappingPortKey {
    MappingPortKey {
        uplink_addr,
        nat_port,
        protocol: PROTOCOL_UDP,
        _pad: 0,
    }
}

/// The LAN endpoint whose live UDP mapping is `port`, and that mapping: what a packet from
/// anywhere to that port reaches under endpoint-independent filtering. Its uplink must still
/// have that address and generation; it need not be in the rotation (a blip keeps mappings
/// reachable as it keeps flows).
#[inline(always)]
pub fn endpoint_at(
    port: &MappingPortKey,
    settings: &Settings,
    now_ns: u64,
) -> Option<(MappingKey, MappingEntry)> {
    // SAFETY: successful lookups return pointers to the values; copied out at once.
    let endpoint = unsafe { (*MAPPING_PORTS.get_ptr(port)?).endpoint };
    // SAFETY: as above.
    let mapping = unsafe { *MAPPINGS.get_ptr(&endpoint)? };
    let uplink = UPLINKS.get(u32::from(mapping.uplink_id))?;
    if mapping.nat_port != port.nat_port
        || uplink.source_addr != port.uplink_addr
        || uplink.generation != mapping.uplink_generation
    {
        return None;
    }
    if now_ns.saturating_sub(mapping.last_flow_ns) < udp_lifetime(settings)
        || anchor_lives(&endpoint, &mapping)
    {
        Some((endpoint, mapping))
    } else {
        None
    }
}

/// Whether UDP port `nat_port` on `uplink_addr` may serve `endpoint` under endpoint-independent
/// filtering: no other endpoint took a mapping there within the UDP timeout (a port serves one
/// endpoint per uplink and protocol, or a remote's packet to it could reach either). One lookup
/// and no more: this runs for every candidate of the port search, where the verifier's budget
/// (and the daemon's start-up time) has no room for `endpoint_at`'s whole check. A holder
/// whose only flow outlived the timeout may therefore lose the port to a new endpoint, which
/// then gets the unsolicited packets; the old flow keeps working by its reverse entry.
#[inline(always)]
pub fn port_free_for(
    endpoint: &MappingKey,
    uplink_addr: u32,
    nat_port: u16,
    settings: &Settings,
    now_ns: u64,
) -> bool {
    match MAPPING_PORTS.get_ptr(&port_key(uplink_addr, nat_port)) {
        // SAFETY: a successful lookup returns a pointer to the value; read at once.
        Some(holder) => unsafe {
            (*holder).endpoint == *endpoint
                || now_ns.saturating_sub((*holder).last_flow_ns) >= udp_lifetime(settings)
        },
        None => true,
    }
}

/// Records that flow `key` was created on uplink `id` (generation `generation`, address
/// `uplink_addr`) with translated port `nat_port`. With an existing `mapping` the endpoint
/// keeps it: a flow that had to take another port (its 5-tuple would collide) is counted and
/// changes nothing. Under endpoint-independent filtering a UDP mapping is also indexed by its
/// port (`MAPPING_PORTS`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn record(
    endpoint: &MappingKey,
    key: &FlowKey,
    mapping: Option<MappingEntry>,
    id: u32,
    generation: u32,
    uplink_addr: u32,
    nat_port: u16,
    settings: &Settings,
    now_ns: u64,
) {
    if let Some(mapping) = mapping
        && (mapping.nat_port != nat_port || u32::from(mapping.uplink_id) != id)
    {
        bump(COUNTER_MAPPING_COLLISIONS, 1);
        return;
    }
    let entry = MappingEntry {
        last_flow_ns: now_ns,
        anchor_remote_addr: key.remote_addr,
        anchor_remote_port: key.remote_port,
        nat_port,
        uplink_generation: generation,
        uplink_id: id as u8,
        _pad: [0; 3],
    };
    let _ = MAPPINGS.insert(endpoint, &entry, 0);
    if settings.filtering == FILTERING_ENDPOINT_INDEPENDENT && endpoint.protocol == PROTOCOL_UDP {
        let held = MappingPortEntry {
            endpoint: *endpoint,
            last_flow_ns: now_ns,
        };
        let _ = MAPPING_PORTS.insert(&port_key(uplink_addr, nat_port), &held, 0);
    }
}
