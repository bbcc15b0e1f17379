//! The results: rows (median and spread per proxy, ours/squid ratio) from the samples, the
//! terminal table, and the text of docs/benchmarks-proxy.md (the JSON is the `Report` itself,
//! serialised by `run`).

use std::fmt::Write as _;

use serde::Serialize;

use super::{Params, Proxy, Report, SMALL_BYTES, Sample, median};

/// Median and spread of one row for one proxy over the rounds.
#[derive(Clone, Debug, Serialize)]
struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn of(values: &[f64]) -> Stats {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Stats {
            median: median(&sorted),
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub(super) struct Row {
    name: String,
    unit: &'static str,
    better: &'static str,
    squid: Stats,
    ours: Stats,
    /// ours / squid of the medians.
    ratio: f64,
}

pub(super) fn rows(samples: &[Sample], params: &Params) -> Vec<Row> {
    let of = |proxy: Proxy, value: fn(&Sample) -> f64| {
        let values: Vec<f64> = samples
            .iter()
            .filter(|s| s.proxy == proxy)
            .map(value)
            .collect();
        Stats::of(&values)
    };
    let row = |name: String, unit, better, value: fn(&Sample) -> f64| {
        let squid = of(Proxy::Squid, value);
        let ours = of(Proxy::Ours, value);
        Row {
            name,
            unit,
            better,
            ratio: ours.median / squid.median,
            squid,
            ours,
        }
    };
    vec![
        row(
            format!(
                "requests/s, {SMALL_BYTES} B responses, {} keep-alive connections",
                params.connections
            ),
            "req/s",
            "higher",
            |s| s.requests_per_second,
        ),
        row(
            format!(
                "named requests/s, fresh connection each, {} at once",
                params.connections
            ),
            "req/s",
            "higher",
            |s| s.named_requests_per_second,
        ),
        row(
            format!("one {} MB download", params.download_bytes / 1_000_000),
            "Mbit/s",
            "higher",
            |s| s.download_mbit_per_s,
        ),
        row(
            format!(
                "one {} MB upload through CONNECT",
                params.download_bytes / 1_000_000
            ),
            "Mbit/s",
            "higher",
            |s| s.upload_mbit_per_s,
        ),
        row(
            "added latency per request (fresh connection)".into(),
            "ms",
            "lower",
            |s| s.added_latency_ms,
        ),
        row(
            "request time through the proxy (fresh connection)".into(),
            "ms",
            "lower",
            |s| s.latency_proxy_ms,
        ),
    ]
}

pub(super) fn table(report: &Report) -> String {
    let mut out = format!(
        "{:<58} {:>7} {:>26} {:>26} {:>10}\n",
        "row", "unit", "squid median (min-max)", "ours median (min-max)", "ours/squid"
    );
    for row in &report.rows {
        let cell = |s: &Stats| format!("{} ({}-{})", num(s.median), num(s.min), num(s.max));
        let _ = writeln!(
            out,
            "{:<58} {:>7} {:>26} {:>26} {:>10.2}",
            row.name,
            row.unit,
            cell(&row.squid),
            cell(&row.ours),
            row.ratio
        );
    }
    out
}

/// Three significant-ish digits.
fn num(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// The two ways the rounds can run; docs/benchmarks-proxy.md keeps a section for each.
const MODES: [(&str, &str); 2] = [
    (
        "back-to-back",
        "## Back to back\n\nRounds follow each other at once, so what one turn leaves in the \
         kernel (TIME_WAIT sockets) is there for the next: the sustained regime.\n\n",
    ),
    (
        "settled",
        "## Settled (`--settle`)\n\nBefore each turn the bench waits until fewer than 1,000 \
         sockets are in TIME_WAIT in the gateway (at most 75 s): each proxy starts clean, which \
         shows its own cost per request.\n\n",
    ),
];

/// The page: the fixed text, this run's section, and the other mode's section as `existing`
/// (the page as it was) had it.
pub(super) fn markdown(report: &Report, existing: &str) -> String {
    let p = &report.params;
    let mode = if p.settle { "settled" } else { "back-to-back" };
    let mut md = String::from(
        "# Proxy vs squid\n\n\
         The forward proxy (`[proxy]`, issue 6) against Debian's squid configured to spread its \
         upstream connections over the same uplink addresses, measured in one unshaped \
         3-uplink lab in one run, alternating rounds (squid, ours, squid, ours, ...). Both run in \
         the lab's gateway namespace under the same `balancer run`, whose `from <source>` rules \
         carry each upstream connection out of the uplink its source address names. Generated by \
         `cargo xtask bench-proxy --write-docs` (and `--settle`; xtask/src/bench_proxy/); the \
         raw numbers of the last run are in target/bench/proxy.json.\n\n\
         **Noisy numbers**: the lab's links are veth pairs on a shared 2-vCPU VM, so every row \
         is bounded by CPU and the host's speed drifts between rounds; the ratios, from \
         alternating rounds, are what to read. Each section below comes from its own run; a \
         section without the upload and named rows predates them. Medians and spread \
         (min to max over the rounds); ratios are ours/squid of the medians (higher is better \
         for requests/s and Mbit/s, lower for the latency rows).\n\n",
    );
    for (name, heading) in MODES {
        let begin = format!("<!-- begin {name} -->\n");
        let end = format!("<!-- end {name} -->\n");
        md.push_str(&begin);
        if name == mode {
            md.push_str(heading);
            md.push_str(&section(report));
        } else {
            let kept = existing
                .split_once(&begin)
                .and_then(|(_, rest)| rest.split_once(&end))
                .map(|(section, _)| section.to_string());
            md.push_str(&kept.unwrap_or_else(|| {
                format!(
                    "{heading}Not measured yet: `cargo xtask bench-proxy --write-docs{}`.\n\n",
                    if name == "settled" { " --settle" } else { "" }
                )
            }));
        }
        md.push_str(&end);
    }
    let _ = writeln!(
        md,
        "\n## Method\n\n\
         - Each turn measures the latency rows, then the download, the upload, the named \
         requests, then requests per second (which leaves the most TIME_WAIT sockets behind).\n\
         - Requests per second: {} client connections (alternating between the two LAN \
         clients), each sending `GET http://198.18.9.1:8080/bytes/{SMALL_BYTES}` one after \
         another on a keep-alive connection for {} s; completed responses over the elapsed time.\n\
         - Download: one `GET /bytes/{}` through the proxy from LAN client 1 on a fresh \
         connection, connect to last byte.\n\
         - Upload: as many bytes sent by LAN client 1 through a CONNECT tunnel to the internet \
         host's sink (port 9002) in 256 KiB writes, connect until the last byte is handed to the \
         tunnel; the sink reads 256 KiB at a time (with 8 KiB reads it was the lab's ceiling: \
         the sink alone took more CPU than either proxy, and both measured alike). Right \
         after, the same upload is sent straight to the sink through the gateway's data plane \
         (no proxy): the per-round table shows it beside each proxy's, the ceiling the lab's \
         client and sink allow.\n\
         - Named requests: as many client connections as above, each sending one \
         `GET http://www.lab.example:8080/bytes/{SMALL_BYTES}` per fresh connection \
         (`Connection: close`), so each request needs the name's address: squid's ipcache and \
         our per-uplink cache by TTL answer it (the lab's DNS answers with a 60 s TTL).\n\
         - Added latency: {} requests for {SMALL_BYTES} B one after another, each on a fresh client \
         connection (connect to last byte), through the proxy, minus the median of as many \
         requests sent directly to the server through the gateway's data plane, taking turns \
         request by request.\n\
         - The load generator is a small std client in the bench (threads in the LAN clients' \
         namespaces), not curl, so its own cost is small and the same for both.\n\
         - Ours is the release build; squid is Debian's package, run as `squid -N -f <conf>` in \
         the gateway namespace. Before the rounds, 30 requests through each proxy check that \
         the internet host sees every uplink's address (ISPs drop other sources).\n\
         - The lab's HTTP server sets TCP_NODELAY, as web servers do; without it a response's \
         body waits for the ACK of its head, which squid, reusing its server connection, delays \
         by 40 ms, and squid measured 250 req/s.\n",
        p.connections, p.seconds, p.download_bytes, p.latency_requests
    );
    md.push_str(
        "\n## Reading the numbers\n\n\
         Both proxies keep their upstream connection for a client connection's next request to \
         the same host (ours since it keeps one per client connection: balancer/src/proxy/forward.rs), \
         so the request-rate row measures forwarding, not connects. Both also reuse idle server \
         connections across client connections (squid's `server_persistent_connections`, our \
         shared pool in balancer/src/proxy/pool.rs), so in the named row a fresh client \
         connection usually costs the proxy no connect to the server. An earlier \
         version of ours opened a connection per request and reached only 0.73 of squid's rate, \
         falling tenfold back to back as tens of thousands of sockets piled up in TIME_WAIT. The \
         per-round tables show the TIME_WAIT count at the start of each turn and after the \
         request-rate row. The download row is one long stream: the cost per byte of each \
         proxy's copy loop. The latency rows use a fresh client connection per request, so they \
         include the proxy's connect to the server unless it reuses an idle one (both proxies \
         do); at a few hundred microseconds they are \
         noisy on a shared machine (a negative \"added\" value means the direct requests of \
         that round were the slower ones).\n",
    );
    let _ = writeln!(
        md,
        "\n## squid's configuration\n\n\
         Cache off, no access log (ours keeps none by default), defaults otherwise (one worker, \
         `read_ahead_gap` 16 KB, persistent server connections on). `random` ACLs give each \
         uplink a third: the first takes 1/3, the second 1/2 of the rest, the last the rest.\n\n\
         ```\n{}```",
        report.squid_conf
    );
    md
}

/// One run's part of the page: what ran where, the summary, every round, the spread check.
fn section(report: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "Command: `{}`  ", report.command);
    let _ = writeln!(md, "Machine: {}  ", report.machine);
    let _ = writeln!(md, "squid: {}  ", report.squid_version);
    let _ = writeln!(
        md,
        "{} rounds, {:.0} s in all.\n",
        report.params.rounds, report.seconds_taken
    );
    md.push_str("| row | unit | squid | ours | ours/squid |\n|---|---|---|---|---|\n");
    for row in &report.rows {
        let cell = |s: &Stats| format!("{} ({} to {})", num(s.median), num(s.min), num(s.max));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.2} |",
            row.name,
            row.unit,
            cell(&row.squid),
            cell(&row.ours),
            row.ratio
        );
    }
    md.push_str(
        "\n| round | proxy | req/s | TIME_WAIT at start, after the req/s row | download Mbit/s | upload Mbit/s (direct, no proxy) | through ms | direct ms |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for s in &report.samples {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {}, {} | {:.0} | {:.0} ({:.0}) | {:.3} | {:.3} |",
            s.round,
            s.proxy.name(),
            s.requests_per_second,
            s.time_wait_before,
            s.time_wait_after_requests,
            s.download_mbit_per_s,
            s.upload_mbit_per_s,
            s.upload_direct_mbit_per_s,
            s.latency_proxy_ms,
            s.latency_direct_ms
        );
    }
    let _ = writeln!(md, "\nSpread check (source address, requests of 30):\n");
    for (proxy, seen) in &report.spread {
        let seen: Vec<String> = seen.iter().map(|(ip, n)| format!("{ip} {n}")).collect();
        let _ = writeln!(md, "- {}: {}", proxy.name(), seen.join(", "));
    }
    md.push('\n');
    md
}

/// CPU model, cores, kernel and Debian release.
pub(super) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = read_trimmed("/proc/sys/kernel/osrelease");
    let debian = read_trimmed("/etc/debian_version");
    format!("{cpu}, {cores} cores, Linux {kernel}, Debian {debian}")
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}
