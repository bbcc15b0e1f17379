//! The data plane's lifecycle in the lab: expired flows are swept from both tables, and `down`
//! detaches the programs and removes the pins.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use balancer_tests::lab::{Lab, LabSpec};
use common::*;

fn stats(lab: &Lab) -> serde_json::Value {
    let output = balancer(lab, &["stats", "--json"]);
    assert!(
        output.status.success(),
        "stats: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn expired_flows_are_swept_and_down_detaches_everything() {
    let mut spec = LabSpec::new(&prefix("lc"), 2);
    spec.rates_mbit = Vec::new();
    let lab = Lab::up(spec).unwrap();
    let text = format!(
        "{}\n[dataplane]\nudp_timeout = 1\n",
        lab.balancer_config_toml()
    );
    let config = write_config(&lab, "balancer.toml", &text);
    let daemon = start_daemon(&lab, &config);

    for _ in 0..3 {
        let seen = lab
            .udp_whoami(&lab.client(1), None, Duration::from_secs(3))
            .unwrap();
        assert!(
            [lab.uplink_source(1), lab.uplink_source(2)].contains(seen.ip()),
            "translated: {seen}"
        );
    }
    let before = stats(&lab);
    assert_eq!(before["flow_entries"], 3, "{before:#}");
    assert_eq!(before["reverse_entries"], 3, "{before:#}");

    // UDP times out after 1 s; the sweeper runs every 10 s.
    std::thread::sleep(Duration::from_millis(1500));
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let now = stats(&lab);
        let active: u64 = now["uplinks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["active_flows"].as_u64().unwrap())
            .sum();
        assert_eq!(active, 0, "a timed-out flow is not active: {now:#}");
        if now["flow_entries"] == 0 && now["reverse_entries"] == 0 {
            let flows: u64 = now["uplinks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u["flows"].as_u64().unwrap())
                .sum();
            assert_eq!(flows, 3, "the running count of assigned flows stays");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sweeper never removed the expired flows: {now:#}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    drop(daemon);
    let pins = std::fs::read_dir("/run/balancer/bpffs").unwrap().count();
    let down = balancer(&lab, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let said = String::from_utf8_lossy(&down.stdout);
    assert!(
        said.contains("5 data plane link(s)"),
        "LAN ingress, and egress + ingress per uplink: {said}"
    );
    assert_eq!(
        std::fs::read_dir("/run/balancer/bpffs").unwrap().count(),
        pins - 1,
        "this namespace's pins are gone"
    );
    // Without the programs, a LAN client's packets are no longer translated and the ISPs drop them.
    assert!(
        lab.udp_whoami(&lab.client(1), None, Duration::from_millis(800))
            .is_err()
    );
    assert!(
        !balancer(&lab, &["stats"]).status.success(),
        "no data plane left to report on"
    );
}
