//! `lab status`: the human-readable state of a lab (namespaces, addresses, shaping, rules,
//! processes and servers), from what exists rather than what the state file claims.

use std::{fmt::Write as _, fs, process::Command};

use super::{Lab, find_namespaces, read_state, state::netns_pids, state_dir, validate_prefix};
use crate::process::{DEFAULT_TIMEOUT, run_ok};

impl Lab {
    /// Human-readable state of the lab with this prefix: namespaces, addresses, servers, shaping.
    pub fn status(prefix: &str) -> anyhow::Result<String> {
        status(prefix)
    }
}

fn status(prefix: &str) -> anyhow::Result<String> {
    validate_prefix(prefix)?;
    let namespaces = find_namespaces(prefix)?;
    let state = read_state(prefix);
    let mut out = String::new();
    if namespaces.is_empty() {
        let _ = writeln!(out, "lab {prefix}: not up (no namespaces)");
        if state.is_some() {
            let _ = writeln!(
                out,
                "  stale state dir {} (run lab down)",
                state_dir(prefix).display()
            );
        }
        return Ok(out);
    }
    match &state {
        Some(s) => {
            let rates = if s.spec.rates_mbit.is_empty() {
                "unshaped".to_owned()
            } else {
                s.spec
                    .rates_mbit
                    .iter()
                    .map(|r| format!("{r}"))
                    .collect::<Vec<_>>()
                    .join("/")
                    + " Mbit/s"
            };
            let _ = writeln!(
                out,
                "lab {prefix}: {} uplinks, {rates}, rp_filter {:?}{}{}",
                s.spec.uplinks,
                s.spec.rp_filter,
                if s.spec.same_subnet {
                    ", same-subnet uplinks 1+2"
                } else {
                    ""
                },
                if s.spec.servers { "" } else { ", no servers" }
            );
        }
        None => {
            let _ = writeln!(
                out,
                "lab {prefix}: no state file (interrupted up?); `lab down` removes it"
            );
        }
    }
    for ns in &namespaces {
        let _ = writeln!(out, "\n{ns}");
        match run_ok(
            Command::new("ip").args(["-n", ns, "-br", "addr", "show"]),
            DEFAULT_TIMEOUT,
        ) {
            Ok(text) => {
                for line in text.lines().filter(|l| !l.starts_with("lo ")) {
                    let _ = writeln!(out, "  {line}");
                }
            }
            Err(e) => {
                let _ = writeln!(out, "  (addresses: {e:#})");
            }
        }
        if let Ok(text) = run_ok(
            Command::new("tc").args(["-n", ns, "qdisc", "show"]),
            DEFAULT_TIMEOUT,
        ) {
            for line in text.lines().filter(|l| l.contains(" tbf ")) {
                let _ = writeln!(out, "  shaping: {}", line.trim());
            }
        }
        if ns.ends_with("-gw") || ns.contains("-isp") {
            if let Ok(text) = run_ok(
                Command::new("ip").args(["-n", ns, "rule", "show"]),
                DEFAULT_TIMEOUT,
            ) {
                for line in text.lines().filter(|l| {
                    !l.starts_with("0:") && !l.starts_with("32766:") && !l.starts_with("32767:")
                }) {
                    let _ = writeln!(out, "  rule {line}");
                }
            }
        }
    }
    let inet = format!("{prefix}-inet");
    let _ = writeln!(out, "\nprocesses in {inet}:");
    let running: Vec<u32> = if namespaces.contains(&inet) {
        netns_pids(&inet).unwrap_or_default()
    } else {
        Vec::new()
    };
    for pid in &running {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let _ = writeln!(out, "  {pid:>7} {}", cmdline.trim());
    }
    if let Some(s) = &state {
        for (name, pid) in &s.servers {
            let alive = running.contains(pid);
            let _ = writeln!(
                out,
                "  server {name:<14} pid {pid:>7}: {}",
                if alive { "alive" } else { "NOT RUNNING" }
            );
        }
    }
    Ok(out)
}
