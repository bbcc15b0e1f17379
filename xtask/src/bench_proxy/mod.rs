//! `cargo xtask bench-proxy`: the forward proxy (issue 6) against Debian's squid set up to
//! spread its upstream connections over the same uplink addresses (`tcp_outgoing_address` with
//! `random` ACLs), in one unshaped lab and one run, taking turns round after round (squid, ours,
//! squid, ours, ...). Rows: requests per second for small responses over keep-alive client
//! connections, the same with a name resolved through the lab's DNS on a fresh connection per
//! request, the throughput of one large download and of one large upload through a CONNECT
//! tunnel, and the latency a request gains by going
//! through the proxy (a fresh connection per request, against the same request sent directly
//! through the gateway's data plane, taking turns request by request). Prints medians, spreads
//! (min to max over the rounds) and ours/squid ratios, writes JSON, and with `--write-docs` the
//! Markdown page docs/benchmarks-proxy.md.
//!
//! Not a test: nothing here asserts a speed.
//!
//! Both proxies run at once in the lab's gateway namespace under one `balancer run`, whose
//! `from <source>` rules carry each upstream socket out of the uplink its source address names:
//! ours on 198.18.0.1:3128, squid on 198.18.0.1:3129 (`squid -N`, its files under the lab's
//! state dir, stopped by PID). The load runs on threads that entered a LAN client's network
//! namespace, with std sockets; every read and write has a timeout and every loop a deadline.
//!
//! This module owns the command-line arguments, the data model (parameters, samples, the
//! report), the run itself and the rounds; `squid` installs, configures and starts squid,
//! `load` generates the load and measures it, `report` turns the samples into rows, the
//! terminal table and the docs page.

mod load;
mod report;
mod squid;

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use balancer_tests::{
    lab::{DNS_ADDR, LAN_GATEWAY, Lab, LabSpec, SINK_PORT},
    process::ChildGuard,
};
use serde::Serialize;

use crate::util;
use load::{
    check_spread, download, latency, named_requests_per_second, requests_per_second, upload,
    upload_direct,
};
use report::{Row, machine, markdown, rows, table};
use squid::{ensure_squid, squid_conf, start_squid};

const PREFIX: &str = "bal-bprx";
const OURS_PORT: u16 = 3128;
const SQUID_PORT: u16 = 3129;
/// Body size of the "small response" rows.
const SMALL_BYTES: u64 = 100;
/// Every socket read and write.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The large download may take this long at most.
const DOWNLOAD_LIMIT: Duration = Duration::from_secs(60);

#[derive(clap::Args)]
pub struct BenchProxyArgs {
    /// Rounds; each round measures squid, then ours.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds per requests-per-second measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Keep-alive client connections at once in the requests-per-second row (split over the
    /// two LAN clients).
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Size of the large download in MB (10^6 bytes).
    #[arg(long, default_value_t = 200)]
    download_mb: u64,
    /// Requests, each on a fresh connection, per latency measurement.
    #[arg(long, default_value_t = 200)]
    latency_requests: u32,
    /// Before each turn, wait (at most 75 s) until fewer than 1,000 sockets are in TIME_WAIT in
    /// the gateway, so each proxy starts clean.
    #[arg(long)]
    settle: bool,
    /// A smoke run: 2 rounds, 1 s, 20 MB, 50 latency requests.
    #[arg(long)]
    quick: bool,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/bench/proxy.json")]
    output: PathBuf,
    /// Also write docs/benchmarks-proxy.md.
    #[arg(long)]
    write_docs: bool,
}

/// The parameters one run uses, after `--quick` and the bounds.
#[derive(Clone, Debug, Serialize)]
struct Params {
    rounds: u32,
    seconds: u64,
    connections: u32,
    download_bytes: u64,
    latency_requests: u32,
    settle: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Proxy {
    Squid,
    Ours,
}

impl Proxy {
    /// The order within a round.
    const ALL: [Proxy; 2] = [Proxy::Squid, Proxy::Ours];

    fn port(self) -> u16 {
        match self {
            Proxy::Squid => SQUID_PORT,
            Proxy::Ours => OURS_PORT,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Proxy::Squid => "squid",
            Proxy::Ours => "ours",
        }
    }
}

/// One proxy's measurements in one round.
#[derive(Clone, Debug, Serialize)]
struct Sample {
    round: u32,
    proxy: Proxy,
    requests_per_second: f64,
    /// Failed requests (reconnected) during the requests-per-second row.
    request_errors: u64,
    /// TCP sockets in TIME_WAIT in the gateway namespace when the proxy's turn began, and after
    /// its requests-per-second row (see `time_wait`).
    time_wait_before: u64,
    time_wait_after_requests: u64,
    download_mbit_per_s: f64,
    /// One upload of the download's size through a CONNECT tunnel.
    upload_mbit_per_s: f64,
    /// The same upload sent straight to the sink (no proxy) right after: the lab's ceiling.
    upload_direct_mbit_per_s: f64,
    /// Small requests naming the server, each on a fresh connection.
    named_requests_per_second: f64,
    named_request_errors: u64,
    /// Median time of one request on a fresh connection, through the proxy and directly.
    latency_proxy_ms: f64,
    latency_direct_ms: f64,
    added_latency_ms: f64,
}

#[derive(Serialize)]
struct Report {
    command: String,
    machine: String,
    squid_version: String,
    params: Params,
    /// Upstream source addresses seen by the internet host in the spread check, per proxy.
    spread: Vec<(Proxy, Vec<(Ipv4Addr, u32)>)>,
    rows: Vec<Row>,
    samples: Vec<Sample>,
    squid_conf: String,
    seconds_taken: f64,
}

pub fn run(args: &BenchProxyArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the proxy bench builds network namespaces: it needs root");
    }
    let params = if args.quick {
        Params {
            rounds: 2,
            seconds: 1,
            connections: 8,
            download_bytes: 20_000_000,
            latency_requests: 50,
            settle: args.settle,
        }
    } else {
        Params {
            rounds: args.rounds.clamp(1, 20),
            seconds: args.seconds.clamp(1, 30),
            connections: args.connections.clamp(1, 64),
            download_bytes: args.download_mb.clamp(1, 2_000) * 1_000_000,
            latency_requests: args.latency_requests.clamp(10, 2_000),
            settle: args.settle,
        }
    };
    let command = std::iter::once("cargo xtask bench-proxy".to_owned())
        .chain(std::env::args().skip(2))
        .collect::<Vec<_>>()
        .join(" ");
    let started = Instant::now();
    let squid_version = ensure_squid()?;
    let root = util::workspace_root();
    // Ours in release, as squid is Debian's optimised build; labtool for the lab's servers.
    println!("bench-proxy: building the balancer (release) and labtool");
    util::run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(&root)
            .args(["build", "--release", "-p", "balancer", "--bin", "balancer"]),
    )?;
    util::run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(&root)
            .args(["build", "-p", "balancer-tests", "--bin", "labtool"]),
    )?;
    let balancer = root.join("target/release/balancer").display().to_string();
    let output = if args.output.is_absolute() {
        args.output.clone()
    } else {
        root.join(&args.output)
    };
    if let Some(dir) = output.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    println!("bench-proxy: bringing up lab {PREFIX} (3 unshaped uplinks, servers on)");
    let mut spec = LabSpec::new(PREFIX, 3);
    spec.rates_mbit.clear();
    let lab = Lab::up(spec)?;
    let measured = measure_all(&lab, &balancer, &params);
    drop(lab);
    let (samples, spread, squid_conf) = measured?;

    let report = Report {
        command,
        machine: machine(),
        squid_version,
        rows: rows(&samples, &params),
        params,
        spread,
        samples,
        squid_conf,
        seconds_taken: started.elapsed().as_secs_f64(),
    };
    println!("\n{}", table(&report));
    let json = serde_json::to_string_pretty(&report).context("serialising the results")?;
    std::fs::write(&output, json).with_context(|| format!("writing {}", output.display()))?;
    println!("bench-proxy: results in {}", output.display());
    if args.write_docs {
        let docs = root.join("docs/benchmarks-proxy.md");
        let existing = std::fs::read_to_string(&docs).unwrap_or_default();
        std::fs::write(&docs, markdown(&report, &existing))
            .with_context(|| format!("writing {}", docs.display()))?;
        println!("bench-proxy: wrote {}", docs.display());
    }
    Ok(())
}

type Spread = Vec<(Proxy, Vec<(Ipv4Addr, u32)>)>;

/// Starts the daemon and squid, checks both spread, runs the rounds, stops both.
fn measure_all(
    lab: &Lab,
    balancer: &str,
    params: &Params,
) -> anyhow::Result<(Vec<Sample>, Spread, String)> {
    let mut daemon = start_daemon(lab, balancer)?;
    let squid_conf = squid_conf(lab);
    let squid = start_squid(lab, &squid_conf);
    let result = squid.and_then(|mut squid| {
        let result = rounds(lab, params);
        let stopped = squid.terminate(Duration::from_secs(5));
        let (samples, spread) = result?;
        stopped.context("stopping squid")?;
        Ok((samples, spread))
    });
    let stopped = daemon.terminate(Duration::from_secs(10));
    let down = lab.exec_ok(&lab.gw(), &[balancer, "down"]);
    let (samples, spread) = result?;
    stopped.context("stopping balancer run")?;
    down.context("balancer down")?;
    Ok((samples, spread, squid_conf))
}

fn rounds(lab: &Lab, params: &Params) -> anyhow::Result<(Vec<Sample>, Spread)> {
    let mut spread = Vec::new();
    for proxy in Proxy::ALL {
        let seen = check_spread(lab, proxy)?;
        println!("bench-proxy: {} spreads over {seen:?}", proxy.name());
        spread.push((proxy, seen));
    }
    let mut samples = Vec::new();
    for round in 1..=params.rounds {
        for proxy in Proxy::ALL {
            if params.settle {
                settle(lab)?;
            }
            let sample = measure(lab, params, round, proxy)
                .with_context(|| format!("round {round}, {}", proxy.name()))?;
            println!(
                "bench-proxy: round {round}/{} {:5}: {:.0} req/s ({} errors; TIME_WAIT {} -> {}), {:.0} named req/s ({} errors), {:.0} Mbit/s down, {:.0} Mbit/s up ({:.0} direct), +{:.3} ms per request ({:.3} through, {:.3} direct)",
                params.rounds,
                proxy.name(),
                sample.requests_per_second,
                sample.request_errors,
                sample.time_wait_before,
                sample.time_wait_after_requests,
                sample.named_requests_per_second,
                sample.named_request_errors,
                sample.download_mbit_per_s,
                sample.upload_mbit_per_s,
                sample.upload_direct_mbit_per_s,
                sample.added_latency_ms,
                sample.latency_proxy_ms,
                sample.latency_direct_ms
            );
            samples.push(sample);
        }
    }
    Ok((samples, spread))
}

fn measure(lab: &Lab, params: &Params, round: u32, proxy: Proxy) -> anyhow::Result<Sample> {
    // The request-rate row last: it is what leaves the most TIME_WAIT sockets behind.
    let time_wait_before = time_wait(lab)?;
    let (latency_proxy_ms, latency_direct_ms) = latency(lab, proxy, params.latency_requests)?;
    let download_mbit_per_s = download(lab, proxy, params.download_bytes)?;
    let upload_mbit_per_s = upload(lab, proxy, params.download_bytes)?;
    let upload_direct_mbit_per_s = upload_direct(lab, params.download_bytes)?;
    let (named_requests_per_second, named_request_errors) =
        named_requests_per_second(lab, proxy, params)?;
    let (requests_per_second, request_errors) = requests_per_second(lab, proxy, params)?;
    let time_wait_after_requests = time_wait(lab)?;
    Ok(Sample {
        round,
        proxy,
        requests_per_second,
        request_errors,
        time_wait_before,
        time_wait_after_requests,
        download_mbit_per_s,
        upload_mbit_per_s,
        upload_direct_mbit_per_s,
        named_requests_per_second,
        named_request_errors,
        latency_proxy_ms,
        latency_direct_ms,
        added_latency_ms: latency_proxy_ms - latency_direct_ms,
    })
}

/// TCP sockets in TIME_WAIT in the gateway namespace (`ss -s`). Each upstream connection the
/// proxy closes first stays there 60 s and holds its (source, port, server, port) tuple: with
/// one server address and port and three sources that is at most 3 x 28,232 ports.
fn time_wait(lab: &Lab) -> anyhow::Result<u64> {
    let summary = lab.exec_ok(&lab.gw(), &["ss", "-s"])?;
    summary
        .split("timewait ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no timewait count in ss -s: {summary}"))
}

/// Waits until fewer than 1,000 sockets are in TIME_WAIT in the gateway, at most 75 s.
fn settle(lab: &Lab) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut count = time_wait(lab)?;
    while count >= 1_000 && started.elapsed() < Duration::from_secs(75) {
        std::thread::sleep(Duration::from_secs(2));
        count = time_wait(lab)?;
    }
    if started.elapsed() > Duration::from_secs(1) {
        println!(
            "bench-proxy: waited {:.0} s for TIME_WAIT to drain ({count} left)",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// `balancer run` with the lab's config, the lab's DNS server per uplink and `[proxy]`; ready
/// once the proxy shows in `status` and the data plane has every uplink.
fn start_daemon(lab: &Lab, balancer: &str) -> anyhow::Result<ChildGuard> {
    let config = format!(
        "{}\n[proxy]\nlisten = \"{LAN_GATEWAY}:{OURS_PORT}\"\nconnect_ports = [443, {SINK_PORT}]\n",
        lab.balancer_config_toml()
            .replace("weight =", &format!("dns = [\"{DNS_ADDR}\"]\nweight ="))
    );
    let path = lab.state_dir().join("bench-proxy.toml");
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    let path = path.display().to_string();
    let mut daemon = lab.spawn(
        &lab.gw(),
        &[balancer, "run", "-c", &path, "--teardown-on-exit"],
    )?;
    for _ in 0..100 {
        let status = lab.exec(&lab.gw(), &[balancer, "status", "--json"])?;
        let stats = lab.exec(&lab.gw(), &[balancer, "stats", "--json"])?;
        let json = |out: &std::process::Output| {
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
        };
        if status.status.success()
            && stats.status.success()
            && json(&status)["proxy"].is_object()
            && json(&stats)["uplinks"].as_array().map(Vec::len) == Some(lab.uplinks())
        {
            return Ok(daemon);
        }
        if let Some(exit) = daemon.try_wait()? {
            bail!("balancer run exited with {exit}:\n{}", daemon.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("balancer run never became ready:\n{}", daemon.log())
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}
