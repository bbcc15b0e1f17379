//! Failover that never hurts under load, in the lab: a line shaped to 8 Mbit/s with a 1 s modem
//! queue each way, saturated for 30 s by LAN clients and then by the gateway itself, is never
//! reported down, while a black hole on another uplink during that load is still found within
//! 1 s. (The other failover cases are in `failover.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    thread,
    time::{Duration, Instant},
};

use balancer_tests::lab::{Lab, LabSpec};
use common::{failover::*, *};

/// Replaces uplink 1's shaping with 8 Mbit/s and a 1 s queue each way, as a DSL or LTE modem.
fn deep_queue_on_uplink_1(lab: &Lab) {
    let tbf = |dev: &str| {
        format!("qdisc replace dev {dev} root tbf rate 8mbit burst 16384 latency 1000ms")
    };
    let gw_tbf = tbf(&lab.uplink_interface(1));
    let isp_tbf = tbf("down0");
    lab.exec_ok(
        &lab.gw(),
        &["tc"]
            .into_iter()
            .chain(gw_tbf.split(' '))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    lab.exec_ok(
        &lab.isp(1),
        &["tc"]
            .into_iter()
            .chain(isp_tbf.split(' '))
            .collect::<Vec<_>>(),
    )
    .unwrap();
}

/// Bytes queued in the root qdisc of `device` in `ns` now.
fn backlog_bytes(lab: &Lab, ns: &str, device: &str) -> u64 {
    let text = lab
        .exec_ok(ns, &["tc", "-s", "qdisc", "show", "dev", device])
        .unwrap();
    text.split_whitespace()
        .skip_while(|word| *word != "backlog")
        .nth(1)
        .and_then(|bytes| bytes.strip_suffix('b'))
        .and_then(|bytes| bytes.parse().ok())
        .unwrap_or(0)
}

/// What a loaded phase saw: the worst RTT status showed for uplink 1, the deepest queue each
/// way on it (bytes), and how long the black hole on the other uplink took to be found.
struct Phase {
    worst_rtt_ms: f64,
    worst_loss_percent: f64,
    worst_queue: (u64, u64),
    detected: Duration,
}

/// Watches uplink 1 under load for `duration`, asserting it is never reported down; half-way,
/// black-holes uplink `victim` and measures how long until that one is reported down.
fn watch_loaded_line(lab: &Lab, victim: usize, duration: Duration) -> Phase {
    let started = Instant::now();
    let mut cut: Option<Instant> = None;
    let mut detected: Option<Duration> = None;
    let mut worst_rtt = 0.0f64;
    let mut worst_loss = 0.0f64;
    let mut worst_queue = (0u64, 0u64);
    let mut next_queue_sample = Duration::ZERO;
    while started.elapsed() < duration {
        let output = balancer(lab, &["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let loaded = &status["uplinks"][0]["health"];
        assert!(
            loaded["state"] != "down" && loaded["passive"].is_null(),
            "the saturated uplink was reported down after {:?}: {loaded:#}",
            started.elapsed()
        );
        worst_rtt = worst_rtt.max(loaded["rtt_ms"].as_f64().unwrap_or(0.0));
        worst_loss = worst_loss.max(loaded["loss_percent"].as_f64().unwrap_or(0.0));
        if started.elapsed() >= next_queue_sample {
            next_queue_sample += Duration::from_millis(500);
            let upstream = backlog_bytes(lab, &lab.gw(), &lab.uplink_interface(1));
            let downstream = backlog_bytes(lab, &lab.isp(1), "down0");
            worst_queue.0 = worst_queue.0.max(upstream);
            worst_queue.1 = worst_queue.1.max(downstream);
        }
        if cut.is_none() && started.elapsed() >= duration / 2 {
            black_hole(lab, victim, true);
            cut = Some(Instant::now());
        }
        if let Some(cut) = cut
            && detected.is_none()
            && status["uplinks"][victim - 1]["health"]["state"] == "down"
        {
            detected = Some(cut.elapsed());
        }
        thread::sleep(Duration::from_millis(50));
    }
    black_hole(lab, victim, false);
    let detected = detected.expect("the black hole was never detected");
    Phase {
        worst_rtt_ms: worst_rtt,
        worst_loss_percent: worst_loss,
        worst_queue,
        detected,
    }
}

/// A phase's load really built a deep queue both ways, and the black hole was found in time.
fn check_phase(what: &str, phase: &Phase) {
    println!(
        "{what}: uplink 1 never down; worst RTT in status {} ms, probe loss {} %, deepest queue up {} B / down {} B; black hole found in {:?}",
        phase.worst_rtt_ms,
        phase.worst_loss_percent,
        phase.worst_queue.0,
        phase.worst_queue.1,
        phase.detected
    );
    // 8 Mbit/s is 1 MB/s: half a second of queue each way at least.
    assert!(
        phase.worst_queue.0 >= 500_000 && phase.worst_queue.1 >= 500_000,
        "{what}: the load did not fill the queues: {:?}",
        phase.worst_queue
    );
    assert!(
        phase.detected <= Duration::from_secs(1),
        "{what}: black hole found in {:?}",
        phase.detected
    );
}

#[test]
fn a_saturated_line_with_a_one_second_queue_is_never_down() {
    let mut spec = LabSpec::new(&prefix("fq"), 3);
    spec.rates_mbit = vec![8, 20, 20];
    let lab = Lab::up(spec).unwrap();
    deep_queue_on_uplink_1(&lab);
    let config = write_config(&lab, "balancer.toml", &tracked_config(&lab, "198.18.9.1"));
    let _daemon = start_daemon(&lab, &config);
    for uplink in 1..=3 {
        wait_until_up(&lab, uplink, Duration::from_secs(5));
    }
    // LAN clients saturate uplink 1 both ways (iperf3, 8 streams each way): the server runs on
    // ISP 1's router, in uplink 1's subnet, so these flows are forced onto uplink 1 and
    // translated like any flow.
    let _modem_server = lab
        .spawn(
            &lab.isp(1),
            &["iperf3", "-s", "-B", "198.18.1.1", "-p", "5201"],
        )
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    let load = ["-P", "8", "-t", "30", "--bidir", "-p", "5201"];
    let mut lan_load = lab
        .spawn(
            &lab.client(1),
            &[["iperf3", "-c", "198.18.1.1"].as_slice(), &load].concat(),
        )
        .unwrap();
    let phase = watch_loaded_line(&lab, 3, Duration::from_secs(30));
    check_phase("LAN clients' load", &phase);
    let exit = lan_load.wait_timeout(Duration::from_secs(15)).unwrap();
    assert!(exit.is_some_and(|e| e.success()), "{}", lan_load.log());
    wait_until_up(&lab, 3, Duration::from_secs(5));

    // The gateway itself saturates uplink 1 both ways, from sockets bound to its address.
    let source = lab.uplink_source(1).to_string();
    let mut own_load = lab
        .spawn(
            &lab.gw(),
            &[
                ["iperf3", "-c", "198.18.9.1", "-B", &source].as_slice(),
                &load,
            ]
            .concat(),
        )
        .unwrap();
    let phase = watch_loaded_line(&lab, 2, Duration::from_secs(30));
    check_phase("the gateway's own load", &phase);
    let exit = own_load.wait_timeout(Duration::from_secs(15)).unwrap();
    assert!(exit.is_some_and(|e| e.success()), "{}", own_load.log());
}
