//! `cargo xtask demo`: the main job on the built-in lab. Brings up three shaped uplinks (Ethernet,
//! raw-IP point-to-point, DHCP-addressed), runs
//! the balancer daemon in the gateway, shows each uplink's traffic leaving by its own ISP with its
//! own source address (the routing foundation), then the LAN clients' parallel transfers spread
//! over all uplinks by the eBPF data plane with live per-uplink rates and a summary, then a
//! failover act (`demo_failover`: one ISP goes silent mid-transfer), prints the kernel state the
//! daemon installed, and tears everything down. Every uplink probes the internet host (`track`).
//!
//! When the data plane is not available (a `balancer` without `stats`, or programs that are not
//! attached), the demo says so and still finishes: the foundation part does not need it.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use balancer_tests::lab::{Lab, LabSpec, SERVER_ADDR, SOURCE_PORT};

use crate::{build, lab, setup};

const PREFIX: &str = "bal-demo";

pub fn run() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo builds network namespaces and needs root");
    }
    setup::ensure_installed()?;
    build::run(&build::BuildArgs { release: false })?;
    let balancer = target_dir()
        .join("debug")
        .join("balancer")
        .display()
        .to_string();

    step(
        "Bringing up the lab: 2 LAN clients, a gateway, 3 ISPs shaped to 20/20/10 Mbit/s (wan1 Ethernet, wan2 raw-IP point-to-point like PPPoE or LTE, wan3 addressed by DHCP), an internet host",
    );
    let mut spec = LabSpec::new(PREFIX, 3);
    // The uplinks as they come in the field: one of each kind beside Ethernet.
    spec.raw_ip = vec![2];
    spec.dhcp = vec![3];
    let lab = Lab::up(spec)?;
    println!("{}", lab::picture(&lab));
    let config_path = lab.state_dir().join("balancer.toml");
    // Health probes through every uplink, for the failover act.
    let config_text = lab.balancer_config_toml().replace(
        "weight =",
        &format!("track = [\"{SERVER_ADDR}\"]\nweight ="),
    );
    std::fs::write(&config_path, &config_text).context("writing the demo config")?;
    let config = config_path.display().to_string();
    println!("Config ({config}):\n{config_text}");

    let gw = lab.gw();
    step(
        "Before: the gateway does not forward, and its only default route is the one wan3's DHCP client installed, so no LAN client reaches the internet",
    );
    show(&lab.exec_ok(&gw, &["ip", "route", "show", "default"])?);
    match lab.tcp_whoami(&lab.client(1), None, Duration::from_millis(500)) {
        Ok(seen) => {
            bail!("the lab leaked: the internet host answered ({seen}) before the balancer ran")
        }
        Err(error) => println!("  as expected: {}", first_line(&format!("{error:#}"))),
    }

    step("balancer check, then balancer plan (what it will change, as ip/sysctl commands)");
    show(&lab.exec_ok(&gw, &[&balancer, "check", "-c", &config])?);
    show(&lab.exec_ok(&gw, &[&balancer, "plan", "-c", &config])?);

    step("balancer run: the daemon applies the plan and keeps it applied");
    let mut daemon = lab.spawn(
        &gw,
        &[&balancer, "run", "-c", &config, "--teardown-on-exit"],
    )?;
    wait_for_status(&lab, &balancer)?;
    show(&lab.exec_ok(&gw, &[&balancer, "status"])?);

    step(
        "Traffic bound to each uplink's source leaves by that uplink: who the internet host sees, and which ISP carried it",
    );
    for i in 1..=lab.uplinks() {
        let before: Vec<u64> = (1..=lab.uplinks())
            .map(|n| lab.isp_rx_packets(n))
            .collect::<Result<_, _>>()?;
        let seen = lab.tcp_whoami(&gw, Some(lab.uplink_source(i)), Duration::from_secs(3))?;
        let transfer = lab.download(&gw, Some(lab.uplink_source(i)), 1.0)?;
        let carried: Vec<String> = (1..=lab.uplinks())
            .map(|n| {
                Ok(format!(
                    "isp{n} +{}",
                    lab.isp_rx_packets(n)? - before[n - 1]
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        println!(
            "  {} ({}): internet host saw {seen}; 1 s download {:.1} Mbit/s; packets received by {}",
            lab.uplink_interface(i),
            lab.uplink_source(i),
            transfer.mbit_per_s,
            carried.join(", ")
        );
    }
    let seen = lab.tcp_whoami(&gw, None, Duration::from_secs(3))?;
    println!(
        "  the gateway's own unbound traffic: internet host saw {seen} (the heaviest uplink's address)"
    );

    step(&format!(
        "Transparent balancing: the LAN clients (who know nothing of the uplinks) each run {STREAMS} parallel downloads for {SECONDS} s"
    ));
    let dataplane = match transparent(&lab, &balancer) {
        Ok(()) => true,
        Err(why) => {
            println!("  DATA PLANE NOT AVAILABLE: {why:#}");
            println!(
                "  (skipping the transparent part; the routing foundation above does not need it)"
            );
            false
        }
    };

    if dataplane && let Err(why) = crate::demo_failover::run(&lab, &balancer) {
        println!("  FAILOVER ACT FAILED: {why:#}");
    }

    step("Kernel state the daemon installed (everything tagged proto 77)");
    show(&lab.exec_ok(&gw, &["ip", "rule", "show"])?);
    for table in ["2000", "2001", "2002", "2003"] {
        println!("  table {table}:");
        show(&lab.exec_ok(&gw, &["ip", "route", "show", "table", table])?);
    }
    show(&lab.exec_ok(
        &gw,
        &[
            "sysctl",
            "net.ipv4.ip_forward",
            "net.ipv4.conf.wan1.arp_filter",
            "net.ipv4.conf.wan1.arp_announce",
            "net.ipv4.conf.wan1.src_valid_mark",
            "net.ipv4.conf.all.rp_filter",
        ],
    )?);

    step("Stopping the daemon (--teardown-on-exit removes what it installed), then the lab");
    let exit = daemon.terminate(Duration::from_secs(5))?;
    if !exit.success() {
        bail!("the daemon exited with {exit}:\n{}", daemon.log());
    }
    let left = lab.exec_ok(&gw, &["ip", "rule", "show"])?;
    println!(
        "  rules left: {}",
        left.lines().filter(|l| l.contains("proto 77")).count()
    );
    // The data plane's pins live in the shared bpffs, outside the lab: `down` removes them.
    let down = lab.exec(&gw, &[&balancer, "down"])?;
    if down.status.success() {
        if dataplane {
            println!("  balancer down: the data plane's programs, links and pins are removed");
        }
    } else {
        println!(
            "  balancer down failed ({}): {}",
            down.status,
            String::from_utf8_lossy(&down.stderr).trim()
        );
    }
    drop(lab);
    println!("\nDemo done; the lab is gone.");
    Ok(())
}

/// Parallel downloads per LAN client, and how long they run.
const STREAMS: u32 = 8;
const SECONDS: u64 = 8;

/// One uplink's row of `balancer stats --json`.
#[derive(Clone, Debug, Default)]
pub(crate) struct UplinkRow {
    pub(crate) name: String,
    tx_bytes: u64,
    pub(crate) rx_bytes: u64,
    flows: u64,
}

/// `balancer stats --json` in the gateway (a separate process, as an operator would run it).
pub(crate) fn uplink_stats(lab: &Lab, balancer: &str) -> anyhow::Result<Vec<UplinkRow>> {
    let output = lab.exec(&lab.gw(), &[balancer, "stats", "--json"])?;
    if !output.status.success() {
        bail!(
            "`balancer stats --json` failed ({}): {}",
            output.status,
            first_line(String::from_utf8_lossy(&output.stderr).trim())
        );
    }
    let value: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("`balancer stats --json` is not JSON")?;
    let rows = value["uplinks"]
        .as_array()
        .context("`balancer stats --json` has no uplinks")?;
    rows.iter()
        .map(|row| {
            let field = |name: &str| {
                row[name]
                    .as_u64()
                    .with_context(|| format!("stats row without {name}: {row}"))
            };
            Ok(UplinkRow {
                name: row["name"].as_str().unwrap_or("?").to_owned(),
                tx_bytes: field("tx_bytes")?,
                rx_bytes: field("rx_bytes")?,
                flows: field("flows")?,
            })
        })
        .collect()
}

pub(crate) fn mbit(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 * 8.0 / seconds.max(1e-9) / 1e6
}

/// The demo: LAN clients' parallel downloads spread over every uplink, live rates once
/// a second, then a summary. An error means the data plane is not there or does not work.
fn transparent(lab: &Lab, balancer: &str) -> anyhow::Result<()> {
    let start_rows = uplink_stats(lab, balancer)?;
    if start_rows.len() != lab.uplinks() {
        bail!(
            "`balancer stats` shows {} uplinks, the config has {}",
            start_rows.len(),
            lab.uplinks()
        );
    }
    // A quick check first: a few short connections from each client must get through.
    for c in 1..=2 {
        let probe = lab.tcp_many(&lab.client(c), 5, None, Duration::from_secs(1))?;
        if probe.failed > 0 {
            bail!(
                "LAN client {c} cannot reach the internet host ({} of 5 connections failed: {:?})",
                probe.failed,
                probe.errors
            );
        }
        let seen: Vec<String> = probe.sources.keys().map(ToString::to_string).collect();
        println!(
            "  {}: 5 short connections, the internet host saw them from {}",
            lab.client(c),
            seen.join(", ")
        );
    }

    let labtool = lab.labtool().to_string_lossy().into_owned();
    let server = format!("{SERVER_ADDR}:{SOURCE_PORT}");
    let (count, seconds) = (STREAMS.to_string(), SECONDS.to_string());
    let mut clients = Vec::new();
    let before = uplink_stats(lab, balancer)?;
    let started = Instant::now();
    for c in 1..=2 {
        clients.push(lab.spawn(
            &lab.client(c),
            &[
                &labtool,
                "streams",
                &server,
                "--count",
                &count,
                "--seconds",
                &seconds,
                "--warmup",
                "1",
            ],
        )?);
    }
    println!("  per-uplink rates from `balancer stats --json`, once a second (Mbit/s, down/up):");
    let mut last = before.clone();
    let mut last_at = started;
    let mut tick = 1;
    loop {
        let next = started + Duration::from_secs(tick);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let now_rows = uplink_stats(lab, balancer)?;
        let now = Instant::now();
        let dt = (now - last_at).as_secs_f64();
        let mut line = format!("  t={tick:>2}s");
        let (mut down, mut up) = (0, 0);
        for (row, prev) in now_rows.iter().zip(&last) {
            let rx = row.rx_bytes.saturating_sub(prev.rx_bytes);
            let tx = row.tx_bytes.saturating_sub(prev.tx_bytes);
            down += rx;
            up += tx;
            let _ = write!(
                line,
                "  {} {:>5.1}/{:<4.1}",
                row.name,
                mbit(rx, dt),
                mbit(tx, dt)
            );
        }
        let _ = write!(line, "  total {:>5.1}/{:.1}", mbit(down, dt), mbit(up, dt));
        println!("{line}");
        last = now_rows;
        last_at = now;
        let running = clients
            .iter_mut()
            .map(|c| c.try_wait().map(|s| s.is_none()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // The transfers run SECONDS from `started`: the summary covers exactly that window.
        if !running.contains(&true) || tick >= SECONDS {
            break;
        }
        tick += 1;
    }
    let elapsed = (last_at - started).as_secs_f64();
    let window_end = last.clone();
    let mut goodput = 0.0;
    let mut client_lines = Vec::new();
    for (c, client) in clients.iter_mut().enumerate() {
        client.wait_timeout(Duration::from_secs(10))?;
        let log = client.log();
        let summary: serde_json::Value = log
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .and_then(|l| serde_json::from_str(l).ok())
            .with_context(|| format!("no summary from client {}: {}", c + 1, log.trim()))?;
        goodput += summary["steady_mbit_per_s"].as_f64().unwrap_or(0.0);
        let sources: BTreeMap<String, u64> = summary["sources"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v["streams"].as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        client_lines.push(format!(
            "  {}: {}/{STREAMS} streams completed, {:.1} Mbit/s after the first second; streams by source the server saw: {sources:?}",
            lab.client(c + 1),
            summary["succeeded"].as_u64().unwrap_or(0),
            summary["steady_mbit_per_s"].as_f64().unwrap_or(0.0),
        ));
    }

    let after = window_end;
    step("Summary");
    let mut sum_rates = 0.0;
    let mut aggregate = 0.0;
    for (i, (row, prev)) in after.iter().zip(&before).enumerate() {
        let rate = lab.spec().rate_mbit(i + 1).map_or(0.0, f64::from);
        sum_rates += rate;
        let down = mbit(row.rx_bytes.saturating_sub(prev.rx_bytes), elapsed);
        let up = mbit(row.tx_bytes.saturating_sub(prev.tx_bytes), elapsed);
        aggregate += down;
        println!(
            "  {} ({}, {rate} Mbit/s): {down:.1} Mbit/s down, {up:.1} up, {:.0}% of its rate; {} new flows",
            row.name,
            lab.uplink_interface(i + 1),
            100.0 * down / rate.max(1e-9),
            row.flows.saturating_sub(prev.flows),
        );
    }
    println!(
        "  aggregate: {aggregate:.1} Mbit/s over {elapsed:.1} s = {:.0}% of the {sum_rates} Mbit/s the links sum to",
        100.0 * aggregate / sum_rates.max(1e-9)
    );
    println!(
        "  goodput seen by the clients (TCP payload, after the first second): {goodput:.1} Mbit/s = {:.0}% of {sum_rates}",
        100.0 * goodput / sum_rates.max(1e-9)
    );
    for line in client_lines {
        println!("{line}");
    }
    println!("\n  balancer stats:");
    show(&lab.exec_ok(&lab.gw(), &[balancer, "stats"])?);
    Ok(())
}

fn wait_for_status(lab: &Lab, balancer: &str) -> anyhow::Result<()> {
    for _ in 0..100 {
        if lab.exec(&lab.gw(), &[balancer, "status"])?.status.success() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the daemon never answered on its status socket")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::util::workspace_root().join("target"))
}

pub(crate) fn step(title: &str) {
    println!("\n== {title}");
}

fn show(text: &str) {
    for line in text.lines() {
        println!("  {line}");
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}
