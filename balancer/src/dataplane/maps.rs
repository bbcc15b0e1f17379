//! Writing the data plane's maps from the desired state, sweeping expired flows, and the typed
//! map access both need. Writes are ordered so a program never sees a half-written state.

use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, MapData, MapError,
        lpm_trie::{Key, LpmTrie},
    },
};
use balancer_common::{
    flow::{FlowEntry, FlowKey, ReverseEntry, ReverseKey},
    maps as names,
    uplink::{
        DESTINATION_PASS, DESTINATION_UPLINK_ADDRESS, ScheduleLength, Settings, UPLINK_SLOTS,
        UplinkInfo,
    },
};
use ipnet::Ipv4Net;

use super::{Dataplane, DataplaneError, bpffs::PinDir, desired::DataplaneDesired};

impl Dataplane {
    pub(super) fn write_settings(&mut self, settings: &Settings) -> Result<(), DataplaneError> {
        let mut map: Array<_, Settings> = typed(&mut self.ebpf, names::SETTINGS)?;
        map.set(0, settings, 0)
            .map_err(write_error(names::SETTINGS))
    }

    /// Writes every uplink slot. The generation moves on whenever a slot gets a new address,
    /// which releases the flows pinned to it lazily in the kernel.
    pub(super) fn write_uplinks(
        &mut self,
        desired: &DataplaneDesired,
    ) -> Result<(), DataplaneError> {
        let mut uplinks: Array<_, UplinkInfo> = typed(&mut self.ebpf, names::UPLINKS)?;
        for id in 1..UPLINK_SLOTS {
            let old = uplinks.get(&id, 0).map_err(read_error(names::UPLINKS))?;
            let new = match desired.uplinks.iter().find(|slot| slot.id == id) {
                Some(slot) => UplinkInfo {
                    source_addr: u32::from_ne_bytes(slot.source.octets()),
                    mark: slot.mark,
                    generation: old.generation,
                    ifindex: slot.ifindex,
                    enabled: u8::from(slot.enabled),
                    _pad: 0,
                    mss_max: slot.mss_max,
                },
                None => UplinkInfo {
                    generation: old.generation,
                    ..UplinkInfo::default()
                },
            };
            // Leaving the rotation keeps the flows (`reset::reset_due` releases them once the
            // uplink stays silent), and so does losing the address (an interface deleted, a
            // lease lost): the same address may come back. A new address makes them useless
            // at once (`renumber` also removes them from the maps).
            let released =
                old.source_addr != 0 && new.source_addr != 0 && new.source_addr != old.source_addr;
            let new = UplinkInfo {
                generation: old.generation.wrapping_add(u32::from(released)),
                ..new
            };
            if new != old {
                uplinks
                    .set(id, new, 0)
                    .map_err(write_error(names::UPLINKS))?;
            }
        }
        let mut by_ifindex: HashMap<_, u32, u32> = typed(&mut self.ebpf, names::UPLINK_BY_IFINDEX)?;
        // An uplink whose interface is absent has no hooks (ifindex 0).
        let wanted: BTreeMap<u32, u32> = desired
            .uplinks
            .iter()
            .filter(|slot| slot.ifindex != 0)
            .map(|slot| (slot.ifindex, slot.id))
            .collect();
        let present: Vec<u32> = by_ifindex.keys().filter_map(Result::ok).collect();
        for ifindex in present {
            if !wanted.contains_key(&ifindex) {
                by_ifindex
                    .remove(&ifindex)
                    .map_err(write_error(names::UPLINK_BY_IFINDEX))?;
            }
        }
        for (ifindex, id) in wanted {
            by_ifindex
                .insert(ifindex, id, 0)
                .map_err(write_error(names::UPLINK_BY_IFINDEX))?;
        }
        Ok(())
    }

    pub(super) fn write_destinations(
        &mut self,
        destinations: &[(Ipv4Net, u32)],
    ) -> Result<(), DataplaneError> {
        let mut trie: LpmTrie<_, u32, u32> = typed(&mut self.ebpf, names::DESTINATIONS)?;
        let key = |net: &Ipv4Net| {
            Key::new(
                u32::from(net.prefix_len()),
                u32::from_ne_bytes(net.addr().octets()),
            )
        };
        let wanted: Vec<Key<u32>> = destinations.iter().map(|(net, _)| key(net)).collect();
        let present: Vec<Key<u32>> = trie.keys().filter_map(Result::ok).collect();
        for old in present {
            if !wanted
                .iter()
                .any(|k| k.prefix_len() == old.prefix_len() && k.data() == old.data())
            {
                trie.remove(&old)
                    .map_err(write_error(names::DESTINATIONS))?;
            }
        }
        for (net, action) in destinations {
            trie.insert(&key(net), action, 0)
                .map_err(write_error(names::DESTINATIONS))?;
        }
        Ok(())
    }

    /// Removes the flows that contradict `destinations`: to a destination now passed, or forced
    /// onto another uplink. The programs consult `DESTINATIONS` only for packets without a
    /// live flow, so a flow created before its destination's entry would otherwise go on.
    pub(super) fn remove_flows_against(
        &mut self,
        destinations: &[(Ipv4Net, u32)],
    ) -> Result<usize, DataplaneError> {
        let mut removed = 0;
        for pair in [FlowPair::MAIN, FlowPair::PENDING] {
            let contradicting: Vec<(FlowKey, FlowEntry)> = {
                let flows: HashMap<_, FlowKey, FlowEntry> = typed_ref(&self.ebpf, pair.flows)?;
                flows
                    .iter()
                    .filter_map(Result::ok)
                    .filter(|(key, entry)| {
                        let remote = Ipv4Addr::from(key.remote_addr.to_ne_bytes());
                        contradicts(destinations, remote, entry.uplink_id)
                    })
                    .collect()
            };
            for (key, entry) in &contradicting {
                if self.remove_flow_in(pair, key, entry)? {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Removes answered flow `key` and its reverse half; the latter only while it still
    /// belongs to this flow, since the programs may have handed a closed flow's port to a new
    /// flow meanwhile.
    pub(super) fn remove_flow(
        &mut self,
        key: &FlowKey,
        entry: &FlowEntry,
    ) -> Result<bool, DataplaneError> {
        self.remove_flow_in(FlowPair::MAIN, key, entry)
    }

    /// `remove_flow` for the flow tables `pair`.
    fn remove_flow_in(
        &mut self,
        pair: FlowPair,
        key: &FlowKey,
        entry: &FlowEntry,
    ) -> Result<bool, DataplaneError> {
        let mut flows: HashMap<_, FlowKey, FlowEntry> = typed(&mut self.ebpf, pair.flows)?;
        let removed = flows.remove(key).is_ok();
        let mut reverse: HashMap<_, ReverseKey, ReverseEntry> =
            typed(&mut self.ebpf, pair.reverse)?;
        let half = reverse_key(key, entry);
        if reverse.get(&half, 0).is_ok_and(|owner| owner.flow == *key) {
            let _ = reverse.remove(&half);
        }
        Ok(removed)
    }

    /// Fills the slots first and publishes the length last, so a program never reads a slot
    /// that is not written yet.
    pub(super) fn write_schedule(&mut self, schedule: &[u32]) -> Result<(), DataplaneError> {
        let mut slots: Array<_, u32> = typed(&mut self.ebpf, names::SCHEDULE)?;
        for (index, id) in schedule.iter().enumerate() {
            slots
                .set(index as u32, id, 0)
                .map_err(write_error(names::SCHEDULE))?;
        }
        let mut length: Array<_, ScheduleLength> = typed(&mut self.ebpf, names::SCHEDULE_LENGTH)?;
        length
            .set(
                0,
                ScheduleLength {
                    length: schedule.len() as u32,
                },
                0,
            )
            .map_err(write_error(names::SCHEDULE_LENGTH))
    }

    /// Deletes flows whose timeout has passed (both halves), so their ports are free again, and
    /// reverse entries whose flow is gone or points elsewhere (left by LRU eviction of a pending
    /// flow or a lost race), which would otherwise hold their ports. Answered and pending flows
    /// alike. Returns how many entries it removed.
    pub fn sweep(&mut self, now_ns: u64) -> Result<usize, DataplaneError> {
        let settings = {
            let map: Array<_, Settings> = typed(&mut self.ebpf, names::SETTINGS)?;
            map.get(&0, 0).map_err(read_error(names::SETTINGS))?
        };
        let mut removed = 0;
        for (index, pair) in [FlowPair::MAIN, FlowPair::PENDING].into_iter().enumerate() {
            removed += self.sweep_expired(pair, &settings, now_ns)?;
            let orphans = self.orphans(pair)?;
            // The kernel creates the reverse half first, so a flow being created (or promoted)
            // right now looks like an orphan for a moment: only what was orphaned at the
            // previous sweep too is removed.
            let confirmed: Vec<ReverseKey> = orphans
                .intersection(&self.orphans_seen[index])
                .copied()
                .collect();
            let mut reverse: HashMap<_, ReverseKey, ReverseEntry> =
                typed(&mut self.ebpf, pair.reverse)?;
            for key in &confirmed {
                if reverse.remove(key).is_ok() {
                    removed += 1;
                }
            }
            self.orphans_seen[index] = orphans;
            // Forward halves whose reverse half an LRU evicted: the programs remove such a
            // flow on its next packet, the sweeper when it has none (a flood's flows).
            let lone = self.lone_flows(pair)?;
            let confirmed: Vec<FlowKey> = lone
                .intersection(&self.lone_flows_seen[index])
                .copied()
                .collect();
            let mut flows: HashMap<_, FlowKey, FlowEntry> = typed(&mut self.ebpf, pair.flows)?;
            for key in &confirmed {
                if flows.remove(key).is_ok() {
                    removed += 1;
                }
            }
            self.lone_flows_seen[index] = lone;
        }
        Ok(removed)
    }

    /// Flows of `pair` whose reverse half is not in `pair` (or belongs to another flow).
    fn lone_flows(&self, pair: FlowPair) -> Result<HashSet<FlowKey>, DataplaneError> {
        let flows: HashMap<_, FlowKey, FlowEntry> = typed_ref(&self.ebpf, pair.flows)?;
        let reverse: HashMap<_, ReverseKey, ReverseEntry> = typed_ref(&self.ebpf, pair.reverse)?;
        Ok(flows
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, entry)| {
                reverse
                    .get(&reverse_key(key, entry), 0)
                    .map_or(true, |value| value.flow != *key)
            })
            .map(|(key, _)| key)
            .collect())
    }

    /// Removes the expired flows of `pair`; returns how many.
    fn sweep_expired(
        &mut self,
        pair: FlowPair,
        settings: &Settings,
        now_ns: u64,
    ) -> Result<usize, DataplaneError> {
        // A first filter on the flow's own activity; candidates are checked with their
        // replies below.
        let expired = |key: &FlowKey, entry: &FlowEntry| {
            balancer_common::policy::flow_expired(entry, key.protocol, settings, now_ns)
        };
        let candidates: Vec<FlowKey> = {
            let flows: HashMap<_, FlowKey, FlowEntry> = typed_ref(&self.ebpf, pair.flows)?;
            flows
                .iter()
                .filter_map(Result::ok)
                .filter(|(key, entry)| expired(key, entry))
                .map(|(key, _)| key)
                .collect()
        };
        let mut removed = 0;
        for key in candidates {
            let flows: HashMap<_, FlowKey, FlowEntry> = typed_ref(&self.ebpf, pair.flows)?;
            // The program may have refreshed the flow since the scan: look again right before.
            let Ok(entry) = flows.get(&key, 0) else {
                continue;
            };
            // Ordinary replies refresh only the reverse half: a remote still sending keeps the
            // flow. (A pending flow has had no reply; its reverse half holds its creation time.)
            let reverse: HashMap<_, ReverseKey, ReverseEntry> =
                typed_ref(&self.ebpf, pair.reverse)?;
            let last_reply = reverse
                .get(&reverse_key(&key, &entry), 0)
                .ok()
                .filter(|value| value.flow == key)
                .map_or(0, |value| value.last_reply_ns);
            let expired = balancer_common::policy::flow_expired_with_replies(
                &entry,
                last_reply,
                key.protocol,
                settings,
                now_ns,
            );
            if expired && self.remove_flow_in(pair, &key, &entry)? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Reverse entries of `pair` whose flow is not in `pair` with that translation.
    fn orphans(&self, pair: FlowPair) -> Result<HashSet<ReverseKey>, DataplaneError> {
        let flows: HashMap<_, FlowKey, FlowEntry> = typed_ref(&self.ebpf, pair.flows)?;
        let reverse: HashMap<_, ReverseKey, ReverseEntry> = typed_ref(&self.ebpf, pair.reverse)?;
        Ok(reverse
            .iter()
            .filter_map(Result::ok)
            .filter(
                |(reverse_key_found, value)| match flows.get(&value.flow, 0) {
                    Ok(entry) => reverse_key(&value.flow, &entry) != *reverse_key_found,
                    Err(_) => true,
                },
            )
            .map(|(k, _)| k)
            .collect())
    }
}

/// The two flow tables, each a forward and a reverse map: answered flows (never evicted) and
/// pending ones (an LRU pair a flood of unanswered flows may churn).
#[derive(Clone, Copy)]
struct FlowPair {
    flows: &'static str,
    reverse: &'static str,
}

impl FlowPair {
    const MAIN: Self = Self {
        flows: names::FLOWS,
        reverse: names::NAT_REVERSE,
    };
    const PENDING: Self = Self {
        flows: names::PENDING_FLOWS,
        reverse: names::PENDING_REVERSE,
    };
}

/// Whether a flow to `remote` on uplink `uplink_id` contradicts `destinations` as the programs
/// read them (longest prefix wins): the destination is passed, or forced onto another uplink.
fn contradicts(destinations: &[(Ipv4Net, u32)], remote: Ipv4Addr, uplink_id: u8) -> bool {
    let verdict = destinations
        .iter()
        .filter(|(net, _)| net.contains(&remote))
        .max_by_key(|(net, _)| net.prefix_len())
        .map(|(_, action)| *action);
    match verdict {
        Some(DESTINATION_PASS) => true,
        // An uplink's own address: only that uplink's hairpinned flows go there.
        Some(value) if value & DESTINATION_UPLINK_ADDRESS != 0 => {
            value & 0xff != u32::from(uplink_id)
        }
        Some(id) => id != u32::from(uplink_id),
        None => false,
    }
}

/// The reverse-NAT key a flow's replies carry.
pub fn reverse_key(key: &FlowKey, entry: &FlowEntry) -> ReverseKey {
    ReverseKey {
        uplink_addr: entry.uplink_addr,
        remote_addr: key.remote_addr,
        nat_port: entry.nat_port,
        remote_port: key.remote_port,
        protocol: key.protocol,
        _pad: [0; 3],
    }
}

pub(super) fn typed<'a, T>(ebpf: &'a mut Ebpf, map: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    let found = ebpf
        .map_mut(map)
        .ok_or(DataplaneError::MissingMap { map })?;
    T::try_from(found).map_err(|source| DataplaneError::Map {
        map,
        source: Box::new(source),
    })
}

fn typed_ref<'a, T>(ebpf: &'a Ebpf, map: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<&'a aya::maps::Map, Error = MapError>,
{
    let found = ebpf.map(map).ok_or(DataplaneError::MissingMap { map })?;
    T::try_from(found).map_err(|source| DataplaneError::Map {
        map,
        source: Box::new(source),
    })
}

fn read_error(map: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map {
        map,
        source: Box::new(source),
    }
}

pub(super) fn write_error(map: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::WriteMap {
        map,
        source: Box::new(source),
    }
}

/// Opens a pinned map read-only from another process (`balancer stats`).
pub fn open_pinned(pins: &PinDir, map: &'static str) -> Result<aya::maps::Map, DataplaneError> {
    let data = MapData::from_pin(pins.map(map)).map_err(read_error(map))?;
    aya::maps::Map::from_map_data(data).map_err(read_error(map))
}

/// An IPv4 address kept in network order inside a `u32`, as the maps hold it.
pub fn address_of(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

impl Dataplane {
    /// Per uplink in the rotation's slots: new TCP flows and answered ones, since attach.
    pub fn tcp_counters(
        &self,
    ) -> Result<std::collections::BTreeMap<u32, (u64, u64)>, DataplaneError> {
        use balancer_common::stats::{
            UPLINK_COUNTER_FIELDS, UPLINK_TCP_ANSWERED, UPLINK_TCP_NEW_FLOWS,
        };
        let counters: aya::maps::PerCpuArray<_, u64> =
            typed_ref(&self.ebpf, names::UPLINK_COUNTERS)?;
        let sum = |index: u32| -> Result<u64, DataplaneError> {
            let values = counters
                .get(&index, 0)
                .map_err(read_error(names::UPLINK_COUNTERS))?;
            Ok(values.iter().fold(0u64, |total, v| total.wrapping_add(*v)))
        };
        let mut result = std::collections::BTreeMap::new();
        for slot in self.written.iter().flat_map(|w| &w.uplinks) {
            let base = slot.id * UPLINK_COUNTER_FIELDS;
            result.insert(
                slot.id,
                (
                    sum(base + UPLINK_TCP_NEW_FLOWS)?,
                    sum(base + UPLINK_TCP_ANSWERED)?,
                ),
            );
        }
        Ok(result)
    }

    /// Per uplink in the rotation's slots: packets received that answered something (a flow's
    /// reply or a packet of the gateway's own connections), since attach.
    pub fn answer_counters(&self) -> Result<BTreeMap<u32, u64>, DataplaneError> {
        use balancer_common::stats::{
            UPLINK_COUNTER_FIELDS, UPLINK_RX_PACKETS, UPLINK_RX_UNSOLICITED,
        };
        let counters: aya::maps::PerCpuArray<_, u64> =
            typed_ref(&self.ebpf, names::UPLINK_COUNTERS)?;
        let sum = |index: u32| -> Result<u64, DataplaneError> {
            let values = counters
                .get(&index, 0)
                .map_err(read_error(names::UPLINK_COUNTERS))?;
            Ok(values.iter().fold(0u64, |total, v| total.wrapping_add(*v)))
        };
        let mut result = BTreeMap::new();
        for slot in self.written.iter().flat_map(|w| &w.uplinks) {
            let base = slot.id * UPLINK_COUNTER_FIELDS;
            let received = sum(base + UPLINK_RX_PACKETS)?;
            result.insert(
                slot.id,
                received.wrapping_sub(sum(base + UPLINK_RX_UNSOLICITED)?),
            );
        }
        Ok(result)
    }

    /// Up to `limit` distinct remote ends (address, port) of answered TCP flows on uplinks
    /// other than `id`: places known to answer TCP right now, for a connect through `id`.
    /// Looks at no more than `REMOTES_SCAN` entries: each costs two syscalls, and the daemon's
    /// loop must not stall on a full table.
    pub fn answered_tcp_remotes(
        &self,
        id: u32,
        limit: usize,
    ) -> Result<Vec<std::net::SocketAddrV4>, DataplaneError> {
        use balancer_common::flow::{FLOW_FLAG_ANSWERED, PROTOCOL_TCP};
        const REMOTES_SCAN: usize = 4096;
        let flows: HashMap<_, FlowKey, FlowEntry> = typed_ref(&self.ebpf, names::FLOWS)?;
        let mut remotes = Vec::new();
        for (key, entry) in flows.iter().take(REMOTES_SCAN).filter_map(Result::ok) {
            if key.protocol != PROTOCOL_TCP
                || u32::from(entry.uplink_id) == id
                || entry.flags & FLOW_FLAG_ANSWERED == 0
            {
                continue;
            }
            let remote = std::net::SocketAddrV4::new(
                address_of(key.remote_addr),
                u16::from_be(key.remote_port),
            );
            if !remotes.contains(&remote) {
                remotes.push(remote);
                if remotes.len() >= limit {
                    break;
                }
            }
        }
        Ok(remotes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_that_contradict_the_destinations_are_found_by_longest_prefix() {
        let net = |text: &str| text.parse::<Ipv4Net>().unwrap_or_default();
        let destinations = [
            (net("198.18.0.0/24"), DESTINATION_PASS),
            (net("198.18.1.0/24"), 1),
            (net("198.18.1.1/32"), DESTINATION_PASS),
        ];
        let addr = |text: &str| text.parse::<Ipv4Addr>().unwrap_or(Ipv4Addr::UNSPECIFIED);
        // Now part of the LAN: passed, whatever the uplink.
        assert!(contradicts(&destinations, addr("198.18.0.7"), 2));
        // A modem's subnet: only its own uplink may carry flows there.
        assert!(contradicts(&destinations, addr("198.18.1.9"), 2));
        assert!(!contradicts(&destinations, addr("198.18.1.9"), 1));
        // The gateway's own address inside that subnet: passed, the /32 wins over the /24.
        assert!(contradicts(&destinations, addr("198.18.1.1"), 1));
        // The internet: balanced, any uplink.
        assert!(!contradicts(&destinations, addr("198.18.9.1"), 3));
    }
}
