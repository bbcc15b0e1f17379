//! The demo's failover act: with `track` set, the LAN clients download in parallel, one ISP
//! goes silent mid-transfer, and the live per-uplink rates show its traffic stop; the daemon
//! judges it down (the detection time is measured from `balancer status`), the clients stuck on
//! it are reset once it stayed silent for the reset delay, they reconnect through the others,
//! and the line rejoins when the ISP comes back.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::Context;
use balancer_tests::lab::{Lab, SERVER_ADDR, SOURCE_PORT};

use crate::demo::{mbit, step, uplink_stats};

/// The ISP that goes silent, when, and how long the act runs.
const VICTIM: usize = 2;
const CUT_AT: u64 = 4;
const SECONDS: u64 = 10;
const STREAMS: u32 = 6;

pub fn run(lab: &Lab, balancer: &str) -> anyhow::Result<()> {
    step(&format!(
        "Failover: {STREAMS} downloads per LAN client; at t={CUT_AT}s ISP {VICTIM} goes silent (drops everything, link stays up)"
    ));
    let labtool = lab.labtool().to_string_lossy().into_owned();
    let server = format!("{SERVER_ADDR}:{SOURCE_PORT}");
    let (count, seconds) = (STREAMS.to_string(), SECONDS.to_string());
    let mut clients = Vec::new();
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
            ],
        )?);
    }
    let started = Instant::now();
    let mut last = uplink_stats(lab, balancer)?;
    let mut last_at = started;
    let mut cut: Option<Instant> = None;
    let mut detected: Option<Duration> = None;
    let mut reconnect = None;
    println!(
        "  per-uplink rates from `balancer stats --json`, once a second (Mbit/s down), and isp{VICTIM}'s health:"
    );
    for tick in 1..=SECONDS {
        let next = started + Duration::from_secs(tick);
        // Poll health while waiting for the next tick, so detection is measured to ~25 ms.
        while Instant::now() < next {
            if let Some(cut) = cut
                && detected.is_none()
                && victim_state(lab, balancer)? == "down"
            {
                detected = Some(cut.elapsed());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let rows = uplink_stats(lab, balancer)?;
        let now = Instant::now();
        let dt = (now - last_at).as_secs_f64();
        let mut line = format!("  t={tick:>2}s");
        for (row, prev) in rows.iter().zip(&last) {
            let _ = write!(
                line,
                "  {} {:>5.1}",
                row.name,
                mbit(row.rx_bytes.saturating_sub(prev.rx_bytes), dt)
            );
        }
        let _ = write!(line, "  isp{VICTIM}: {}", victim_state(lab, balancer)?);
        println!("{line}");
        last = rows;
        last_at = now;
        if tick == CUT_AT {
            silence(lab, true)?;
            cut = Some(Instant::now());
            println!("  -- ISP {VICTIM} goes silent");
        }
        // Once the stuck clients were reset, a new batch of downloads shows where new flows go.
        if reconnect.is_none() && cut.is_some_and(|c| c.elapsed() >= Duration::from_millis(2500)) {
            let remaining = (SECONDS - tick).max(1).to_string();
            reconnect = Some(lab.spawn(
                &lab.client(1),
                &[
                    &labtool,
                    "streams",
                    &server,
                    "--count",
                    "4",
                    "--seconds",
                    &remaining,
                ],
            )?);
            println!("  -- client 1 opens 4 new downloads");
        }
    }

    let mut reset = 0;
    let mut completed = 0;
    for client in &mut clients {
        client.wait_timeout(Duration::from_secs(10))?;
        let summary = summary_of(&client.log())?;
        completed += summary["succeeded"].as_u64().unwrap_or(0);
        reset += summary["errors"].as_array().map_or(0, |errors| {
            errors
                .iter()
                .filter(|e| e.as_str().is_some_and(|e| e.contains("reset")))
                .count()
        });
    }
    let new_sources = match &mut reconnect {
        Some(batch) => {
            batch.wait_timeout(Duration::from_secs(10))?;
            let summary = summary_of(&batch.log())?;
            summary["sources"]
                .as_object()
                .map(|m| m.keys().cloned().collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        }
        None => String::new(),
    };
    silence(lab, false)?;
    let back = Instant::now();
    let rejoined = loop {
        if victim_state(lab, balancer)? == "up" {
            break Some(back.elapsed());
        }
        if back.elapsed() > Duration::from_secs(10) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    step("Failover summary");
    match detected {
        Some(detected) => println!(
            "  isp{VICTIM} judged down {} ms after it went silent (no probe answered, no traffic answered)",
            detected.as_millis()
        ),
        None => println!("  isp{VICTIM} was never judged down"),
    }
    println!(
        "  {reset} downloads stuck on isp{VICTIM} were reset toward their clients (after it stayed silent for the reset delay); {completed} of {} ran to the end on the other uplinks",
        2 * STREAMS
    );
    println!("  new downloads after the failover went out from: {new_sources}");
    match rejoined {
        Some(after) => println!(
            "  ISP {VICTIM} back: the uplink rejoined {} ms later (after the hysteresis)",
            after.as_millis()
        ),
        None => println!("  ISP {VICTIM} back, but the uplink had not rejoined after 10 s"),
    }
    Ok(())
}

/// The victim's health as `balancer status --json` reports it.
fn victim_state(lab: &Lab, balancer: &str) -> anyhow::Result<String> {
    let output = lab.exec(&lab.gw(), &[balancer, "status", "--json"])?;
    let status: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("`balancer status --json` is not JSON")?;
    Ok(status["uplinks"][VICTIM - 1]["health"]["state"]
        .as_str()
        .unwrap_or("?")
        .to_owned())
}

/// Makes the victim ISP drop everything it would forward, both ways, or stop doing so.
fn silence(lab: &Lab, on: bool) -> anyhow::Result<()> {
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
        lab.exec_ok(&lab.isp(VICTIM), &argv)?;
    }
    Ok(())
}

/// The JSON summary a `labtool streams` client printed last.
fn summary_of(log: &str) -> anyhow::Result<serde_json::Value> {
    log.lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("no summary from a streams client: {}", log.trim()))
}
