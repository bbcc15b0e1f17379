//! Loads the embedded object with raw aya, seeds its maps and runs its classifiers through
//! BPF_PROG_TEST_RUN. Nothing is attached and no interface is touched: `test_run` hands the
//! program an skb on the loopback device of the caller's namespace (ifindex 1), which is why
//! `UPLINK_BY_IFINDEX[1]` decides which uplink the uplink programs act for.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, anyhow};
use aya::{
    Ebpf, EbpfLoader, TestRun, TestRunOptions,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::SchedClassifier,
};
use balancer_common::{
    flow::{FlowEntry, FlowKey, InboundEntry, InboundKey, ReverseEntry, ReverseKey},
    maps::{
        DESTINATIONS, FLOWS, FORWARDED_UDP_PORTS, INBOUND, NAT_REVERSE, PENDING_FLOWS,
        PENDING_REVERSE, PROGRAM_LAN_HAIRPIN, PROGRAM_LAN_INGRESS, PROGRAM_UPLINK_EGRESS,
        PROGRAM_UPLINK_INGRESS, REASONS, SCHEDULE, SCHEDULE_LENGTH, SETTINGS, UPLINK_BY_IFINDEX,
        UPLINK_COUNTERS, UPLINKS,
    },
    policy::smooth_weighted_schedule,
    stats::UPLINK_COUNTER_FIELDS,
    uplink::{DESTINATION_PASS, SCHEDULE_SLOTS, ScheduleLength, Settings, UplinkInfo},
};

/// The programs attached to interfaces, which see every frame. `lan_hairpin`, which only
/// `lan_ingress` calls (after its own checks), is loaded beside them.
pub const PROGRAMS: [&str; 3] = [
    PROGRAM_LAN_INGRESS,
    PROGRAM_UPLINK_EGRESS,
    PROGRAM_UPLINK_INGRESS,
];
/// TC_ACT_UNSPEC and TC_ACT_SHOT as `test_run` reports them.
pub const PASS: u32 = u32::MAX;
pub const DROP: u32 = 2;
const FLOW_ENTRIES: u32 = 16_384;
const SKB_CTX_LEN: usize = 192;
const CTX_MARK: usize = 8;
const CTX_IFINDEX: usize = 40;
const LOOPBACK_IFINDEX: u32 = 1;

/// The MSS every seeded uplink clamps SYNs to (an MTU of 1492, PPPoE).
pub const MSS_MAX: u16 = 1452;

/// Uplink `id` of the standard seed: source 198.18.<id>.2, mark `id << 24`.
pub fn uplink_addr(id: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, id, 2)
}

pub fn be(addr: Ipv4Addr) -> u32 {
    u32::from(addr).to_be()
}

pub struct Run {
    pub action: u32,
    pub data: Vec<u8>,
    pub mark: u32,
    pub duration: Duration,
}

pub struct Datapath {
    ebpf: Ebpf,
}

impl Datapath {
    /// Loads every program (a verifier rejection is returned with its log) and seeds uplinks
    /// 1, 2, 3 with weights 2:2:1, the default settings, and the destinations 198.18.0.0/24
    /// (pass) and 198.18.1.0/24 (forced onto uplink 1). Uplink programs act for uplink 1.
    pub fn load() -> anyhow::Result<Self> {
        Self::load_with_entries(FLOW_ENTRIES)
    }

    /// `load` with flow tables of `entries` entries each (as `flow_entries` sets them).
    pub fn load_with_entries(entries: u32) -> anyhow::Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(FLOWS, entries)
            .map_max_entries(NAT_REVERSE, entries)
            .map_max_entries(PENDING_FLOWS, entries)
            .map_max_entries(PENDING_REVERSE, entries)
            .load(balancer::dataplane::object())
            .context("parsing the embedded object")?;
        for name in PROGRAMS.into_iter().chain([PROGRAM_LAN_HAIRPIN]) {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?
                .try_into()?;
            program
                .load()
                .map_err(|error| anyhow!("loading {name}: {error:#}"))?;
        }
        balancer::dataplane::install_hairpin(&mut ebpf)?;
        let mut datapath = Self { ebpf };
        for id in 1..=3u8 {
            datapath.set_uplink(
                id,
                UplinkInfo {
                    source_addr: be(uplink_addr(id)),
                    mark: u32::from(id) << 24,
                    generation: 1,
                    ifindex: 100 + u32::from(id),
                    enabled: 1,
                    _pad: 0,
                    mss_max: MSS_MAX,
                },
            )?;
        }
        datapath.set_weights(&[(1, 2), (2, 2), (3, 1)])?;
        datapath.set_settings(Settings {
            drop_untranslated: 1,
            ..Settings::default()
        })?;
        datapath.add_destination(Ipv4Addr::new(198, 18, 0, 0), 24, DESTINATION_PASS)?;
        datapath.add_destination(Ipv4Addr::new(198, 18, 1, 0), 24, 1)?;
        datapath.act_for_uplink(1)?;
        Ok(datapath)
    }

    fn map_mut(&mut self, name: &str) -> anyhow::Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing"))
    }

    fn map(&self, name: &str) -> anyhow::Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .ok_or_else(|| anyhow!("map {name} missing"))
    }

    pub fn set_uplink(&mut self, id: u8, info: UplinkInfo) -> anyhow::Result<()> {
        let mut uplinks: Array<&mut MapData, UplinkInfo> = self.map_mut(UPLINKS)?.try_into()?;
        uplinks.set(u32::from(id), info, 0)?;
        Ok(())
    }

    pub fn uplink(&self, id: u8) -> anyhow::Result<UplinkInfo> {
        let uplinks: Array<&MapData, UplinkInfo> = self.map(UPLINKS)?.try_into()?;
        Ok(uplinks.get(&u32::from(id), 0)?)
    }

    pub fn set_weights(&mut self, weights: &[(u32, u32)]) -> anyhow::Result<Vec<u32>> {
        let mut slots = vec![0u32; SCHEDULE_SLOTS as usize];
        let length = smooth_weighted_schedule(weights, &mut slots);
        let mut schedule: Array<&mut MapData, u32> = self.map_mut(SCHEDULE)?.try_into()?;
        for (index, id) in slots[..length].iter().enumerate() {
            schedule.set(index as u32, id, 0)?;
        }
        let mut len: Array<&mut MapData, ScheduleLength> =
            self.map_mut(SCHEDULE_LENGTH)?.try_into()?;
        len.set(
            0,
            ScheduleLength {
                length: length as u32,
            },
            0,
        )?;
        Ok(slots[..length].to_vec())
    }

    pub fn set_settings(&mut self, settings: Settings) -> anyhow::Result<()> {
        let mut map: Array<&mut MapData, Settings> = self.map_mut(SETTINGS)?.try_into()?;
        map.set(0, settings, 0)?;
        Ok(())
    }

    /// Marks UDP `port` as forwarded by the host's firewall, as the daemon does from nft.
    pub fn forward_udp_port(&mut self, port: u16) -> anyhow::Result<()> {
        let mut map: HashMap<&mut MapData, u16, u8> =
            self.map_mut(FORWARDED_UDP_PORTS)?.try_into()?;
        map.insert(port.to_be(), 1, 0)?;
        Ok(())
    }

    /// Marks `port` of `protocol` as held by the gateway, as the daemon does (`RESERVED_PORTS`).
    pub fn reserve_port(&mut self, protocol: u8, port: u16) -> anyhow::Result<()> {
        let key = balancer_common::flow::ReservedPortKey {
            port: port.to_be(),
            protocol,
            _pad: 0,
        };
        let mut map: HashMap<&mut MapData, balancer_common::flow::ReservedPortKey, u8> = self
            .map_mut(balancer_common::maps::RESERVED_PORTS)?
            .try_into()?;
        map.insert(key, 1, 0)?;
        Ok(())
    }

    pub fn add_destination(
        &mut self,
        net: Ipv4Addr,
        prefix: u32,
        action: u32,
    ) -> anyhow::Result<()> {
        let mut trie: LpmTrie<&mut MapData, u32, u32> = self.map_mut(DESTINATIONS)?.try_into()?;
        trie.insert(&Key::new(prefix, be(net)), action, 0)?;
        Ok(())
    }

    /// Makes the uplink programs act for uplink `id` (`test_run` always runs on ifindex 1).
    /// Both ways the programs find it: `UPLINK_BY_IFINDEX` and the uplink slots' ifindex
    /// (uplink `id` on ifindex 1, the others back on their own).
    pub fn act_for_uplink(&mut self, id: u32) -> anyhow::Result<()> {
        let mut map: HashMap<&mut MapData, u32, u32> =
            self.map_mut(UPLINK_BY_IFINDEX)?.try_into()?;
        map.insert(LOOPBACK_IFINDEX, id, 0)?;
        for other in 1..=3u8 {
            let mut uplink = self.uplink(other)?;
            uplink.ifindex = if u32::from(other) == id {
                LOOPBACK_IFINDEX
            } else {
                100 + u32::from(other)
            };
            self.set_uplink(other, uplink)?;
        }
        Ok(())
    }

    /// Every flow, answered (`FLOWS`) or pending (`PENDING_FLOWS`).
    pub fn flows(&self) -> anyhow::Result<Vec<(FlowKey, FlowEntry)>> {
        let mut flows = self.table_flows(FLOWS)?;
        flows.extend(self.table_flows(PENDING_FLOWS)?);
        Ok(flows)
    }

    /// The flows of one table: `FLOWS` or `PENDING_FLOWS`.
    pub fn table_flows(&self, table: &str) -> anyhow::Result<Vec<(FlowKey, FlowEntry)>> {
        let map: HashMap<&MapData, FlowKey, FlowEntry> = self.map(table)?.try_into()?;
        Ok(map.iter().collect::<Result<_, _>>()?)
    }

    /// Flow `key`, answered or pending.
    pub fn flow(&self, key: &FlowKey) -> anyhow::Result<Option<FlowEntry>> {
        for table in [FLOWS, PENDING_FLOWS] {
            let map: HashMap<&MapData, FlowKey, FlowEntry> = self.map(table)?.try_into()?;
            if let Ok(entry) = map.get(key, 0) {
                return Ok(Some(entry));
            }
        }
        Ok(None)
    }

    pub fn insert_flow(&mut self, key: FlowKey, entry: FlowEntry) -> anyhow::Result<()> {
        let mut map: HashMap<&mut MapData, FlowKey, FlowEntry> = self.map_mut(FLOWS)?.try_into()?;
        map.insert(key, entry, 0)?;
        Ok(())
    }

    /// The reverse entries as (reply key, the flow it names).
    pub fn reverse(&self) -> anyhow::Result<Vec<(ReverseKey, FlowKey)>> {
        Ok(self
            .reverse_entries()?
            .into_iter()
            .map(|(key, value)| (key, value.flow))
            .collect())
    }

    /// Every reverse entry, answered or pending.
    pub fn reverse_entries(&self) -> anyhow::Result<Vec<(ReverseKey, ReverseEntry)>> {
        let mut entries = self.table_reverse(NAT_REVERSE)?;
        entries.extend(self.table_reverse(PENDING_REVERSE)?);
        Ok(entries)
    }

    /// The reverse entries of one table: `NAT_REVERSE` or `PENDING_REVERSE`.
    pub fn table_reverse(&self, table: &str) -> anyhow::Result<Vec<(ReverseKey, ReverseEntry)>> {
        let map: HashMap<&MapData, ReverseKey, ReverseEntry> = self.map(table)?.try_into()?;
        Ok(map.iter().collect::<Result<_, _>>()?)
    }

    /// Removes `key` from the reverse table `table` (an LRU eviction, as a test sees it).
    pub fn remove_reverse(&mut self, table: &str, key: &ReverseKey) -> anyhow::Result<()> {
        let mut map: HashMap<&mut MapData, ReverseKey, ReverseEntry> =
            self.map_mut(table)?.try_into()?;
        map.remove(key)?;
        Ok(())
    }

    /// Removes `key` from the flow table `table` (an LRU eviction, as a test sees it).
    pub fn remove_flow(&mut self, table: &str, key: &FlowKey) -> anyhow::Result<()> {
        let mut map: HashMap<&mut MapData, FlowKey, FlowEntry> = self.map_mut(table)?.try_into()?;
        map.remove(key)?;
        Ok(())
    }

    /// A `COUNTERS` slot summed over the CPUs (`balancer_common::counters`).
    pub fn counter(&self, index: u32) -> anyhow::Result<u64> {
        self.per_cpu_sum(balancer_common::counters::COUNTERS_MAP, index)
    }

    pub fn insert_reverse(&mut self, key: ReverseKey, value: ReverseEntry) -> anyhow::Result<()> {
        let mut map: HashMap<&mut MapData, ReverseKey, ReverseEntry> =
            self.map_mut(NAT_REVERSE)?.try_into()?;
        map.insert(key, value, 0)?;
        Ok(())
    }

    /// The inbound connections (`INBOUND`) the programs recorded.
    pub fn inbound(&self) -> anyhow::Result<Vec<(InboundKey, InboundEntry)>> {
        let map: HashMap<&MapData, InboundKey, InboundEntry> = self.map(INBOUND)?.try_into()?;
        Ok(map.iter().collect::<Result<_, _>>()?)
    }

    fn per_cpu_sum(&self, name: &str, index: u32) -> anyhow::Result<u64> {
        let map: PerCpuArray<&MapData, u64> = self.map(name)?.try_into()?;
        Ok(map.get(&index, 0)?.iter().sum())
    }

    pub fn reason(&self, reason: u32) -> anyhow::Result<u64> {
        self.per_cpu_sum(REASONS, reason)
    }

    pub fn uplink_counter(&self, id: u32, field: u32) -> anyhow::Result<u64> {
        self.per_cpu_sum(UPLINK_COUNTERS, id * UPLINK_COUNTER_FIELDS + field)
    }

    /// Runs `program` once on `frame` with `mark` in the skb.
    pub fn run(&self, program: &str, frame: &[u8], mark: u32) -> anyhow::Result<Run> {
        self.run_repeat(program, frame, mark, 1)
    }

    pub fn run_repeat(
        &self,
        program: &str,
        frame: &[u8],
        mark: u32,
        repeat: u32,
    ) -> anyhow::Result<Run> {
        let program: &SchedClassifier = self
            .ebpf
            .program(program)
            .ok_or_else(|| anyhow!("program {program} missing"))?
            .try_into()?;
        let mut ctx_in = [0u8; SKB_CTX_LEN];
        ctx_in[CTX_MARK..CTX_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
        ctx_in[CTX_IFINDEX..CTX_IFINDEX + 4].copy_from_slice(&LOOPBACK_IFINDEX.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let mut data = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut data),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                repeat,
                ..Default::default()
            })
            .map_err(|error| anyhow!("test_run: {error:?}"))?;
        data.truncate(result.data_size_out as usize);
        let mark = u32::from_ne_bytes([ctx_out[8], ctx_out[9], ctx_out[10], ctx_out[11]]);
        Ok(Run {
            action: result.return_value,
            data,
            mark,
            duration: result.duration,
        })
    }
}
