//! The transparent data-plane tests' fixture: a lab with the balancer running in its gateway
//! ([`Gateway`], one at a time under a shared lock), and the checks and clients those tests share.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use balancer_tests::{
    lab::{Lab, LabSpec, SERVER_ADDR, TcpMany, WHOAMI_PORT},
    process::ChildGuard,
};

use super::*;

/// The data plane's translated ports (the contract: `uplink_egress` picks from this range).
pub const NAT_PORTS: std::ops::RangeInclusive<u16> = 32768..=65535;

static SERIAL: Mutex<()> = Mutex::new(());

/// A lab with the balancer running in its gateway and the data plane attached.
pub struct Gateway {
    pub daemon: Option<ChildGuard>,
    pub config: String,
    pub lab: Lab,
    _serial: MutexGuard<'static, ()>,
}

impl Gateway {
    pub fn up(tag: &str, spec: impl FnOnce(&str) -> LabSpec) -> Gateway {
        Gateway::up_with(tag, spec, Lab::balancer_config_toml)
    }

    /// Like [`Gateway::up`], with the config text `config` makes for the lab.
    pub fn up_with(
        tag: &str,
        spec: impl FnOnce(&str) -> LabSpec,
        config: impl FnOnce(&Lab) -> String,
    ) -> Gateway {
        let serial = SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let lab = Lab::up(spec(&prefix(tag))).unwrap_or_else(|e| panic!("lab up: {e:#}"));
        let config = write_config(&lab, "balancer.toml", &config(&lab));
        let daemon = start_daemon(&lab, &config);
        let gateway = Gateway {
            daemon: Some(daemon),
            config,
            lab,
            _serial: serial,
        };
        // From here on a panic drops the gateway, which also runs `balancer down`.
        wait_for_dataplane(&gateway.lab);
        gateway
    }

    /// SIGTERM to the daemon; it must exit cleanly (leaving the data plane in place).
    pub fn stop_daemon(&mut self) {
        let mut daemon = self.daemon.take().expect("a running daemon");
        let exit = daemon.terminate(Duration::from_secs(5)).unwrap();
        assert!(exit.success(), "daemon exit: {exit}\n{}", daemon.log());
    }

    /// The uplink addresses, the only sources the internet host may ever see.
    pub fn uplink_sources(&self) -> BTreeSet<Ipv4Addr> {
        (1..=self.lab.uplinks())
            .map(|i| self.lab.uplink_source(i))
            .collect()
    }

    /// Each uplink's share of new flows by its configured weight (rates 20/20/10 -> 2:2:1).
    pub fn weight_shares(&self) -> BTreeMap<Ipv4Addr, f64> {
        let rates: Vec<f64> = (1..=self.lab.uplinks())
            .map(|i| f64::from(self.lab.spec().rate_mbit(i).unwrap_or(1)))
            .collect();
        let total: f64 = rates.iter().sum();
        (1..=self.lab.uplinks())
            .map(|i| (self.lab.uplink_source(i), rates[i - 1] / total))
            .collect()
    }

    /// What the daemon logged so far, for failure messages.
    pub fn daemon_log(&self) -> String {
        self.daemon
            .as_ref()
            .map(ChildGuard::log)
            .unwrap_or_default()
    }

    /// Rules, uplink routes and stats of the gateway, for failure messages.
    pub fn diagnostics(&self) -> String {
        let gw = self.lab.gw();
        let show = |argv: &[&str]| match self.lab.exec(&gw, argv) {
            Ok(out) => format!(
                "$ {}\n{}{}",
                argv.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("$ {}: {e:#}\n", argv.join(" ")),
        };
        let bin = balancer_bin();
        [
            show(&["ip", "rule", "show"]),
            show(&["ip", "route", "show", "table", "all", "proto", "77"]),
            show(&[&bin, "stats"]),
            format!("daemon log:\n{}", self.daemon_log()),
        ]
        .concat()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = daemon.terminate(Duration::from_secs(5));
        }
        // The pins live in the shared bpffs, outside the lab's namespaces: remove them.
        let down = balancer(&self.lab, &["down"]);
        if !down.status.success() {
            eprintln!(
                "balancer down in {}: {}",
                self.lab.gw(),
                String::from_utf8_lossy(&down.stderr).trim()
            );
        }
    }
}

/// Asserts that every connection succeeded and that the server saw only uplink addresses.
pub fn assert_all_through_uplinks(gw: &Gateway, who: &str, many: &TcpMany) {
    assert_eq!(
        (many.succeeded, many.failed),
        (many.count, 0),
        "{who}: every connection must succeed: {many:?}\n{}",
        gw.diagnostics()
    );
    let foreign: Vec<_> = many
        .sources
        .keys()
        .filter(|a| !gw.uplink_sources().contains(a))
        .collect();
    assert!(
        foreign.is_empty(),
        "{who}: the server saw untranslated or foreign sources {foreign:?}: {many:?}"
    );
}

pub fn merge(into: &mut BTreeMap<Ipv4Addr, u32>, from: &BTreeMap<Ipv4Addr, u32>) {
    for (addr, n) in from {
        *into.entry(*addr).or_default() += n;
    }
}

/// `labtool tcp-whoami` from `ns` bound to `bind` (with its port), optionally held open.
pub fn whoami_bound(lab: &Lab, ns: &str, bind: SocketAddrV4, hold_ms: u64) -> SocketAddrV4 {
    let server = SocketAddrV4::new(SERVER_ADDR, WHOAMI_PORT).to_string();
    let bind = bind.to_string();
    let hold = hold_ms.to_string();
    let tool = lab.labtool().to_string_lossy().into_owned();
    // Pinned to CPU 0: the round-robin cursor is per CPU, so all flows of this test walk one.
    let argv = [
        "taskset",
        "-c",
        "0",
        &tool,
        "tcp-whoami",
        &server,
        "--bind",
        &bind,
        "--hold-ms",
        &hold,
        "--timeout-ms",
        "2000",
    ];
    let out = lab.exec(ns, &argv).unwrap();
    assert!(
        out.status.success(),
        "in {ns}: tcp-whoami --bind {bind}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("whoami answered {text:?}: {e}"))
}
