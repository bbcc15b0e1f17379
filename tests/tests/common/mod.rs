//! Helpers shared by the control-plane integration tests: finding the `balancer` binary, running
//! its daemon in a lab namespace, and snapshotting the kernel state it may change.
//! [`transparent`]: the transparent data-plane tests' `Gateway` fixture and shared checks.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod failover;
pub mod field;
pub mod office;
pub mod transparent;

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Output,
    time::{Duration, Instant},
};

use balancer_tests::{lab::Lab, process::ChildGuard};

/// The `balancer` binary under test: `$BALANCER_BIN`, else next to the test binary's directory
/// (target/<profile>/balancer). `cargo xtask test` builds it before running the tests.
pub fn balancer_bin() -> String {
    if let Some(path) = std::env::var_os("BALANCER_BIN") {
        return PathBuf::from(path).display().to_string();
    }
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let path = profile_dir.join("balancer");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p balancer` (or `cargo xtask test`)",
        path.display()
    );
    // `cargo test -p balancer-tests` does not rebuild the binary the lab tests drive: refuse a
    // stale one rather than silently test old code.
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .expect("binary mtime");
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    if let Some(newer) = newest_source(&workspace).filter(|(time, _)| *time > built) {
        panic!(
            "{} is older than {}: run `cargo build -p balancer` (or `cargo xtask test`)",
            path.display(),
            newer.1.display()
        );
    }
    path.display().to_string()
}

/// The most recently modified Rust source of the daemon (its library, kernel programs and ABI).
fn newest_source(workspace: &std::path::Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    let mut pending: Vec<PathBuf> = ["balancer/src", "balancer-ebpf/src", "balancer-common/src"]
        .iter()
        .map(|dir| workspace.join(dir))
        .collect();
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(modified) = entry.metadata().and_then(|m| m.modified())
                && newest.as_ref().is_none_or(|(time, _)| modified > *time)
            {
                newest = Some((modified, path));
            }
        }
    }
    newest
}

/// A unique, short lab prefix for one test.
pub fn prefix(tag: &str) -> String {
    format!("bal-{tag}{}", std::process::id() % 100_000)
}

/// Writes a config file for the lab and returns its path.
pub fn write_config(lab: &Lab, name: &str, text: &str) -> String {
    let path = lab.state_dir().join(name);
    std::fs::write(&path, text).expect("writing config");
    path.display().to_string()
}

/// Runs `balancer args…` in the gateway namespace to completion.
pub fn balancer(lab: &Lab, args: &[&str]) -> Output {
    let bin = balancer_bin();
    let argv: Vec<&str> = std::iter::once(bin.as_str())
        .chain(args.iter().copied())
        .collect();
    lab.exec(&lab.gw(), &argv).expect("running balancer")
}

/// Starts `balancer run -c config` in the gateway and waits until its status socket answers,
/// asked from a separate `ip netns exec` process (which gets its own /sys, as an operator's would).
pub fn start_daemon(lab: &Lab, config: &str) -> ChildGuard {
    let bin = balancer_bin();
    let mut daemon = lab
        .spawn(&lab.gw(), &[&bin, "run", "-c", config])
        .expect("starting the daemon");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = balancer(lab, &["status", "--json"]);
        if output.status.success() {
            let status: serde_json::Value =
                serde_json::from_slice(&output.stdout).expect("status JSON");
            assert_eq!(
                status["version"], 2,
                "status version 2 only adds fields to 1"
            );
            return daemon;
        }
        if let Some(exit) = daemon.try_wait().expect("polling the daemon") {
            panic!(
                "daemon exited with {exit} before serving:\n{}",
                daemon.log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "daemon never answered on its socket:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Everything in the gateway the balancer may touch: rules, routes of every table, and the
/// IPv4 settings of every interface, as text that compares exactly.
pub fn snapshot(lab: &Lab) -> String {
    let gw = lab.gw();
    let rules = lab.exec_ok(&gw, &["ip", "rule", "show"]).unwrap();
    let routes = lab
        .exec_ok(&gw, &["ip", "route", "show", "table", "all"])
        .unwrap();
    let settings = lab
        .exec_ok(&gw, &["sh", "-c", "grep -r . /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv4/conf/*/arp_filter /proc/sys/net/ipv4/conf/*/arp_announce /proc/sys/net/ipv4/conf/*/src_valid_mark /proc/sys/net/ipv4/conf/*/rp_filter | sort"])
        .unwrap();
    format!("== rules\n{rules}== routes\n{routes}== settings\n{settings}")
}

/// The rules tagged as the balancer's, as `ip rule` prints them.
pub fn owned_rules(lab: &Lab) -> Vec<String> {
    lab.exec_ok(&lab.gw(), &["ip", "rule", "show"])
        .unwrap()
        .lines()
        .filter(|l| l.contains("proto 77"))
        .map(str::to_string)
        .collect()
}

/// The routes tagged as the balancer's, in every table.
pub fn owned_routes(lab: &Lab) -> Vec<String> {
    lab.exec_ok(
        &lab.gw(),
        &["ip", "route", "show", "table", "all", "proto", "77"],
    )
    .unwrap()
    .lines()
    .map(str::to_string)
    .collect()
}

/// Asks the internet host who it sees, from the gateway bound to `source`, and checks that
/// only `via_isp`'s wire carried it (the others may see at most an ARP probe of their own).
pub fn assert_leaves_by(
    lab: &Lab,
    source: Option<Ipv4Addr>,
    via_isp: usize,
    expected_source: Ipv4Addr,
) {
    let before: Vec<u64> = (1..=lab.uplinks())
        .map(|i| lab.isp_rx_packets(i).unwrap())
        .collect();
    let seen = lab
        .tcp_whoami(&lab.gw(), source, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("TCP from {source:?} should reach the internet host: {e:#}"));
    assert_eq!(
        *seen.ip(),
        expected_source,
        "the internet host must see the uplink's address"
    );
    let udp = lab
        .udp_whoami(&lab.gw(), source, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("UDP from {source:?} should reach the internet host: {e:#}"));
    assert_eq!(*udp.ip(), expected_source);
    for i in 1..=lab.uplinks() {
        let delta = lab.isp_rx_packets(i).unwrap() - before[i - 1];
        if i == via_isp {
            assert!(
                delta >= 6,
                "ISP {i} should have carried the exchange, saw {delta} packets"
            );
        } else {
            assert!(
                delta <= 2,
                "ISP {i} saw {delta} packets of traffic meant for ISP {via_isp}"
            );
        }
    }
}

/// One uplink's row of `balancer stats --json`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UplinkStats {
    pub name: String,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Transparent flows assigned to the uplink since the programs were first attached.
    pub flows: u64,
}

/// `balancer stats --json` in the gateway, from a separate process: the parsed document and
/// its uplink rows. Panics with the command's output if it fails or the JSON is not version 1.
pub fn stats(lab: &Lab) -> (serde_json::Value, Vec<UplinkStats>) {
    let output = balancer(lab, &["stats", "--json"]);
    assert!(
        output.status.success(),
        "`balancer stats --json` failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim(),
        String::from_utf8_lossy(&output.stdout).trim()
    );
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "`balancer stats --json` printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    assert_eq!(value["version"], 1, "stats version: {value}");
    let rows = value["uplinks"]
        .as_array()
        .unwrap_or_else(|| panic!("stats without an uplinks array: {value}"))
        .iter()
        .map(|row| {
            let field = |name: &str| {
                row[name]
                    .as_u64()
                    .unwrap_or_else(|| panic!("stats uplink row without {name}: {row}"))
            };
            UplinkStats {
                name: row["name"].as_str().unwrap_or_default().to_string(),
                tx_packets: field("tx_packets"),
                tx_bytes: field("tx_bytes"),
                rx_packets: field("rx_packets"),
                rx_bytes: field("rx_bytes"),
                flows: field("flows"),
            }
        })
        .collect();
    (value, rows)
}

/// Waits (up to 10 s) until `balancer stats --json` answers with one row per lab uplink: the
/// daemon has loaded and attached the data plane. Panics with the last answer otherwise.
pub fn wait_for_dataplane(lab: &Lab) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = balancer(lab, &["stats", "--json"]);
        let rows = serde_json::from_slice::<serde_json::Value>(&output.stdout)
            .ok()
            .and_then(|v| v["uplinks"].as_array().map(Vec::len));
        if output.status.success() && rows == Some(lab.uplinks()) {
            return;
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !stderr.contains("unrecognized subcommand"),
            "this balancer has no `stats` subcommand (no data plane yet): {}",
            stderr.trim()
        );
        assert!(
            Instant::now() < deadline,
            "the data plane never showed up in `balancer stats --json` ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
