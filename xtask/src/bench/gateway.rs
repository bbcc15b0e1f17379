//! The three gateways the bench compares, set up in turn in one unshaped lab's gateway
//! namespace and removed again:
//!
//! - plain: forwarding with one default route (uplink 1) and an nftables masquerade on wan1;
//! - nft: what OpenWrt's mwan3 does, with nftables instead of iptables: `balancer run` with the
//!   data plane off installs the per-uplink tables and fwmark rules, nftables marks each new LAN
//!   connection by `numgen inc` (weighted round robin), copies the connection mark to every
//!   packet, and masquerades per uplink;
//! - ours: `balancer run` with the data plane on.
//!
//! `nft` only ever runs inside the lab's gateway namespace, on its own table.

use std::{fmt, time::Duration};

use anyhow::{Context, bail, ensure};
use balancer_tests::{
    lab::{LAN_NETWORK, Lab},
    process::ChildGuard,
};
use serde::Serialize;

/// The nftables table the plain and nft gateways use.
const TABLE: &str = "balbench";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Plain,
    Nft,
    Ours,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Plain, Mode::Nft, Mode::Ours];
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Plain => "plain",
            Mode::Nft => "nft",
            Mode::Ours => "ours",
        })
    }
}

/// A gateway that is set up; [`Gateway::remove`] (or drop, best effort) takes it down again.
pub struct Gateway<'a> {
    lab: &'a Lab,
    balancer: &'a str,
    pub mode: Mode,
    daemon: Option<ChildGuard>,
    removed: bool,
}

/// The ruleset of the plain gateway: masquerade whatever leaves by wan1.
pub fn plain_ruleset() -> String {
    format!(
        "table ip {TABLE} {{\n  chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n    oifname \"wan1\" masquerade\n  }}\n}}\n"
    )
}

/// The ruleset of the mwan3-like gateway for `uplinks` uplinks of weight 1 each (the lab is
/// unshaped, so the balancer's config has equal weights too) and marks `id << 24`, which the
/// balancer's `fwmark <mark>/0xff000000 lookup <table>` rules steer.
pub fn nft_ruleset(uplinks: usize) -> String {
    let marks: Vec<String> = (0..uplinks)
        .map(|k| format!("{k} : {:#010x}", (k + 1) << 24))
        .collect();
    let masquerade: String = (1..=uplinks)
        .map(|i| format!("    oifname \"wan{i}\" masquerade\n"))
        .collect();
    format!(
        "table ip {TABLE} {{\n  chain pre {{\n    type filter hook prerouting priority mangle; policy accept;\n    iifname \"lan0\" ip daddr != {LAN_NETWORK} ct state new ct mark set numgen inc mod {uplinks} map {{ {} }}\n    ct mark != 0 meta mark set ct mark\n  }}\n  chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n{masquerade}  }}\n}}\n",
        marks.join(", ")
    )
}

impl<'a> Gateway<'a> {
    /// Sets up `mode` in the lab's gateway and checks it forwards (and, but for plain, that
    /// new connections spread over every uplink).
    pub fn up(lab: &'a Lab, balancer: &'a str, mode: Mode) -> anyhow::Result<Self> {
        let mut gateway = Self {
            lab,
            balancer,
            mode,
            daemon: None,
            removed: false,
        };
        let gw = lab.gw();
        match mode {
            Mode::Plain => {
                lab.exec_ok(&gw, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
                let via = lab.uplink_gateway(1).to_string();
                lab.exec_ok(
                    &gw,
                    &["ip", "route", "add", "default", "via", &via, "dev", "wan1"],
                )?;
                nft_load(lab, &plain_ruleset())?;
            }
            Mode::Nft => {
                gateway.start_daemon(false)?;
                nft_load(lab, &nft_ruleset(lab.uplinks()))?;
            }
            Mode::Ours => gateway.start_daemon(true)?,
        }
        gateway.check_balancing()?;
        Ok(gateway)
    }

    fn start_daemon(&mut self, dataplane: bool) -> anyhow::Result<()> {
        let lab = self.lab;
        let mut config = lab.balancer_config_toml();
        if !dataplane {
            config.push_str("\n[dataplane]\nenabled = false\n");
        }
        let path = lab.state_dir().join(format!("bench-{}.toml", self.mode));
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        let path = path.display().to_string();
        let mut daemon = lab.spawn(
            &lab.gw(),
            &[self.balancer, "run", "-c", &path, "--teardown-on-exit"],
        )?;
        for _ in 0..100 {
            let ready = if dataplane {
                // The data plane is attached once `stats` shows every uplink.
                let out = lab.exec(&lab.gw(), &[self.balancer, "stats", "--json"])?;
                out.status.success()
                    && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                        .ok()
                        .and_then(|v| v["uplinks"].as_array().map(Vec::len))
                        == Some(lab.uplinks())
            } else {
                lab.exec(&lab.gw(), &[self.balancer, "status"])?
                    .status
                    .success()
            };
            if ready {
                self.daemon = Some(daemon);
                return Ok(());
            }
            if let Some(exit) = daemon.try_wait()? {
                bail!("balancer run exited with {exit}:\n{}", daemon.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("balancer run never became ready:\n{}", daemon.log())
    }

    /// 30 short connections from each client: all must succeed, and with nft and ours every
    /// ISP must carry a share (counted on the ISP routers' wires).
    fn check_balancing(&self) -> anyhow::Result<()> {
        let lab = self.lab;
        let before = isp_packets(lab)?;
        for c in 1..=2 {
            let probe = lab.tcp_many(&lab.client(c), 30, None, Duration::from_secs(2))?;
            ensure!(
                probe.failed == 0,
                "{}: {} of 30 connections from client {c} failed: {:?}",
                self.mode,
                probe.failed,
                probe.errors
            );
        }
        let after = isp_packets(lab)?;
        let carried: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let spread = carried.iter().all(|&n| n >= 20);
        match self.mode {
            Mode::Plain => ensure!(
                carried.iter().skip(1).all(|&n| n < 10),
                "plain: traffic left by uplinks other than 1: {carried:?}"
            ),
            Mode::Nft | Mode::Ours => ensure!(
                spread,
                "{}: new connections did not spread over every uplink (packets per ISP: {carried:?})",
                self.mode
            ),
        }
        println!(
            "bench: {} gateway up; 60 probe connections, packets per ISP {carried:?}",
            self.mode
        );
        Ok(())
    }

    /// Takes the gateway down; errors are collected, not stopped at.
    pub fn remove(mut self) -> anyhow::Result<()> {
        self.removed = true;
        let errors = self.teardown();
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("removing the {} gateway: {}", self.mode, errors.join("; "))
        }
    }

    fn teardown(&mut self) -> Vec<String> {
        let lab = self.lab;
        let gw = lab.gw();
        let mut errors = Vec::new();
        let note = |errors: &mut Vec<String>, result: anyhow::Result<String>| {
            if let Err(error) = result {
                errors.push(format!("{error:#}"));
            }
        };
        match self.mode {
            Mode::Plain => {
                let nft = lab.exec_ok(&gw, &["nft", "delete", "table", "ip", TABLE]);
                note(&mut errors, nft);
                let route = lab.exec_ok(&gw, &["ip", "route", "del", "default"]);
                note(&mut errors, route);
                let forward = lab.exec_ok(&gw, &["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
                note(&mut errors, forward);
            }
            Mode::Nft | Mode::Ours => {
                if self.mode == Mode::Nft {
                    let nft = lab.exec_ok(&gw, &["nft", "delete", "table", "ip", TABLE]);
                    note(&mut errors, nft);
                }
                if let Some(mut daemon) = self.daemon.take() {
                    match daemon.terminate(Duration::from_secs(10)) {
                        Ok(status) if status.success() => {}
                        Ok(status) => errors.push(format!(
                            "balancer run exited with {status}: {}",
                            daemon.log()
                        )),
                        Err(error) => errors.push(format!("{error:#}")),
                    }
                }
                // The pins (maps, links) outlive the daemon: `down` removes them.
                let down = lab.exec_ok(&gw, &[self.balancer, "down"]);
                note(&mut errors, down);
            }
        }
        errors
    }
}

impl Drop for Gateway<'_> {
    fn drop(&mut self) {
        if !self.removed {
            self.removed = true;
            let _ = self.teardown();
        }
    }
}

fn nft_load(lab: &Lab, ruleset: &str) -> anyhow::Result<()> {
    let path = lab.state_dir().join("bench.nft");
    std::fs::write(&path, ruleset).with_context(|| format!("writing {}", path.display()))?;
    let path = path.display().to_string();
    lab.exec_ok(&lab.gw(), &["nft", "-f", &path])
        .context("loading the nftables ruleset")?;
    Ok(())
}

/// Packets each ISP router received from the gateway.
pub fn isp_packets(lab: &Lab) -> anyhow::Result<Vec<u64>> {
    (1..=lab.uplinks()).map(|i| lab.isp_rx_packets(i)).collect()
}
