//! The transparent data plane in the lab: LAN clients that know nothing of the balancer reach
//! the internet host through all uplinks. Flows are spread by weight, translated to the uplink's
//! address (an ISP drops any other source, so a wrong exit or a missing translation shows as
//! loss), survive a daemon restart, and are counted by `balancer stats`.
//!
//! Root only. Each test builds its own lab (prefix `bal-tr?<pid>`) and runs `balancer run` in it;
//! dropping the test's [`Gateway`] stops the daemon, runs `balancer down` (programs, links and
//! pins) and removes the lab. The tests take a shared lock and run one at a time: the
//! throughput checks must not share the machine's two cores with other lab traffic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    thread,
    time::Duration,
};

use balancer_tests::lab::{LabSpec, SERVER_ADDR, WHOAMI_PORT};
use common::{transparent::*, *};

/// 150 short connections from each LAN host, both at once: all succeed, the server sees only
/// the uplinks' addresses, and the split follows the weights 2:2:1.
#[test]
fn short_connections_are_spread_by_weight_and_leave_translated() {
    let gw = Gateway::up("tra", |p| LabSpec::new(p, 3));
    let lab = &gw.lab;
    let (one, two) = thread::scope(|s| {
        let one = s.spawn(|| lab.tcp_many(&lab.client(1), 150, None, Duration::from_secs(1)));
        let two = s.spawn(|| lab.tcp_many(&lab.client(2), 150, None, Duration::from_secs(1)));
        (one.join().unwrap().unwrap(), two.join().unwrap().unwrap())
    });
    assert_all_through_uplinks(&gw, "client 1", &one);
    assert_all_through_uplinks(&gw, "client 2", &two);
    assert_eq!(one.distinct_peers, 150, "client 1: {one:?}");
    assert_eq!(two.distinct_peers, 150, "client 2: {two:?}");

    let mut seen = BTreeMap::new();
    merge(&mut seen, &one.sources);
    merge(&mut seen, &two.sources);
    eprintln!("300 connections by source the server saw: {seen:?}");
    for (addr, share) in gw.weight_shares() {
        let expected = 300.0 * share;
        let got = f64::from(seen.get(&addr).copied().unwrap_or(0));
        assert!(
            (got - expected).abs() <= 0.1 * expected,
            "{addr}: {got} of 300 connections, expected {expected} (weights 2:2:1) within 10%: {seen:?}"
        );
    }
}

/// ICMP echo and a UDP exchange from both LAN hosts.
#[test]
fn ping_and_udp_cross_the_nat() {
    let gw = Gateway::up("trb", |p| LabSpec::new(p, 3));
    let lab = &gw.lab;
    for c in 1..=2 {
        let ns = lab.client(c);
        let before: Vec<u64> = (1..=3).map(|i| lab.isp_rx_packets(i).unwrap()).collect();
        let ping = lab
            .ping(&ns, SERVER_ADDR, 5, Duration::from_secs(1))
            .unwrap();
        assert_eq!(
            ping.received,
            5,
            "client {c}: ping 198.18.9.1: {ping:?}\n{}",
            gw.diagnostics()
        );
        assert_eq!(
            ping.sources.keys().collect::<Vec<_>>(),
            [&SERVER_ADDR],
            "replies come from the server"
        );
        // One echo flow: one uplink carried all five requests.
        let carried: Vec<u64> = (1..=3)
            .map(|i| lab.isp_rx_packets(i).unwrap() - before[i - 1])
            .collect();
        assert!(
            carried.iter().filter(|&&n| n >= 5).count() == 1,
            "client {c}: one ISP should carry the echo flow, ISP rx deltas {carried:?}"
        );

        for _ in 0..3 {
            let seen = lab
                .udp_whoami(&ns, None, Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("client {c}: UDP whoami: {e:#}\n{}", gw.diagnostics()));
            assert!(
                gw.uplink_sources().contains(seen.ip()),
                "client {c}: UDP seen as {seen}, not an uplink address"
            );
            assert!(
                NAT_PORTS.contains(&seen.port()),
                "client {c}: UDP translated port {} outside {NAT_PORTS:?}",
                seen.port()
            );
        }
    }
}

/// Both LAN hosts use the same source port to the same server at the same time. Both
/// connections work and the server sees two different (address, port) pairs, also when both
/// flows leave by the same uplink (the NAT must give them different ports). Between the two,
/// 0, 1, 2, … extra flows shift the round robin so that some round puts both on one uplink.
#[test]
fn the_same_source_port_from_two_hosts_works_for_both() {
    let gw = Gateway::up("trc", |p| LabSpec::new(p, 3));
    let lab = &gw.lab;
    let mut same_uplink = 0;
    let mut rounds = Vec::new();
    for fillers in 0..8u16 {
        let port = 40000 + fillers;
        let first_bind = SocketAddrV4::new(lab.client_addr(1), port);
        let second_bind = SocketAddrV4::new(lab.client_addr(2), port);
        let (first, second) = thread::scope(|s| {
            // The first connection stays open while the second is made.
            let first = s.spawn(|| whoami_bound(lab, &lab.client(1), first_bind, 1200));
            thread::sleep(Duration::from_millis(300));
            if fillers > 0 {
                let tool = lab.labtool().to_string_lossy().into_owned();
                let server = SocketAddrV4::new(SERVER_ADDR, WHOAMI_PORT).to_string();
                let n = fillers.to_string();
                let out = lab
                    .exec(
                        &lab.client(1),
                        &[
                            "taskset",
                            "-c",
                            "0",
                            &tool,
                            "tcp-many",
                            &server,
                            "--count",
                            &n,
                            "--timeout-ms",
                            "1000",
                        ],
                    )
                    .unwrap();
                assert!(
                    out.status.success(),
                    "filler connections: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let second = whoami_bound(lab, &lab.client(2), second_bind, 0);
            (first.join().unwrap(), second)
        });
        for seen in [first, second] {
            assert!(
                gw.uplink_sources().contains(seen.ip()),
                "seen as {seen}, not an uplink address"
            );
            assert!(
                NAT_PORTS.contains(&seen.port()),
                "translated port {} outside {NAT_PORTS:?}",
                seen.port()
            );
        }
        assert_ne!(
            first, second,
            "port {port} from both hosts: the server must see two different peers"
        );
        rounds.push((port, first, second));
        if first.ip() == second.ip() {
            same_uplink += 1;
            break;
        }
    }
    eprintln!("rounds (port, seen for c1, seen for c2): {rounds:?}");
    assert!(
        same_uplink > 0,
        "in no round did both flows share an uplink, so the NAT's port choice went untested: {rounds:?}"
    );
}

/// A download keeps running while the daemon is stopped and a new one adopts the data plane:
/// it completes with every byte, no reset, and never stalls for 1.5 s. New flows also work while
/// no daemon runs.
#[test]
fn a_long_download_survives_a_daemon_restart() {
    // Equal rates, so the download takes ~7.5 s whichever uplink it gets.
    let mut gw = Gateway::up("trd", |p| {
        let mut spec = LabSpec::new(p, 3);
        spec.rates_mbit = vec![10, 10, 10];
        spec
    });
    const BYTES: u64 = 9_000_000;
    let sources = gw.uplink_sources();
    let lab = &gw.lab;
    let config = gw.config.as_str();
    let slot = &mut gw.daemon;
    let download = thread::scope(|s| {
        let download =
            s.spawn(|| lab.http_download(&lab.client(1), BYTES, Duration::from_secs(20)));
        thread::sleep(Duration::from_secs(2));
        let mut daemon = slot.take().expect("a running daemon");
        let exit = daemon.terminate(Duration::from_secs(5)).unwrap();
        assert!(exit.success(), "daemon exit: {exit}\n{}", daemon.log());
        thread::sleep(Duration::from_millis(500));
        // No daemon: new flows are still balanced and translated.
        let fresh = lab
            .tcp_many(&lab.client(2), 10, None, Duration::from_secs(1))
            .unwrap();
        assert_eq!(
            (fresh.succeeded, fresh.failed),
            (10, 0),
            "new flows while no daemon runs: {fresh:?}"
        );
        assert!(
            fresh.sources.keys().all(|a| sources.contains(a)),
            "new flows while no daemon runs left untranslated: {fresh:?}"
        );
        thread::sleep(Duration::from_millis(1500));
        *slot = Some(start_daemon(lab, config));
        wait_for_dataplane(lab);
        assert!(
            !download.is_finished(),
            "the download ended before the new daemon adopted the data plane: the restart was \
             not tested"
        );
        download.join().unwrap()
    });
    let transfer = download.unwrap_or_else(|e| {
        panic!(
            "the download across the restart failed: {e:#}\n{}",
            gw.diagnostics()
        )
    });
    eprintln!("download across the restart: {transfer:?}");
    assert_eq!(transfer.bytes, BYTES);
    let gap = transfer
        .max_gap_ms
        .expect("http-get reports its longest stall");
    assert!(
        gap < 1500.0,
        "the download stalled for {gap:.0} ms: {transfer:?}"
    );
    // 10 Mbit/s tbf carries ~9.5 Mbit/s of TCP payload; a 1.5 s stall would pull the average
    // over ~8 s below ~8 Mbit/s.
    assert!(
        transfer.mbit_per_s >= 8.0,
        "average {:.2} Mbit/s over the restart, below the 8 Mbit/s floor: {transfer:?}",
        transfer.mbit_per_s
    );
    // The adopted data plane still counts: flows from before the restart are still there.
    let (_, rows) = stats(&gw.lab);
    let flows: u64 = rows.iter().map(|r| r.flows).sum();
    assert!(flows >= 11, "flows after adoption: {rows:?}");
    gw.stop_daemon();
}

/// Rates 20/20/10 Mbit/s: 4 streams from one host put traffic on every uplink, and 16 streams
/// (8 per host) fill them: aggregate goodput at least 90% of the 50 Mbit/s the links carry.
#[test]
fn parallel_streams_use_every_link_and_reach_the_sum_of_the_rates() {
    let gw = Gateway::up("tre", |p| LabSpec::new(p, 3));
    let lab = &gw.lab;

    // 4 streams, the first flows of this data plane, from one CPU (the round-robin cursor is per
    // CPU): smooth weighted round robin over 2:2:1 starts a b c a, so every uplink gets one.
    let (_, before) = stats(lab);
    let tool = lab.labtool().to_string_lossy().into_owned();
    let out = lab
        .exec(
            &lab.client(1),
            &[
                "taskset",
                "-c",
                "0",
                &tool,
                "streams",
                "198.18.9.1:9001",
                "--count",
                "4",
                "--seconds",
                "2",
            ],
        )
        .unwrap();
    let four: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "4 streams: no summary ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "4 streams failed: {four}");
    let (_, after) = stats(lab);
    eprintln!("4 streams by source: {}", four["sources"]);
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let rx = a.rx_bytes - b.rx_bytes;
        assert!(
            rx >= 200_000,
            "uplink {} ({}) received {rx} bytes during 4 streams; every link should carry one: \
             before {before:?} after {after:?}; streams {four}",
            i + 1,
            a.name
        );
    }
    for addr in gw.uplink_sources() {
        assert!(
            four["sources"][addr.to_string()]["streams"].as_u64() >= Some(1),
            "no stream left by {addr}: {four}"
        );
    }

    // 16 streams for 6 s; the first second (slow start) is left out of the steady rate.
    let (one, two) = thread::scope(|s| {
        let one = s.spawn(|| lab.streams(&lab.client(1), 8, 6.0, 1.0));
        let two = s.spawn(|| lab.streams(&lab.client(2), 8, 6.0, 1.0));
        (one.join().unwrap().unwrap(), two.join().unwrap().unwrap())
    });
    for (who, run) in [("client 1", &one), ("client 2", &two)] {
        assert_eq!(
            (run.succeeded, run.failed),
            (8, 0),
            "{who}: every stream must complete: {:?}",
            run.errors
        );
        assert!(
            run.sources.keys().all(|a| gw.uplink_sources().contains(a)),
            "{who}: untranslated sources: {:?}",
            run.sources
        );
    }
    let steady = one.steady_mbit_per_s + two.steady_mbit_per_s;
    let total = one.mbit_per_s + two.mbit_per_s;
    let mut rates: BTreeMap<Ipv4Addr, f64> = BTreeMap::new();
    for run in [&one, &two] {
        for (addr, share) in &run.sources {
            *rates.entry(*addr).or_default() +=
                share.steady_bytes as f64 * 8.0 / run.steady_seconds / 1e6;
        }
    }
    let by_source = rates
        .iter()
        .map(|(addr, rate)| format!("{addr} {rate:.2}"))
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!(
        "16 streams: {steady:.2} Mbit/s steady (after 1 s), {total:.2} Mbit/s over all 6 s; \
         per uplink {by_source}"
    );
    let sum_of_rates: f64 = (1..=3)
        .map(|i| f64::from(lab.spec().rate_mbit(i).unwrap()))
        .sum();
    assert!(
        steady >= 0.9 * sum_of_rates,
        "aggregate goodput {steady:.2} Mbit/s is below 90% of {sum_of_rates} Mbit/s; per uplink \
         {by_source}\n{}",
        gw.diagnostics()
    );
}

/// With checksum offload off on every veth of the path (so every packet carries a full, computed
/// checksum that the NAT must fix up, rather than a partial one), TCP, UDP and ICMP still work.
#[test]
fn the_nat_keeps_checksums_right_with_offload_off() {
    let gw = Gateway::up("trf", |p| LabSpec::new(p, 3));
    let lab = &gw.lab;
    let mut devices: Vec<(String, String)> = vec![
        (lab.gw(), "lanc1".into()),
        (lab.gw(), "lanc2".into()),
        (lab.client(1), "eth0".into()),
        (lab.client(2), "eth0".into()),
    ];
    for i in 1..=3 {
        devices.push((lab.gw(), lab.uplink_interface(i)));
        devices.push((lab.isp(i), "down0".into()));
    }
    for (ns, dev) in &devices {
        lab.exec_ok(ns, &["ethtool", "-K", dev, "tx", "off", "rx", "off"])
            .unwrap();
        let features = lab.exec_ok(ns, &["ethtool", "-k", dev]).unwrap();
        for feature in ["rx-checksumming: off", "tx-checksumming: off"] {
            assert!(
                features.contains(feature),
                "{ns}/{dev}: {feature} expected:\n{features}"
            );
        }
    }

    let (one, two) = thread::scope(|s| {
        let one = s.spawn(|| lab.tcp_many(&lab.client(1), 40, None, Duration::from_secs(1)));
        let two = s.spawn(|| lab.tcp_many(&lab.client(2), 40, None, Duration::from_secs(1)));
        (one.join().unwrap().unwrap(), two.join().unwrap().unwrap())
    });
    assert_all_through_uplinks(&gw, "client 1, offload off", &one);
    assert_all_through_uplinks(&gw, "client 2, offload off", &two);
    let mut seen = BTreeMap::new();
    merge(&mut seen, &one.sources);
    merge(&mut seen, &two.sources);
    assert_eq!(
        seen.keys().copied().collect::<BTreeSet<_>>(),
        gw.uplink_sources(),
        "80 connections should use every uplink: {seen:?}"
    );
    for c in 1..=2 {
        for _ in 0..3 {
            let seen = lab
                .udp_whoami(&lab.client(c), None, Duration::from_secs(2))
                .unwrap_or_else(|e| {
                    panic!(
                        "client {c}: UDP with offload off: {e:#}\n{}",
                        gw.diagnostics()
                    )
                });
            assert!(
                gw.uplink_sources().contains(seen.ip()),
                "UDP seen as {seen}"
            );
        }
        let ping = lab
            .ping(&lab.client(c), SERVER_ADDR, 3, Duration::from_secs(1))
            .unwrap();
        assert_eq!(
            ping.received, 3,
            "client {c}: ping with offload off: {ping:?}"
        );
    }
    // Full-size segments both ways through the translation.
    let transfer = lab
        .http_download(&lab.client(1), 2_000_000, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("download with offload off: {e:#}\n{}", gw.diagnostics()));
    assert_eq!(transfer.bytes, 2_000_000);
}

/// `balancer stats --json`, asked from another process, counts exactly the flows made, per
/// uplink, and still answers (with the same counts) after the daemon stopped.
#[test]
fn stats_count_every_flow_and_answer_without_the_daemon() {
    let mut gw = Gateway::up("trg", |p| LabSpec::new(p, 3));
    let lab = &gw.lab;
    let (_, before) = stats(lab);
    assert_eq!(
        before.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["isp1", "isp2", "isp3"],
        "one row per configured uplink, in order: {before:?}"
    );

    // 20 + 20 TCP connections, 5 UDP sockets (one flow each), one ICMP echo id: 46 flows.
    let (one, two) = thread::scope(|s| {
        let one = s.spawn(|| lab.tcp_many(&lab.client(1), 20, None, Duration::from_secs(1)));
        let two = s.spawn(|| lab.tcp_many(&lab.client(2), 20, None, Duration::from_secs(1)));
        (one.join().unwrap().unwrap(), two.join().unwrap().unwrap())
    });
    assert_all_through_uplinks(&gw, "client 1", &one);
    assert_all_through_uplinks(&gw, "client 2", &two);
    for _ in 0..5 {
        lab.udp_whoami(&lab.client(1), None, Duration::from_secs(2))
            .unwrap();
    }
    let ping = lab
        .ping(&lab.client(2), SERVER_ADDR, 3, Duration::from_secs(1))
        .unwrap();
    assert_eq!(ping.received, 3, "{ping:?}");

    let (json, after) = stats(lab);
    let made: u64 = 20 + 20 + 5 + 1;
    let counted: u64 = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.flows - b.flows)
        .sum();
    eprintln!("stats after {made} flows: {json}");
    assert_eq!(
        counted, made,
        "flows counted per uplink must add up to the flows made: before {before:?} after {after:?}"
    );
    for (a, b) in after.iter().zip(&before) {
        assert!(
            a.flows > b.flows && a.tx_bytes > b.tx_bytes && a.rx_bytes > b.rx_bytes,
            "uplink {} carried nothing: before {b:?} after {a:?}",
            a.name
        );
    }
    let table = balancer(lab, &["stats"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.status.success() && ["isp1", "isp2", "isp3"].iter().all(|n| text.contains(n)),
        "`balancer stats` table: {}{text}",
        String::from_utf8_lossy(&table.stderr)
    );

    // The daemon stops; the pinned counters stay readable and unchanged.
    gw.stop_daemon();
    let (_, stopped) = stats(&gw.lab);
    assert_eq!(
        stopped.iter().map(|r| r.flows).collect::<Vec<_>>(),
        after.iter().map(|r| r.flows).collect::<Vec<_>>(),
        "flow counts after the daemon stopped: {stopped:?}"
    );
}
