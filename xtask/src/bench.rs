//! `cargo xtask bench`: our gateway against plain forwarding and an mwan3-like nftables
//! gateway, measured in one run in one unshaped lab, the three taking turns round after round
//! (plain, nft, ours, plain, nft, ours, ...). Rows: TCP throughput, small-packet UDP rate, new
//! connections per second, the CPU share of the balancing mechanism (perf), and the programs'
//! own cost per packet (BPF_PROG_TEST_RUN with repeat). Prints medians, spreads and ratios,
//! writes JSON, and with `--write-docs` the Markdown page docs/benchmarks.md.
//!
//! Not a test: nothing here asserts a speed; the targets are reported, never enforced.
//!
//! Modules: `gateway` (the three gateways), `load` (the end-to-end rows and the CPU profile),
//! `costs` (BPF_PROG_TEST_RUN), `report` (statistics, the table, JSON and Markdown).

mod costs;
mod frames;
mod gateway;
mod load;
mod machine;
mod report;

use std::{path::PathBuf, process::Command, time::Instant};

use anyhow::{Context, bail};
use balancer_tests::lab::{Lab, LabSpec};
use gateway::{Gateway, Mode};
use report::{Results, RowId};

use crate::{build, util};

const PREFIX: &str = "bal-bnch";

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Rounds; each round measures plain, nft and ours in turn.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Seconds per throughput measurement (TCP and UDP rows).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Connections per tcp-many process in the new-connections row (4 processes; at most
    /// 20,000, see `Params`).
    #[arg(long, default_value_t = 5000)]
    connections: u32,
    /// A smoke run: 1 round, 2 s per measurement, 500 connections, 100,000 repeats.
    #[arg(long)]
    quick: bool,
    /// Where the JSON results go.
    #[arg(long, default_value = "target/bench/results.json")]
    output: PathBuf,
    /// Also write docs/benchmarks.md.
    #[arg(long)]
    write_docs: bool,
    /// Only the programs' cost per packet (BPF_PROG_TEST_RUN, `--rounds` times): no lab, a few
    /// seconds; for working on the data plane.
    #[arg(long, conflicts_with = "write_docs")]
    costs_only: bool,
}

/// The parameters one run uses, after `--quick`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Params {
    pub rounds: u32,
    pub seconds: u64,
    pub connections: u32,
    pub repeat: u32,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the bench builds network namespaces and loads BPF programs: it needs root");
    }
    let params = if args.quick {
        Params {
            rounds: 1,
            seconds: 2,
            connections: 500,
            repeat: 100_000,
        }
    } else {
        Params {
            rounds: args.rounds.clamp(1, 20),
            seconds: args.seconds.clamp(1, 60),
            // Every connection goes to one server address and port: the default 4 x 5,000
            // per round is more than 3 uplinks x 4,536 NAT ports, so the row also shows that
            // ports of closed connections are taken again instead of running out.
            connections: args.connections.clamp(10, 20_000),
            repeat: 1_000_000,
        }
    };
    let command = std::iter::once("cargo xtask bench".to_owned())
        .chain(std::env::args().skip(2))
        .collect::<Vec<_>>()
        .join(" ");
    let started = Instant::now();
    build::run(&build::BuildArgs { release: false })?;
    if args.costs_only {
        return costs_only(&root_object(), &params);
    }
    let perf = ensure_perf();
    let root = util::workspace_root();
    let balancer = root.join("target/debug/balancer").display().to_string();
    let object = root_object();

    let mut results = Results::new(command, params.clone(), perf.clone().err());
    let output = if args.output.is_absolute() {
        args.output.clone()
    } else {
        root.join(&args.output)
    };
    let output_dir = output.parent().map_or_else(|| root.clone(), PathBuf::from);
    std::fs::create_dir_all(&output_dir)
        .with_context(|| format!("creating {}", output_dir.display()))?;

    println!("bench: bringing up lab {PREFIX} (3 unshaped uplinks, servers on)");
    let mut spec = LabSpec::new(PREFIX, 3);
    spec.rates_mbit.clear();
    let lab = Lab::up(spec)?;
    // The new-connections row leaves each client with thousands of sockets in TIME_WAIT for
    // 60 s; with most of the ephemeral range taken, every connect() searches long for a free
    // port (measured: 1.3 ms each with 20,000 of them), so each round would measure the rounds
    // before it. The clients and the internet host keep no TIME_WAIT state instead.
    for ns in [lab.client(1), lab.client(2), lab.inet()] {
        lab.exec_ok(&ns, &["sysctl", "-qw", "net.ipv4.tcp_max_tw_buckets=0"])?;
    }
    let profile_dir = lab.state_dir().to_owned();

    for round in 1..=params.rounds {
        for mode in Mode::ALL {
            println!("bench: round {round}/{}, {mode}", params.rounds);
            let gateway = Gateway::up(&lab, &balancer, mode)?;
            let keep = output_dir.join(format!("perf-round{round}-{mode}.txt"));
            let measured = measure(&lab, &params, perf.is_ok(), &profile_dir, &keep);
            let removed = gateway.remove();
            let measured = measured.with_context(|| format!("round {round}, {mode}"))?;
            removed?;
            for (row, value) in measured.values {
                results.push(row, mode, value);
            }
            results.isp_bytes.push((round, mode, measured.isp_bytes));
            if let Some(profile) = measured.profile {
                results.profiles.push((round, mode, profile));
            }
        }
        let costs = costs::measure(&object, params.repeat)
            .context("measuring per-packet costs with BPF_PROG_TEST_RUN")?;
        results.push_costs(costs);
    }
    drop(lab);
    results.seconds_taken = started.elapsed().as_secs_f64();

    let table = results.table();
    println!("\n{table}");
    std::fs::write(&output, results.json()?)
        .with_context(|| format!("writing {}", output.display()))?;
    println!("bench: results in {}", output.display());
    if args.write_docs {
        let docs = root.join("docs/benchmarks.md");
        std::fs::write(&docs, results.markdown())
            .with_context(|| format!("writing {}", docs.display()))?;
        println!("bench: wrote {}", docs.display());
    }
    Ok(())
}

/// The eBPF object `cargo xtask build` leaves at a fixed path (balancer/build.rs).
fn root_object() -> PathBuf {
    util::workspace_root().join("target/bpf/bpfel-unknown-none/release/balancer-ebpf")
}

/// `--costs-only`: the per-packet costs, printed as a table.
fn costs_only(object: &std::path::Path, params: &Params) -> anyhow::Result<()> {
    let mut rows: Vec<(costs::Cost, Vec<u64>)> = Vec::new();
    for _ in 0..params.rounds {
        for cost in costs::measure(object, params.repeat)? {
            let ns = cost.ns;
            match rows.iter_mut().find(|(c, _)| c.name == cost.name) {
                Some((_, values)) => values.extend(ns),
                None => rows.push((cost, ns.into_iter().collect())),
            }
        }
    }
    for (cost, values) in rows {
        let shown = report::summarize(&values.iter().map(|&v| v as f64).collect::<Vec<_>>())
            .map_or("n/a".to_owned(), |s| {
                format!("{:.0} ns ({:.0}–{:.0})", s.median, s.min, s.max)
            });
        println!("{:<64} {shown}  {}", cost.name, cost.note);
    }
    Ok(())
}

struct Measured {
    values: Vec<(RowId, f64)>,
    profile: Option<load::Profile>,
    isp_bytes: Vec<u64>,
}

/// The end-to-end rows against the gateway that is up.
fn measure(
    lab: &Lab,
    params: &Params,
    perf: bool,
    profile_dir: &std::path::Path,
    keep_profile: &std::path::Path,
) -> anyhow::Result<Measured> {
    let seconds = params.seconds;
    // The profile covers the whole TCP row; only the load's samples count (load::Profile).
    let recording = if perf {
        Some(load::Recording::start(profile_dir)?)
    } else {
        None
    };
    let before = isp_tx_bytes(lab)?;
    let tcp = load::tcp(lab, seconds)?;
    let after = isp_tx_bytes(lab)?;
    // Bytes each ISP delivered to the gateway during the TCP row: the spread under load.
    let isp_bytes: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    // Read the samples only now: `perf report` must not compete with the load it measured.
    let profile = recording
        .map(|recording| recording.stop())
        .transpose()?
        .map(|data| load::report(&data, keep_profile))
        .transpose()?;
    let udp = load::udp(lab, seconds)?;
    let (cps, syn_retransmits) = load::connections(lab, params.connections)?;
    let mut values = vec![
        (RowId::Tcp, tcp),
        (RowId::Udp, udp),
        (RowId::Connections, cps),
        (RowId::SynRetransmits, syn_retransmits as f64),
    ];
    if let Some(profile) = &profile {
        values.push((RowId::CpuShare, profile.share()));
    }
    let total = isp_bytes.iter().sum::<u64>().max(1) as f64;
    let shares: Vec<String> = isp_bytes
        .iter()
        .map(|&b| format!("{:.0}%", 100.0 * b as f64 / total))
        .collect();
    println!(
        "bench:   tcp {tcp:.0} Mbit/s (per ISP {}), udp {udp:.0} pkt/s, {cps:.0} conn/s ({syn_retransmits} SYNs sent again){}",
        shares.join("/"),
        profile
            .as_ref()
            .map(|p| format!(", mechanism {:.2}% of the load's CPU", p.share()))
            .unwrap_or_default()
    );
    Ok(Measured {
        values,
        profile,
        isp_bytes,
    })
}

/// Bytes each ISP router has sent to the gateway (its `down0`).
fn isp_tx_bytes(lab: &Lab) -> anyhow::Result<Vec<u64>> {
    (1..=lab.uplinks())
        .map(|i| Ok(lab.link_counters(&lab.isp(i), "down0")?.tx_bytes))
        .collect()
}

/// Makes sure `perf` is there (Debian's `linux-perf`, installed if missing) and samples on this
/// machine; `Err` says why the CPU row is "not supported".
fn ensure_perf() -> Result<(), String> {
    let present = Command::new("perf")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        println!("bench: perf is missing; installing Debian's linux-perf for the CPU-share row");
        let installed = util::run(
            Command::new("apt-get")
                .args(["-q", "-o", "Dpkg::Use-Pty=0", "install", "-y"])
                .args(["--no-install-recommends", "linux-perf"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        );
        if let Err(error) = installed {
            println!("bench: could not install linux-perf ({error:#}); CPU share not measured");
            return Err(format!("linux-perf not installable: {error:#}"));
        }
    }
    load::perf_available().inspect_err(|why| {
        println!("bench: {why}; CPU share not measured");
    })
}
