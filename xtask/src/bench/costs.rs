//! The programs' own cost per packet: BPF_PROG_TEST_RUN with `repeat` on crafted frames, the
//! kernel's average per pass. Nothing is attached; the object is the one `cargo xtask build`
//! leaves at a fixed path (balancer/build.rs), loaded here with raw aya so xtask does not link
//! the balancer library (whose build needs the eBPF toolchain that `setup` installs).
//!
//! `repeat` rewrites one buffer in place, so each measurement makes every pass take the path it
//! names: mirror entries for the translations (as the `per_packet_costs` test does), and a check
//! afterwards that no pass was counted as "passed untouched". New flows are single passes.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{Context, anyhow, ensure};
use aya::{
    Ebpf, EbpfLoader, TestRun, TestRunOptions,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::SchedClassifier,
};
use balancer_common::{
    flow::{FlowEntry, FlowKey, REVERSE_FLAG_ANSWERED, ReverseEntry, ReverseKey},
    maps::{
        DESTINATIONS, FLOWS, NAT_REVERSE, PENDING_FLOWS, PENDING_REVERSE,
        PROGRAM_LAN_INGRESS as LAN, PROGRAM_REFERENCE_EMPTY as REFERENCE_EMPTY,
        PROGRAM_REFERENCE_FLOW_LOOKUP as REFERENCE_FLOW_LOOKUP,
        PROGRAM_REFERENCE_HELPER_CALL as REFERENCE_HELPER_CALL,
        PROGRAM_REFERENCE_NAIVE_SNAT as REFERENCE_NAIVE_SNAT,
        PROGRAM_REFERENCE_TRANSLATION_FLOOR as REFERENCE_TRANSLATION_FLOOR,
        PROGRAM_UPLINK_EGRESS as EGRESS, PROGRAM_UPLINK_INGRESS as INGRESS, REASONS, SCHEDULE,
        SCHEDULE_LENGTH, SETTINGS, UPLINK_BY_IFINDEX, UPLINK_COUNTERS, UPLINKS,
    },
    policy::smooth_weighted_schedule,
    stats::{REASONS_LEN, UPLINK_COUNTER_FIELDS, UPLINK_NEW_FLOWS, UPLINK_TX_PACKETS},
    uplink::{DESTINATION_PASS, SCHEDULE_SLOTS, ScheduleLength, Settings, UplinkInfo},
};
use serde::Serialize;

use super::frames::{arp, be, icmp_frag_needed, tcp, udp};

const FLOW_ENTRIES: u32 = 16_384;
const SKB_CTX_LEN: usize = 192;
const CTX_MARK: usize = 8;
const CTX_IFINDEX: usize = 40;
/// `test_run` hands the program an skb on the loopback device (ifindex 1).
const LOOPBACK_IFINDEX: u32 = 1;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const UPLINK1: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const MARK1: u32 = 1 << 24;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// One measured path: nanoseconds per packet, one value per round.
#[derive(Clone, Debug, Serialize)]
pub struct Cost {
    pub name: &'static str,
    pub program: &'static str,
    /// `None` when this build of the programs has no such path.
    pub ns: Option<u64>,
    pub note: String,
}

/// Measures every path once with `repeat` passes (fewer for new flows, which fill the map).
pub fn measure(object: &Path, repeat: u32) -> anyhow::Result<Vec<Cost>> {
    let mut dp = Datapath::load(object)?;
    let mut costs = Vec::new();

    // New flow: the programs read the coarse clock, which does not move between the passes of
    // one `repeat` run, so an expired flow cannot be made to repeat. Each new flow is one
    // single-pass run instead (a new destination port each, so ports never run out), which
    // includes the kernel's timer reads; the floor row measures those the same way.
    let floor = single_pass_median(&dp, EGRESS, |_| arp())?;
    costs.push(Cost {
        name: "floor: one single-pass run (ARP frame, passed at once)",
        program: EGRESS,
        ns: Some(floor),
        note: "what the single-pass rows include besides the program".into(),
    });
    let before = dp.uplink_counter(1, UPLINK_NEW_FLOWS)?;
    let new_flow = single_pass_median(&dp, LAN, |index| {
        udp((CLIENT, 62_000), (SERVER, 1 + index as u16))
    })?;
    let created = dp.uplink_counter(1, UPLINK_NEW_FLOWS)? - before;
    ensure!(
        created == u64::from(SINGLE_PASSES),
        "new-flow bench: {created} flows created in {SINGLE_PASSES} passes"
    );
    costs.push(Cost {
        name: "new flow (UDP, lan_ingress)",
        program: LAN,
        ns: Some(new_flow),
        note: format!("median of {SINGLE_PASSES} single passes, floor included"),
    });

    // Established: a TCP flow through its handshake, then its ACKs.
    let (entry, key) = dp.handshake((CLIENT, 40_000), (SERVER, 443))?;
    let ack = tcp((CLIENT, 40_000), (SERVER, 443), TCP_ACK);
    let passes = dp.passes()?;
    let run = dp.run(LAN, &ack, 0, repeat)?;
    ensure!(
        run.mark == MARK1 && dp.passes()? == passes,
        "established bench: a pass was not steered (mark {:#x})",
        run.mark
    );
    let lan = nanos(run.duration);
    costs.push(Cost {
        name: "established flow: lan_ingress (lookup + mark)",
        program: LAN,
        ns: Some(lan),
        note: String::new(),
    });

    // SNAT: a mirror flow keyed by the translated tuple translates it back on the next pass.
    let mirror_key = FlowKey {
        client_addr: entry.uplink_addr,
        client_port: entry.nat_port,
        ..key
    };
    dp.insert_flow(
        mirror_key,
        FlowEntry {
            uplink_addr: key.client_addr,
            nat_port: key.client_port,
            ..entry
        },
    )?;
    let passes = dp.passes()?;
    let run = dp.run(EGRESS, &ack, 0, repeat)?;
    ensure!(
        dp.passes()? == passes,
        "SNAT bench: a pass did not translate"
    );
    let egress = nanos(run.duration);
    costs.push(Cost {
        name: "established flow: uplink_egress (SNAT)",
        program: EGRESS,
        ns: Some(egress),
        note: String::new(),
    });

    // The references, on the same frame: the empty program, and the naive SNAT, which finds
    // the same mirror entries, so it also translates on every pass.
    let run = dp.run(REFERENCE_EMPTY, &ack, 0, repeat)?;
    costs.push(Cost {
        name: "reference: empty program",
        program: REFERENCE_EMPTY,
        ns: Some(nanos(run.duration)),
        note: "the floor of a pass".into(),
    });
    let before = dp.uplink_counter(1, UPLINK_TX_PACKETS)?;
    let run = dp.run(REFERENCE_NAIVE_SNAT, &ack, 0, repeat)?;
    let translated = dp.uplink_counter(1, UPLINK_TX_PACKETS)? - before;
    ensure!(
        translated == u64::from(repeat),
        "naive SNAT bench: {translated} of {repeat} passes translated"
    );
    costs.push(Cost {
        name: "reference: naive SNAT (one helper per field)",
        program: REFERENCE_NAIVE_SNAT,
        ns: Some(nanos(run.duration)),
        note: "what the 100 ns target was set against".into(),
    });

    // What no established-flow path can avoid, on the same frame: finding the flow, and one
    // helper call. On this kind of host they are most of each row above.
    let run = dp.run(REFERENCE_FLOW_LOOKUP, &ack, 0, repeat)?;
    ensure!(
        run.mark == MARK1,
        "flow lookup reference: the flow was not found (mark {:#x})",
        run.mark
    );
    costs.push(Cost {
        name: "reference: parse + one flow lookup + mark",
        program: REFERENCE_FLOW_LOOKUP,
        ns: Some(nanos(run.duration)),
        note: "the least an established flow's packet costs here".into(),
    });
    let run = dp.run(REFERENCE_TRANSLATION_FLOOR, &ack, 0, repeat)?;
    ensure!(
        run.mark == MARK1 && run.data.get(..ack.len()) == Some(&ack[..]),
        "translation floor reference: the flow was not found or the frame changed"
    );
    costs.push(Cost {
        name: "reference: the row above + one checksum helper",
        program: REFERENCE_TRANSLATION_FLOOR,
        ns: Some(nanos(run.duration)),
        note: "the least a translated packet costs here".into(),
    });
    let run = dp.run(REFERENCE_HELPER_CALL, &ack, 0, repeat)?;
    ensure!(
        run.mark == MARK1,
        "helper call reference: no mark (mark {:#x})",
        run.mark
    );
    costs.push(Cost {
        name: "reference: empty program + one helper call (coarse clock)",
        program: REFERENCE_HELPER_CALL,
        ns: Some(nanos(run.duration)),
        note: "minus the empty row: what one kernel call costs here".into(),
    });

    // Reverse NAT: the same trick with a mirror reverse entry for the restored tuple.
    dp.insert_reverse(
        ReverseKey {
            uplink_addr: key.client_addr,
            remote_addr: key.remote_addr,
            nat_port: key.client_port,
            remote_port: key.remote_port,
            protocol: key.protocol,
            _pad: [0; 3],
        },
        ReverseEntry {
            flow: mirror_key,
            mark: entry.mark,
            uplink_id: entry.uplink_id,
            flags: REVERSE_FLAG_ANSWERED,
            ..ReverseEntry::default()
        },
    )?;
    let nat_port = u16::from_be(entry.nat_port);
    let reply = tcp((SERVER, 443), (UPLINK1, nat_port), TCP_ACK);
    let passes = dp.passes()?;
    let run = dp.run(INGRESS, &reply, 0, repeat)?;
    ensure!(
        dp.passes()? == passes && run.mark == MARK1,
        "reverse NAT bench: a pass did not translate"
    );
    let ingress = nanos(run.duration);
    costs.push(Cost {
        name: "established flow: uplink_ingress (reverse NAT)",
        program: INGRESS,
        ns: Some(ingress),
        note: String::new(),
    });
    costs.push(Cost {
        name: "established flow: upload packet (lan_ingress + uplink_egress)",
        program: "both",
        ns: Some(lan + egress),
        note: "sum of the two rows above".into(),
    });

    costs.push(icmp_error(&dp, nat_port, repeat)?);
    Ok(costs)
}

/// An ICMP "fragmentation needed" from the server about the translated flow, at uplink
/// ingress: the outer destination and the quoted source are both rewritten. The mirror entries
/// of the reverse-NAT bench make every other pass translate back, so `repeat` works as for the
/// other rows; if this build's ICMP path does not allow that (a pass counted as untranslated),
/// the median of fresh single runs is reported instead (it includes the timer's overhead).
fn icmp_error(dp: &Datapath, nat_port: u16, repeat: u32) -> anyhow::Result<Cost> {
    const NAME: &str = "ICMP error (uplink_ingress)";
    let inner = tcp((UPLINK1, nat_port), (SERVER, 443), TCP_ACK);
    let error = icmp_frag_needed(SERVER, UPLINK1, &inner[14..14 + 20 + 8]);
    let once = dp.run(INGRESS, &error, 0, 1)?;
    if once.data.get(30..34) != Some(&CLIENT.octets()[..]) {
        return Ok(Cost {
            name: NAME,
            program: INGRESS,
            ns: None,
            note: "n/a: this build passes ICMP errors untranslated".into(),
        });
    }
    let passes = dp.passes()?;
    let run = dp.run(INGRESS, &error, 0, repeat)?;
    if dp.passes()? == passes && run.mark == MARK1 {
        return Ok(Cost {
            name: NAME,
            program: INGRESS,
            ns: Some(nanos(run.duration)),
            note: "outer and quoted headers rewritten".into(),
        });
    }
    Ok(Cost {
        name: NAME,
        program: INGRESS,
        ns: Some(single_pass_median(dp, INGRESS, |_| error.clone())?),
        note: format!("median of {SINGLE_PASSES} single passes, floor included"),
    })
}

/// Single-pass runs per single-pass row.
const SINGLE_PASSES: u32 = 20_000;

/// The median of `SINGLE_PASSES` one-pass runs of `program`, on `frame(index)` for each.
fn single_pass_median(
    dp: &Datapath,
    program: &str,
    frame: impl Fn(u32) -> Vec<u8>,
) -> anyhow::Result<u64> {
    let mut samples = (0..SINGLE_PASSES)
        .map(|index| {
            dp.run(program, &frame(index), 0, 1)
                .map(|run| nanos(run.duration))
        })
        .collect::<anyhow::Result<Vec<u64>>>()?;
    samples.sort_unstable();
    samples
        .get(samples.len() / 2)
        .copied()
        .ok_or_else(|| anyhow!("no single-pass samples"))
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

struct Run {
    data: Vec<u8>,
    mark: u32,
    duration: Duration,
}

struct Datapath {
    ebpf: Ebpf,
}

impl Datapath {
    /// Loads the programs and seeds uplinks 1..3 (weights 1:1:1, uplink 1 first in the
    /// schedule is all the benches need), default settings, the LAN as a pass destination, and
    /// makes the uplink programs act for uplink 1.
    fn load(object: &Path) -> anyhow::Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(FLOWS, FLOW_ENTRIES)
            .map_max_entries(NAT_REVERSE, FLOW_ENTRIES)
            .map_max_entries(PENDING_FLOWS, FLOW_ENTRIES)
            .map_max_entries(PENDING_REVERSE, FLOW_ENTRIES)
            .load_file(object)
            .with_context(|| format!("parsing {}", object.display()))?;
        for name in [
            LAN,
            EGRESS,
            INGRESS,
            REFERENCE_EMPTY,
            REFERENCE_NAIVE_SNAT,
            REFERENCE_FLOW_LOOKUP,
            REFERENCE_HELPER_CALL,
            REFERENCE_TRANSLATION_FLOOR,
        ] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?
                .try_into()?;
            program
                .load()
                .map_err(|error| anyhow!("loading {name}: {error:#}"))?;
        }
        let mut dp = Self { ebpf };
        for id in 1..=3u8 {
            let mut uplinks: Array<&mut MapData, UplinkInfo> = dp.map_mut(UPLINKS)?.try_into()?;
            uplinks.set(
                u32::from(id),
                UplinkInfo {
                    source_addr: be(Ipv4Addr::new(198, 18, id, 2)),
                    mark: u32::from(id) << 24,
                    generation: 1,
                    // Uplink 1 is where `test_run` runs (see `UPLINK_BY_IFINDEX` below).
                    ifindex: if id == 1 {
                        LOOPBACK_IFINDEX
                    } else {
                        100 + u32::from(id)
                    },
                    enabled: 1,
                    ..UplinkInfo::default()
                },
                0,
            )?;
        }
        // Only uplink 1 in the schedule: every new flow lands where the uplink programs act.
        let mut slots = vec![0u32; SCHEDULE_SLOTS as usize];
        let length = smooth_weighted_schedule(&[(1, 1)], &mut slots);
        let mut schedule: Array<&mut MapData, u32> = dp.map_mut(SCHEDULE)?.try_into()?;
        for (index, id) in slots.iter().take(length).enumerate() {
            schedule.set(u32::try_from(index)?, id, 0)?;
        }
        let mut len: Array<&mut MapData, ScheduleLength> =
            dp.map_mut(SCHEDULE_LENGTH)?.try_into()?;
        len.set(
            0,
            ScheduleLength {
                length: u32::try_from(length)?,
            },
            0,
        )?;
        dp.set_settings(Settings::default())?;
        let mut trie: LpmTrie<&mut MapData, u32, u32> = dp.map_mut(DESTINATIONS)?.try_into()?;
        trie.insert(
            &Key::new(24, be(Ipv4Addr::new(198, 18, 0, 0))),
            DESTINATION_PASS,
            0,
        )?;
        let mut by_ifindex: HashMap<&mut MapData, u32, u32> =
            dp.map_mut(UPLINK_BY_IFINDEX)?.try_into()?;
        by_ifindex.insert(LOOPBACK_IFINDEX, 1, 0)?;
        Ok(dp)
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

    fn set_settings(&mut self, settings: Settings) -> anyhow::Result<()> {
        let mut map: Array<&mut MapData, Settings> = self.map_mut(SETTINGS)?.try_into()?;
        map.set(0, settings, 0)?;
        Ok(())
    }

    fn insert_flow(&mut self, key: FlowKey, entry: FlowEntry) -> anyhow::Result<()> {
        let mut map: HashMap<&mut MapData, FlowKey, FlowEntry> = self.map_mut(FLOWS)?.try_into()?;
        map.insert(key, entry, 0)?;
        Ok(())
    }

    fn insert_reverse(&mut self, key: ReverseKey, value: ReverseEntry) -> anyhow::Result<()> {
        let mut map: HashMap<&mut MapData, ReverseKey, ReverseEntry> =
            self.map_mut(NAT_REVERSE)?.try_into()?;
        map.insert(key, value, 0)?;
        Ok(())
    }

    fn per_cpu_sum(&self, name: &str, index: u32) -> anyhow::Result<u64> {
        let map: PerCpuArray<&MapData, u64> = self.map(name)?.try_into()?;
        Ok(map.get(&index, 0)?.iter().sum())
    }

    /// Every "passed untouched" or "dropped" reason, summed: unchanged means every pass of a
    /// measurement took its path.
    fn passes(&self) -> anyhow::Result<u64> {
        (0..REASONS_LEN)
            .map(|reason| self.per_cpu_sum(REASONS, reason))
            .sum()
    }

    fn uplink_counter(&self, id: u32, field: u32) -> anyhow::Result<u64> {
        self.per_cpu_sum(UPLINK_COUNTERS, id * UPLINK_COUNTER_FIELDS + field)
    }

    /// A TCP flow from `client` to `server` through SYN (LAN), SYN (egress) and SYN-ACK
    /// (ingress): returns its entry and key.
    fn handshake(
        &self,
        client: (Ipv4Addr, u16),
        server: (Ipv4Addr, u16),
    ) -> anyhow::Result<(FlowEntry, FlowKey)> {
        let syn = tcp(client, server, TCP_SYN);
        let marked = self.run(LAN, &syn, 0, 1)?;
        ensure!(marked.mark == MARK1, "the SYN was not steered to uplink 1");
        let out = self.run(EGRESS, &syn, MARK1, 1)?;
        let nat_port = out
            .data
            .get(34..36)
            .map(|p| u16::from_be_bytes([p[0], p[1]]))
            .context("short SNAT output")?;
        ensure!(
            out.data.get(26..30) == Some(&UPLINK1.octets()[..]),
            "the SYN was not translated to uplink 1's address"
        );
        let syn_ack = tcp(server, (UPLINK1, nat_port), TCP_SYN | TCP_ACK);
        let back = self.run(INGRESS, &syn_ack, 0, 1)?;
        ensure!(
            back.data.get(30..34) == Some(&client.0.octets()[..]),
            "the SYN-ACK was not translated back"
        );
        let key = FlowKey {
            client_addr: be(client.0),
            remote_addr: be(server.0),
            client_port: client.1.to_be(),
            remote_port: server.1.to_be(),
            protocol: 6,
            _pad: [0; 3],
        };
        let map: HashMap<&MapData, FlowKey, FlowEntry> = self.map(FLOWS)?.try_into()?;
        let entry = map.get(&key, 0).context("no flow after the handshake")?;
        Ok((entry, key))
    }

    fn run(&self, program: &str, frame: &[u8], mark: u32, repeat: u32) -> anyhow::Result<Run> {
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
        let mark = u32::from_ne_bytes([
            ctx_out[CTX_MARK],
            ctx_out[CTX_MARK + 1],
            ctx_out[CTX_MARK + 2],
            ctx_out[CTX_MARK + 3],
        ]);
        Ok(Run {
            data,
            mark,
            duration: result.duration,
        })
    }
}
