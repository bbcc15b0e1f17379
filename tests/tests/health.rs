//! Uplink health and failover in the lab: new connections keep working when a line dies
//! silently or loses its link, and the line rejoins after the hysteresis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::{SocketAddr, TcpStream},
    os::fd::AsFd,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use balancer_tests::lab::{Lab, LabSpec};
use common::*;

/// A config for the lab with a health probe target on every uplink.
fn tracked_config(lab: &Lab) -> String {
    lab.balancer_config_toml()
        .replace("weight =", "track = [\"198.18.9.1\"]\nweight =")
}

/// A lab with `uplinks` uplinks (shaped or not), each probing the internet host, the daemon
/// running, and every uplink judged up. The daemon is dropped (killed) before the lab.
fn lab_with_daemon(
    tag: &str,
    uplinks: usize,
    shaped: bool,
) -> (Lab, balancer_tests::process::ChildGuard) {
    let mut spec = LabSpec::new(&prefix(tag), uplinks);
    if !shaped {
        spec.rates_mbit = Vec::new();
    }
    let lab = Lab::up(spec).unwrap();
    let config = write_config(&lab, "balancer.toml", &tracked_config(&lab));
    let daemon = start_daemon(&lab, &config);
    for uplink in 1..=uplinks {
        wait_for_state(&lab, uplink, "up", Duration::from_secs(5));
    }
    (lab, daemon)
}

fn health_of(lab: &Lab, uplink: usize) -> serde_json::Value {
    let output = balancer(lab, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    status["uplinks"][uplink - 1]["health"].clone()
}

/// Waits until uplink `uplink`'s probe verdict is `state` (for "up": and no passive verdict
/// holds it down either); returns how long that took.
fn wait_for_state(lab: &Lab, uplink: usize, state: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let health = health_of(lab, uplink);
        let passive_clear = state != "up" || health["passive"].is_null();
        if health["state"] == state && passive_clear {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "uplink {uplink} not {state} after {within:?}: {health:#}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Opens a new TCP connection to the whoami server from `client` every 50 ms for `duration`
/// (each with a 2 s connect timeout) and returns, per attempt, when it started relative to
/// `since`, and whether it connected.
fn connection_stream(client: &str, since: Instant, duration: Duration) -> Vec<(Duration, bool)> {
    let netns = format!("/run/netns/{client}");
    thread::spawn(move || {
        // setns changes only this thread; the threads it spawns inherit the namespace.
        let namespace = std::fs::File::open(&netns).unwrap();
        nix::sched::setns(namespace.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let server: SocketAddr = "198.18.9.1:9000".parse().unwrap();
        let (results, outcomes) = mpsc::channel();
        let started = Instant::now();
        let mut attempts = 0;
        while started.elapsed() < duration {
            let offset = since.elapsed();
            let results = results.clone();
            thread::spawn(move || {
                let ok = TcpStream::connect_timeout(&server, Duration::from_secs(2)).is_ok();
                let _ = results.send((offset, ok));
            });
            attempts += 1;
            thread::sleep(Duration::from_millis(50));
        }
        drop(results);
        let mut all: Vec<(Duration, bool)> = outcomes.iter().take(attempts).collect();
        all.sort_by_key(|(offset, _)| *offset);
        all
    })
    .join()
    .unwrap()
}

/// The attempts started at or after `after` that failed.
fn failures_after(attempts: &[(Duration, bool)], after: Duration) -> Vec<Duration> {
    attempts
        .iter()
        .filter(|(offset, ok)| *offset >= after && !ok)
        .map(|(offset, _)| *offset)
        .collect()
}

#[test]
fn a_silently_dead_line_is_left_within_a_second_and_rejoins_after_the_hysteresis() {
    let (lab, _daemon) = lab_with_daemon("hs", 3, false);

    // ISP 3 keeps answering for its own address but forwards nothing any more.
    let isp3 = lab.isp(3);
    let client = lab.client(1);
    let cut = Instant::now();
    lab.exec_ok(
        &isp3,
        &[
            "ip",
            "rule",
            "add",
            "priority",
            "50",
            "iif",
            "down0",
            "blackhole",
        ],
    )
    .unwrap();
    let attempts = connection_stream(&client, cut, Duration::from_millis(2500));
    let late_failures = failures_after(&attempts, Duration::from_secs(1));
    assert!(
        late_failures.is_empty(),
        "new connections failed after 1 s: {late_failures:?} of {attempts:?}"
    );
    let health = health_of(&lab, 3);
    assert_eq!(health["state"], "down", "{health:#}");
    assert!(
        health["reason"].as_str().unwrap().contains("lost"),
        "{health:#}"
    );

    // The line comes back: it takes new flows again after the hysteresis.
    lab.exec_ok(&isp3, &["ip", "rule", "del", "priority", "50"])
        .unwrap();
    let rejoined = wait_for_state(&lab, 3, "up", Duration::from_secs(5));
    assert!(
        rejoined >= Duration::from_millis(800),
        "up only after the hysteresis, took {rejoined:?}"
    );
    let spread = lab
        .tcp_many(&client, 20, None, Duration::from_secs(2))
        .unwrap();
    assert!(
        spread.sources.contains_key(&lab.uplink_source(3)),
        "uplink 3 carries new flows again: {spread:?}"
    );
}

#[test]
fn a_lost_link_is_left_within_200_ms() {
    let (lab, _daemon) = lab_with_daemon("hl", 3, false);
    let isp2 = lab.isp(2);
    let client = lab.client(1);
    let cut = Instant::now();
    // The modem side goes down: the gateway's wan2 loses carrier.
    lab.exec_ok(&isp2, &["ip", "link", "set", "down0", "down"])
        .unwrap();
    let attempts = connection_stream(&client, cut, Duration::from_millis(1500));
    let late_failures = failures_after(&attempts, Duration::from_millis(200));
    assert!(
        late_failures.is_empty(),
        "new connections failed after 200 ms: {late_failures:?} of {attempts:?}"
    );
    lab.exec_ok(&isp2, &["ip", "link", "set", "down0", "up"])
        .unwrap();
}

#[test]
fn a_download_on_a_line_that_dies_ends_with_a_reset_instead_of_hanging() {
    let (lab, _daemon) = lab_with_daemon("hr", 2, true);
    let labtool = lab.labtool().display().to_string();
    let mut download = lab
        .spawn(
            &lab.client(1),
            &[&labtool, "download", "198.18.9.1:9001", "--seconds", "10"],
        )
        .unwrap();
    thread::sleep(Duration::from_secs(1));
    let stats: serde_json::Value =
        serde_json::from_slice(&balancer(&lab, &["stats", "--json"]).stdout).unwrap();
    let carrying: Vec<u64> = stats["uplinks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["active_flows"].as_u64() > Some(0))
        .map(|u| u["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        carrying.len(),
        1,
        "exactly one uplink carries the download: {stats:#}"
    );
    let dead = carrying[0] as usize;

    // The line dies silently while the client is only receiving.
    let cut = Instant::now();
    lab.exec_ok(
        &lab.isp(dead),
        &[
            "ip",
            "rule",
            "add",
            "priority",
            "50",
            "iif",
            "down0",
            "blackhole",
        ],
    )
    .unwrap();
    lab.exec_ok(
        &lab.isp(dead),
        &[
            "ip",
            "rule",
            "add",
            "priority",
            "51",
            "iif",
            "up0",
            "blackhole",
        ],
    )
    .unwrap();
    let exit = download
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("the download must end, not hang");
    let ended = cut.elapsed();
    assert!(
        !exit.success(),
        "the download must end with an error: {}",
        download.log()
    );
    assert!(
        download.log().contains("reset"),
        "ended by a reset: {}",
        download.log()
    );
    assert!(
        ended <= Duration::from_millis(2500),
        "reset {ended:?} after the cut"
    );
}

#[test]
fn a_line_that_passes_pings_but_drops_tcp_is_marked_down_by_the_passive_signal() {
    let (lab, _daemon) = lab_with_daemon("hp", 3, false);
    let client = lab.client(1);
    let cut = Instant::now();
    // ISP 3 still forwards ICMP (the probes answer) but drops every TCP packet.
    lab.exec_ok(
        &lab.isp(3),
        &[
            "ip",
            "rule",
            "add",
            "priority",
            "50",
            "iif",
            "down0",
            "ipproto",
            "tcp",
            "blackhole",
        ],
    )
    .unwrap();
    let traffic =
        thread::spawn(move || connection_stream(&client, cut, Duration::from_millis(3500)));
    let condemned = loop {
        let health = health_of(&lab, 3);
        if health["passive"].is_string() {
            break cut.elapsed();
        }
        assert!(
            cut.elapsed() < Duration::from_secs(4),
            "never marked down passively: {health:#}"
        );
        thread::sleep(Duration::from_millis(50));
    };
    println!("passive verdict seen {condemned:?} after the cut");
    assert!(
        condemned <= Duration::from_secs(2),
        "marked down {condemned:?} after the cut"
    );
    assert_eq!(
        health_of(&lab, 3)["state"],
        "up",
        "the probes alone still say up: only the passive signal saw it"
    );
    let attempts = traffic.join().unwrap();
    let late_failures = failures_after(&attempts, Duration::from_millis(2500));
    assert!(
        late_failures.is_empty(),
        "new connections failed after the passive verdict: {late_failures:?}"
    );

    // Only a TCP connect through the line clears the verdict.
    lab.exec_ok(&lab.isp(3), &["ip", "rule", "del", "priority", "50"])
        .unwrap();
    let started = Instant::now();
    while health_of(&lab, 3)["passive"].is_string() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "never rejoined after TCP works again"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Starts a 10 s download from client 1 and returns it with the id of the uplink carrying it.
fn download_and_its_uplink(lab: &Lab) -> (balancer_tests::process::ChildGuard, usize) {
    let labtool = lab.labtool().display().to_string();
    let download = lab
        .spawn(
            &lab.client(1),
            &[&labtool, "download", "198.18.9.1:9001", "--seconds", "10"],
        )
        .unwrap();
    thread::sleep(Duration::from_secs(1));
    let stats: serde_json::Value =
        serde_json::from_slice(&balancer(lab, &["stats", "--json"]).stdout).unwrap();
    let carrying: Vec<u64> = stats["uplinks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["active_flows"].as_u64() > Some(0))
        .map(|u| u["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        carrying.len(),
        1,
        "exactly one uplink carries the download: {stats:#}"
    );
    (download, carrying[0] as usize)
}

#[test]
fn flows_on_a_healthy_uplink_see_no_reset_and_no_pause_when_another_dies() {
    let (lab, _daemon) = lab_with_daemon("hh", 2, true);
    let (mut download, carrying) = download_and_its_uplink(&lab);
    let other = 3 - carrying;
    lab.exec_ok(
        &lab.isp(other),
        &[
            "ip",
            "rule",
            "add",
            "priority",
            "50",
            "iif",
            "down0",
            "blackhole",
        ],
    )
    .unwrap();
    wait_for_state(&lab, other, "down", Duration::from_secs(3));
    let exit = download
        .wait_timeout(Duration::from_secs(12))
        .unwrap()
        .expect("the download ends on its own");
    assert!(
        exit.success(),
        "the healthy uplink's download must complete: {}",
        download.log()
    );
    let summary: serde_json::Value =
        serde_json::from_str(download.log().lines().last().unwrap()).unwrap();
    let gap = summary["max_gap_ms"].as_f64().unwrap();
    assert!(
        gap < 500.0,
        "no pause on the healthy uplink, longest gap {gap} ms"
    );
}

#[test]
fn when_every_uplink_is_down_those_with_carrier_keep_working_and_nothing_is_reset() {
    let (lab, _daemon) = lab_with_daemon("ha", 2, true);
    let (mut download, _) = download_and_its_uplink(&lab);
    // Both lines go silent: the probes condemn both, but the office must not be cut off by it.
    for isp in 1..=2 {
        lab.exec_ok(
            &lab.isp(isp),
            &[
                "ip",
                "rule",
                "add",
                "priority",
                "50",
                "iif",
                "down0",
                "blackhole",
            ],
        )
        .unwrap();
    }
    for uplink in 1..=2 {
        wait_for_state(&lab, uplink, "down", Duration::from_secs(3));
    }
    thread::sleep(Duration::from_millis(2500));
    assert!(
        download.try_wait().unwrap().is_none(),
        "no reset while every uplink is down: {}",
        download.log()
    );
    let stats: serde_json::Value =
        serde_json::from_slice(&balancer(&lab, &["stats", "--json"]).stdout).unwrap();
    assert!(
        stats["uplinks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["enabled"] == true),
        "uplinks with carrier stay in use: {stats:#}"
    );
    // A line comes back: traffic flows again without anyone touching the daemon.
    lab.exec_ok(&lab.isp(1), &["ip", "rule", "del", "priority", "50"])
        .unwrap();
    wait_for_state(&lab, 1, "up", Duration::from_secs(5));
    let seen = lab
        .tcp_whoami(&lab.client(1), None, Duration::from_secs(3))
        .unwrap();
    assert_eq!(*seen.ip(), lab.uplink_source(1));
}
