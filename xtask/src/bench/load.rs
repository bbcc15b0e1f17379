//! The end-to-end rows: bounded loads from the LAN clients through the gateway to the internet
//! host, and the CPU profile taken during the TCP row.

use std::{
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use balancer_tests::{
    lab::{Lab, SERVER_ADDR, WHOAMI_PORT},
    process::{ChildGuard, signal},
};
use serde::Serialize;

/// (client, iperf3 server port): two processes per client, one server each.
const IPERF_PAIRS: [(usize, u16); 4] = [(1, 5201), (1, 5202), (2, 5203), (2, 5204)];
/// Parallel streams per iperf3 process in the TCP row.
const TCP_STREAMS: &str = "2";
/// How long `perf record -a` gets to start before the load does.
const PERF_SETTLE: Duration = Duration::from_secs(2);
/// UDP payload size in the small-packet row.
const UDP_PAYLOAD: &str = "64";

/// Runs one iperf3 client per pair at once for `seconds`, with `extra` arguments, and returns
/// each one's JSON report.
fn iperf3_all(lab: &Lab, seconds: u64, extra: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
    let server = SERVER_ADDR.to_string();
    let secs = seconds.to_string();
    let mut clients: Vec<ChildGuard> = Vec::new();
    for (c, port) in IPERF_PAIRS {
        let port = port.to_string();
        let mut argv = vec![
            "iperf3",
            "-c",
            server.as_str(),
            "-p",
            port.as_str(),
            "-t",
            secs.as_str(),
            "-J",
            "--connect-timeout",
            "3000",
        ];
        argv.extend_from_slice(extra);
        clients.push(lab.spawn(&lab.client(c), &argv)?);
    }
    let mut reports = Vec::new();
    for client in &mut clients {
        let status = client
            .wait_timeout(Duration::from_secs(seconds + 20))?
            .context("an iperf3 client did not finish in time")?;
        let log = client.log();
        let json = log
            .find('{')
            .zip(log.rfind('}'))
            .and_then(|(a, b)| serde_json::from_str::<serde_json::Value>(&log[a..=b]).ok())
            .with_context(|| format!("iperf3 printed no report ({status}): {}", log.trim()))?;
        if let Some(error) = json["error"].as_str() {
            bail!("iperf3 failed: {error}");
        }
        reports.push(json);
    }
    Ok(reports)
}

/// TCP downloads: 4 iperf3 processes (2 per client) with 2 streams each, server to client
/// (`-R`), for `seconds`. Returns the received Mbit/s summed.
pub fn tcp(lab: &Lab, seconds: u64) -> anyhow::Result<f64> {
    let reports = iperf3_all(lab, seconds, &["-R", "-P", TCP_STREAMS])?;
    let mut total = 0.0;
    for report in &reports {
        total += report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .context("iperf3 report without end.sum_received")?;
    }
    Ok(total / 1e6)
}

/// Small-packet UDP uploads: 4 iperf3 processes sending 64-byte datagrams as fast as they
/// can for `seconds`. Returns the datagrams per second the servers received, summed.
pub fn udp(lab: &Lab, seconds: u64) -> anyhow::Result<f64> {
    let reports = iperf3_all(lab, seconds, &["-u", "-b", "0", "-l", UDP_PAYLOAD])?;
    let mut total = 0.0;
    for report in &reports {
        let sum = &report["end"]["sum"];
        let sent = sum["packets"].as_f64().context("no end.sum.packets")?;
        let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
        let secs = sum["seconds"].as_f64().unwrap_or(0.0).max(1e-3);
        total += (sent - lost).max(0.0) / secs;
    }
    Ok(total)
}

/// New connections: 4 `labtool tcp-many` processes (2 per client), each making `count`
/// sequential short connections (connect, read the whoami answer, close) to the internet host.
/// Returns completed connections per second over the wall time of the slowest, and how many
/// SYNs the clients had to send again (a lost SYN costs its connection a second).
pub fn connections(lab: &Lab, count: u32) -> anyhow::Result<(f64, u64)> {
    let tool = lab.labtool().to_string_lossy().into_owned();
    let server = format!("{SERVER_ADDR}:{WHOAMI_PORT}");
    let count_text = count.to_string();
    let retransmits_before = syn_retransmits(lab)?;
    let started = Instant::now();
    let mut clients = Vec::new();
    for c in [1, 1, 2, 2] {
        clients.push(lab.spawn(
            &lab.client(c),
            &[
                &tool,
                "tcp-many",
                &server,
                "--count",
                &count_text,
                "--timeout-ms",
                "2000",
            ],
        )?);
    }
    let bound = Duration::from_millis(50) * count + Duration::from_secs(30);
    let mut succeeded = 0u64;
    for client in &mut clients {
        let status = client
            .wait_timeout(bound.saturating_sub(started.elapsed()))?
            .context("a tcp-many client did not finish in time")?;
        let log = client.log();
        let summary: serde_json::Value = log
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .and_then(|l| serde_json::from_str(l).ok())
            .with_context(|| format!("tcp-many printed no summary ({status}): {}", log.trim()))?;
        let failed = summary["failed"].as_u64().unwrap_or(0);
        if failed > 0 {
            bail!(
                "{failed} of {count} connections failed: {}",
                summary["errors"]
            );
        }
        succeeded += summary["succeeded"].as_u64().unwrap_or(0);
    }
    let rate = succeeded as f64 / started.elapsed().as_secs_f64();
    Ok((rate, syn_retransmits(lab)? - retransmits_before))
}

/// `TcpExt: TCPSynRetrans` of both clients, summed.
fn syn_retransmits(lab: &Lab) -> anyhow::Result<u64> {
    let mut total = 0;
    for c in 1..=2 {
        let text = lab.exec_ok(&lab.client(c), &["cat", "/proc/net/netstat"])?;
        let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
        let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
            bail!("no TcpExt lines in /proc/net/netstat of {}", lab.client(c));
        };
        total += names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == "TCPSynRetrans")
            .and_then(|(_, value)| value.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// Where the samples of one CPU profile went.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Profile {
    /// Samples of the load: iperf3 (clients and servers), softirq threads, and the idle task
    /// when it was running softirqs (its idle loop itself is left out).
    pub load_samples: u64,
    /// Of those, in netfilter (nftables, conntrack, NAT; not bridge netfilter, see
    /// `is_lab_artifact`).
    pub netfilter_samples: u64,
    /// Of those, in BPF programs, helpers and maps, and the tc/TCX hooks that run them.
    pub bpf_samples: u64,
}

impl Profile {
    /// The balancing mechanism's share of the load, in percent: netfilter plus BPF (a gateway
    /// has one or the other; plain forwarding's masquerade counts as netfilter too).
    pub fn share(&self) -> f64 {
        100.0 * (self.netfilter_samples + self.bpf_samples) as f64
            / (self.load_samples.max(1)) as f64
    }
}

/// Whether `perf record -e cpu-clock` works here; `Err` says why not.
pub fn perf_available() -> Result<(), String> {
    let output = Command::new("perf")
        .args(["stat", "-e", "cpu-clock", "true"])
        .output()
        .map_err(|error| format!("perf not runnable: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "`perf stat -e cpu-clock true` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&output.stderr);
    if text.contains("<not supported>") {
        return Err("perf: cpu-clock not supported".into());
    }
    Ok(())
}

/// A system-wide CPU profile being recorded: every CPU sampled by the software clock (this VM
/// has no cycle counter) until [`Recording::stop`].
pub struct Recording {
    perf: ChildGuard,
    data: PathBuf,
}

impl Recording {
    /// Starts `perf record -a` into `dir/perf.data` and gives it time to take stock of the
    /// running processes (seconds on a busy machine) before the load starts.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let data = dir.join("perf.data");
        let perf = ChildGuard::spawn(
            Command::new("perf")
                .args(["record", "-a", "-e", "cpu-clock", "-F", "3999", "-o"])
                .arg(&data),
            &dir.join("perf-record.log"),
        )?;
        std::thread::sleep(PERF_SETTLE);
        Ok(Self { perf, data })
    }

    /// Stops the recording (SIGINT, as at a terminal) and returns where the samples are.
    pub fn stop(mut self) -> anyhow::Result<PathBuf> {
        signal(self.perf.pid(), nix::sys::signal::Signal::SIGINT);
        let status = self
            .perf
            .wait_timeout(Duration::from_secs(60))?
            .context("perf record did not stop within 60 s")?;
        // perf re-raises the SIGINT after writing its data.
        let interrupted = status.signal() == Some(nix::sys::signal::Signal::SIGINT as i32);
        if !status.success() && !interrupted {
            bail!(
                "perf record exited with {status}: {}",
                self.perf.log().trim()
            );
        }
        Ok(self.data)
    }
}

/// Sorts the samples `record` took by what took them; the report text is kept in `keep`.
pub fn report(data: &Path, keep: &Path) -> anyhow::Result<Profile> {
    let report = Command::new("perf")
        .arg("report")
        .arg("-i")
        .arg(data)
        .args([
            "--stdio",
            "--no-children",
            "--sort",
            "comm,sym",
            "-q",
            "-n",
            "-t",
            ";",
        ])
        .output()
        .context("running perf report")?;
    if !report.status.success() {
        bail!(
            "perf report failed: {}",
            String::from_utf8_lossy(&report.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&report.stdout);
    std::fs::write(keep, text.as_bytes()).with_context(|| format!("writing {}", keep.display()))?;
    Ok(classify(&text))
}

/// Sorts `perf report -n --sort comm,sym -t ';'` lines (`pct;samples;comm;[k] symbol`).
fn classify(report: &str) -> Profile {
    let mut profile = Profile::default();
    for line in report.lines() {
        let fields: Vec<&str> = line.split(';').map(str::trim).collect();
        let [_, samples, comm, symbol] = fields[..] else {
            continue;
        };
        let Ok(samples) = samples.parse::<u64>() else {
            continue;
        };
        let symbol = symbol
            .strip_prefix("[k] ")
            .or_else(|| symbol.strip_prefix("[.] "))
            .unwrap_or(symbol);
        let load = comm == "iperf3"
            || comm.starts_with("ksoftirqd")
            || (comm == "swapper" && !is_idle(symbol));
        if !load {
            continue;
        }
        profile.load_samples += samples;
        if is_lab_artifact(symbol) {
            continue;
        }
        if is_netfilter(symbol) {
            profile.netfilter_samples += samples;
        } else if is_bpf(symbol) {
            profile.bpf_samples += samples;
        }
    }
    profile
}

/// Symbols that match the patterns below but run in every mode: bridge netfilter (the lab's LAN
/// is a bridge, and `br_netfilter` is loaded on this machine) and TCP's socket-ops hook.
fn is_lab_artifact(symbol: &str) -> bool {
    symbol.starts_with("br_nf_") || symbol.starts_with("bpf_skops_")
}

fn is_idle(symbol: &str) -> bool {
    symbol.contains("idle") || symbol.contains("safe_halt") || symbol.contains("mwait")
}

fn is_netfilter(symbol: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "nf_",
        "__nf_",
        "nft_",
        "__nft_",
        "nfct_",
        "ipv4_conntrack",
        "ipv4_confirm",
        "nf_nat",
        "ipt_",
        "masquerade",
    ];
    const NAMES: &[&str] = &[
        "hash_conntrack_raw",
        "resolve_normal_ct",
        "init_conntrack",
        "tcp_in_window",
        "nf_hook_slow",
        "get_l4proto",
        "tcp_new",
        "udp_packet",
        "icmp_packet",
    ];
    PREFIXES.iter().any(|p| symbol.starts_with(p)) || NAMES.contains(&symbol)
}

fn is_bpf(symbol: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "bpf_",
        "__bpf_",
        "___bpf_",
        "htab_",
        "__htab_",
        "pcpu_freelist",
        "trie_",
        "array_map_",
        "percpu_array_",
        "tcx_",
        "sk_skb_",
        "skb_do_redirect",
        "tcf_classify",
        "sch_handle_",
    ];
    PREFIXES.iter().any(|p| symbol.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::classify;

    #[test]
    fn profile_lines_are_classified() {
        let report = " 16.28% ; 100 ;iperf3 ;[k] _copy_to_iter\n\
                      0.46%  ; 10  ;iperf3 ;[k] nft_do_chain\n\
                      0.40%  ; 7   ;ksoftirqd/1 ;[k] bpf_prog_1234_lan_ingress\n\
                      0.30%  ; 5   ;swapper ;[k] pv_native_safe_halt\n\
                      0.30%  ; 3   ;swapper ;[k] htab_lru_map_lookup_elem\n\
                      0.30%  ; 4   ;iperf3 ;[k] br_nf_pre_routing\n\
                      5.16%  ; 619 ;bpf-linker ;[.] llvm::TypeFinder::run\n";
        let profile = classify(report);
        assert_eq!(profile.load_samples, 124);
        assert_eq!(profile.netfilter_samples, 10);
        assert_eq!(profile.bpf_samples, 10);
    }
}
