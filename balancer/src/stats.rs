//! Traffic counters and flow counts, read straight from the data plane's pinned maps, so they
//! answer from any process in the namespace whether the daemon runs or not. Uplink names come
//! from the record the daemon keeps in the state directory (the kernel knows only ids).

use std::{collections::BTreeMap, path::Path};

use aya::maps::{Array, HashMap, PerCpuArray};
use balancer_common::{
    counters::{
        COUNTER_HAIRPINNED, COUNTER_HALVES_REMOVED, COUNTER_MAPPING_COLLISIONS,
        COUNTER_PORT_TAKEOVERS, COUNTER_PROMOTIONS_REFUSED, COUNTER_UNSOLICITED_ADMITTED,
        COUNTER_UNSOLICITED_REFUSED, COUNTERS_MAP,
    },
    flow::{FlowEntry, FlowKey, ReverseEntry, ReverseKey},
    maps as names,
    policy::flow_expired_with_replies,
    stats::{
        REASON_NAMES, REASONS_LEN, UPLINK_COUNTER_FIELDS, UPLINK_NAT_EXHAUSTED, UPLINK_NEW_FLOWS,
        UPLINK_RX_BYTES, UPLINK_RX_PACKETS, UPLINK_TX_BYTES, UPLINK_TX_PACKETS,
    },
    uplink::{Settings, UPLINK_SLOTS, UplinkInfo},
};
use serde::{Deserialize, Serialize};

use crate::dataplane::{DataplaneError, address_of, bpffs::PinDir, open_pinned};

/// Version of the `balancer stats --json` document.
pub const STATS_VERSION: u32 = 1;

/// What the daemon records about each uplink for `stats` (names are not in the kernel).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UplinkName {
    pub id: u32,
    pub name: String,
    pub interface: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error(
        "no data plane is pinned at {path}: the daemon has not run in this network namespace since the last `down`"
    )]
    NotRunning { path: String },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UplinkStats {
    pub id: u32,
    pub name: String,
    pub interface: String,
    pub source: String,
    pub enabled: bool,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Transparent flows assigned to this uplink since the data plane was first attached.
    pub flows: u64,
    /// Flows in the table now that have not timed out.
    pub active_flows: u64,
    pub nat_exhausted: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    pub version: u32,
    pub uplinks: Vec<UplinkStats>,
    /// Entries in the flow and reverse-NAT tables, expired ones included (the sweeper removes
    /// those every few seconds): how full the tables are.
    pub flow_entries: u64,
    pub reverse_entries: u64,
    /// Entries in the pending tables: flows not answered yet (an LRU pair of their own, so
    /// a flood of them never evicts an answered flow).
    pub pending_entries: u64,
    pub pending_reverse_entries: u64,
    /// Halves of unanswered flows found alone (the other half evicted by newer flows) and
    /// removed by the programs.
    pub evictions: u64,
    /// Answered flows that stayed in the pending table because the main one was full.
    pub promotions_refused: u64,
    /// Translated ports taken from a closed TCP flow or from a half left alone.
    pub port_takeovers: u64,
    /// New flows of an endpoint with a mapping that got another port than the mapping's (their
    /// 5-tuple would have collided with another flow's).
    pub mapping_collisions: u64,
    /// Unsolicited flows endpoint-independent filtering let in (a remote's datagram to a LAN
    /// endpoint's mapping that no flow answered).
    pub unsolicited_admitted: u64,
    /// Unsolicited datagrams turned away: their LAN endpoint had its share of new unsolicited
    /// flows this second.
    pub unsolicited_refused: u64,
    /// Packets from one LAN client to another's public mapping, translated and sent back to the
    /// LAN (hairpinning).
    pub hairpinned: u64,
    /// Packets passed untouched or dropped, by reason.
    pub reasons: BTreeMap<String, u64>,
}

/// Where the daemon keeps the uplink names.
pub fn names_path(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("uplinks.json")
}

pub fn read(pins: &PinDir, state_dir: &Path) -> Result<Stats, StatsError> {
    if !pins.exists() {
        return Err(StatsError::NotRunning {
            path: pins.root.display().to_string(),
        });
    }
    let names: Vec<UplinkName> = std::fs::read_to_string(names_path(state_dir))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();

    let uplinks_map = open_pinned(pins, names::UPLINKS)?;
    let uplinks: Array<_, UplinkInfo> =
        Array::try_from(uplinks_map).map_err(map_error(names::UPLINKS))?;
    let counters_map = open_pinned(pins, names::UPLINK_COUNTERS)?;
    let counters: PerCpuArray<_, u64> =
        PerCpuArray::try_from(counters_map).map_err(map_error(names::UPLINK_COUNTERS))?;
    let sum = |map: &PerCpuArray<_, u64>, index: u32| -> Result<u64, StatsError> {
        let values = map
            .get(&index, 0)
            .map_err(map_error(names::UPLINK_COUNTERS))?;
        Ok(values.iter().fold(0u64, |total, v| total.wrapping_add(*v)))
    };

    let settings_map = open_pinned(pins, names::SETTINGS)?;
    let settings: Settings = Array::<_, Settings>::try_from(settings_map)
        .map_err(map_error(names::SETTINGS))?
        .get(&0, 0)
        .map_err(map_error(names::SETTINGS))?;
    let now = monotonic_ns();
    let mut slots: BTreeMap<u32, UplinkInfo> = BTreeMap::new();
    for id in 1..UPLINK_SLOTS {
        let info = uplinks.get(&id, 0).map_err(map_error(names::UPLINKS))?;
        if info.source_addr != 0 {
            slots.insert(id, info);
        }
    }
    // Ordinary replies refresh the reverse half only: a flow whose remote still sends is live.
    let reverse_map = open_pinned(pins, names::NAT_REVERSE)?;
    let reverse: HashMap<_, ReverseKey, ReverseEntry> =
        HashMap::try_from(reverse_map).map_err(map_error(names::NAT_REVERSE))?;
    let mut last_reply: std::collections::HashMap<FlowKey, u64> = std::collections::HashMap::new();
    let mut reverse_entries = 0u64;
    for (_, value) in reverse.iter().filter_map(Result::ok) {
        reverse_entries += 1;
        last_reply.insert(value.flow, value.last_reply_ns);
    }
    let mut active: BTreeMap<u32, u64> = BTreeMap::new();
    let flows_map = open_pinned(pins, names::FLOWS)?;
    let flows: HashMap<_, FlowKey, FlowEntry> =
        HashMap::try_from(flows_map).map_err(map_error(names::FLOWS))?;
    let mut flow_entries = 0;
    for (key, entry) in flows.iter().filter_map(Result::ok) {
        flow_entries += 1;
        let id = u32::from(entry.uplink_id);
        let live = slots
            .get(&id)
            .is_some_and(|info| info.generation == entry.uplink_generation)
            && !flow_expired_with_replies(
                &entry,
                last_reply.get(&key).copied().unwrap_or(0),
                key.protocol,
                &settings,
                now,
            );
        if live {
            *active.entry(id).or_default() += 1;
        }
    }

    let mut result = Vec::new();
    for (id, info) in &slots {
        let field = |f: u32| id * UPLINK_COUNTER_FIELDS + f;
        let known = names.iter().find(|n| n.id == *id);
        result.push(UplinkStats {
            id: *id,
            name: known.map_or_else(|| format!("uplink-{id}"), |n| n.name.clone()),
            interface: known.map(|n| n.interface.clone()).unwrap_or_default(),
            source: address_of(info.source_addr).to_string(),
            enabled: info.enabled == 1,
            tx_packets: sum(&counters, field(UPLINK_TX_PACKETS))?,
            tx_bytes: sum(&counters, field(UPLINK_TX_BYTES))?,
            rx_packets: sum(&counters, field(UPLINK_RX_PACKETS))?,
            rx_bytes: sum(&counters, field(UPLINK_RX_BYTES))?,
            flows: sum(&counters, field(UPLINK_NEW_FLOWS))?,
            active_flows: active.get(id).copied().unwrap_or(0),
            nat_exhausted: sum(&counters, field(UPLINK_NAT_EXHAUSTED))?,
        });
    }

    let pending_entries = count_entries::<FlowKey, FlowEntry>(pins, names::PENDING_FLOWS)?;
    let pending_reverse_entries =
        count_entries::<ReverseKey, ReverseEntry>(pins, names::PENDING_REVERSE)?;
    let counters_map = open_pinned(pins, COUNTERS_MAP)?;
    let lan_counters: PerCpuArray<_, u64> =
        PerCpuArray::try_from(counters_map).map_err(map_error(COUNTERS_MAP))?;

    let reasons_map = open_pinned(pins, names::REASONS)?;
    let reasons_array: PerCpuArray<_, u64> =
        PerCpuArray::try_from(reasons_map).map_err(map_error(names::REASONS))?;
    let mut reasons = BTreeMap::new();
    for index in 0..REASONS_LEN {
        reasons.insert(
            REASON_NAMES[index as usize].to_string(),
            sum(&reasons_array, index)?,
        );
    }
    Ok(Stats {
        version: STATS_VERSION,
        uplinks: result,
        flow_entries,
        reverse_entries,
        pending_entries,
        pending_reverse_entries,
        evictions: sum(&lan_counters, COUNTER_HALVES_REMOVED)?,
        promotions_refused: sum(&lan_counters, COUNTER_PROMOTIONS_REFUSED)?,
        port_takeovers: sum(&lan_counters, COUNTER_PORT_TAKEOVERS)?,
        mapping_collisions: sum(&lan_counters, COUNTER_MAPPING_COLLISIONS)?,
        unsolicited_admitted: sum(&lan_counters, COUNTER_UNSOLICITED_ADMITTED)?,
        unsolicited_refused: sum(&lan_counters, COUNTER_UNSOLICITED_REFUSED)?,
        hairpinned: sum(&lan_counters, COUNTER_HAIRPINNED)?,
        reasons,
    })
}

/// How many entries the pinned hash map `name` holds.
fn count_entries<K: aya::Pod, V: aya::Pod>(
    pins: &PinDir,
    name: &'static str,
) -> Result<u64, StatsError> {
    let map: HashMap<_, K, V> =
        HashMap::try_from(open_pinned(pins, name)?).map_err(map_error(name))?;
    Ok(map.iter().filter_map(Result::ok).count() as u64)
}

/// `bpf_ktime_get_ns()` is CLOCK_MONOTONIC: the same clock, so timeouts compare.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            (t.tv_sec() as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(t.tv_nsec() as u64)
        })
        .unwrap_or(0)
}

fn map_error(map: &'static str) -> impl Fn(aya::maps::MapError) -> StatsError {
    move |source| {
        StatsError::Dataplane(DataplaneError::Map {
            map,
            source: Box::new(source),
        })
    }
}

/// The table `balancer stats` prints.
pub fn table(stats: &Stats) -> String {
    let mut out = format!(
        "{:<12} {:<10} {:<16} {:>4} {:>12} {:>14} {:>12} {:>14} {:>9} {:>8}\n",
        "UPLINK",
        "INTERFACE",
        "SOURCE",
        "ON",
        "TX PACKETS",
        "TX BYTES",
        "RX PACKETS",
        "RX BYTES",
        "FLOWS",
        "ACTIVE"
    );
    for u in &stats.uplinks {
        out.push_str(&format!(
            "{:<12} {:<10} {:<16} {:>4} {:>12} {:>14} {:>12} {:>14} {:>9} {:>8}\n",
            u.name,
            u.interface,
            u.source,
            if u.enabled { "yes" } else { "no" },
            u.tx_packets,
            u.tx_bytes,
            u.rx_packets,
            u.rx_bytes,
            u.flows,
            u.active_flows
        ));
    }
    out.push_str(&format!(
        "flow table: {} entries, reverse NAT: {} entries; pending (unanswered): {} flows, {} reverse\n",
        stats.flow_entries, stats.reverse_entries, stats.pending_entries, stats.pending_reverse_entries
    ));
    out.push_str(&format!(
        "evictions: {}, promotions refused (table full): {}, port takeovers: {}, mapping collisions: {}\n",
        stats.evictions, stats.promotions_refused, stats.port_takeovers, stats.mapping_collisions
    ));
    out.push_str(&format!(
        "unsolicited flows admitted (endpoint-independent filtering): {}, refused (over 64/s for one endpoint): {}, hairpinned packets: {}\n",
        stats.unsolicited_admitted, stats.unsolicited_refused, stats.hairpinned
    ));
    let noted: Vec<String> = stats
        .reasons
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    if !noted.is_empty() {
        out.push_str(&format!("passed/dropped: {}\n", noted.join(" ")));
    }
    out
}
