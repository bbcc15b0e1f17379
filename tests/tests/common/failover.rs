//! Helpers of the failover tests: a config with `track`, an uplink's health from `status`,
//! waiting for it to be up, and a silent black hole at an ISP.

use std::{
    thread,
    time::{Duration, Instant},
};

use balancer_tests::lab::Lab;

use super::*;

pub fn tracked_config(lab: &Lab, target: &str) -> String {
    lab.balancer_config_toml()
        .replace("weight =", &format!("track = [\"{target}\"]\nweight ="))
}

pub fn health_of(lab: &Lab, uplink: usize) -> serde_json::Value {
    let output = balancer(lab, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    status["uplinks"][uplink - 1]["health"].clone()
}

pub fn wait_until_up(lab: &Lab, uplink: usize, within: Duration) {
    let started = Instant::now();
    loop {
        let health = health_of(lab, uplink);
        if health["state"] == "up" && health["passive"].is_null() {
            return;
        }
        assert!(
            started.elapsed() < within,
            "uplink {uplink} not up: {health:#}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Drops everything ISP `isp` would forward, both ways (a silent black hole), or lifts it.
pub fn black_hole(lab: &Lab, isp: usize, on: bool) {
    for (priority, interface) in [("50", "down0"), ("51", "up0")] {
        let argv: Vec<&str> = if on {
            vec![
                "ip",
                "rule",
                "add",
                "priority",
                priority,
                "iif",
                interface,
                "blackhole",
            ]
        } else {
            vec!["ip", "rule", "del", "priority", priority]
        };
        lab.exec_ok(&lab.isp(isp), &argv).unwrap();
    }
}
