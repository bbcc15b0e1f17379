//! What the bench records about the host it ran on: the date, the machine, the kernel, and
//! the CPU mitigations that make kernel calls dear (they explain most of a per-packet row's
//! difference between two hosts).

use std::process::Command;

use serde_json::json;

pub(super) fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

pub(super) fn machine() -> serde_json::Value {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("?")
        .to_owned();
    let kind = Command::new("systemd-detect-virt")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|k| !k.is_empty())
        .map_or("unknown".to_owned(), |k| {
            if k == "none" {
                "bare metal".to_owned()
            } else {
                format!("VM ({k})")
            }
        });
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_default();
    json!({
        "kind": format!("{os} {kind}").trim(),
        "cpus": std::thread::available_parallelism().map_or(0, usize::from),
        "cpu_model": model,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "call_mitigations": call_mitigations(&read),
    })
}

/// The CPU mitigations that make every call and return in the kernel (and the JIT's
/// bpf-to-bpf calls) dearer, as the kernel reports them: they explain most of a per-packet
/// row's difference between two hosts.
fn call_mitigations(read: &dyn Fn(&str) -> String) -> String {
    ["spectre_v2", "retbleed", "spec_rstack_overflow"]
        .iter()
        .filter_map(|name| {
            let state = read(&format!("/sys/devices/system/cpu/vulnerabilities/{name}"));
            let state = state.trim();
            (!state.is_empty() && state != "Not affected").then(|| format!("{name}: {state}"))
        })
        .collect::<Vec<_>>()
        .join("; ")
}
