//! `cargo xtask setup`: installs what is missing, idempotently and without questions.
//!
//! Two toolchains meet here: rustup's (builds user space, runs this xtask) and Debian's rustc
//! with a prebuilt `core` for bpfel-unknown-none (builds the eBPF object without nightly or
//! `-Z build-std`). bpf-linker links the latter and must match Debian's LLVM major version.

use std::{
    collections::BTreeSet,
    env,
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, bail};

use crate::util;

/// Debian's rustc + the BPF `core`, and the LLVM that bpf-linker is built against.
const TOOLCHAIN_PACKAGES: &[&str] = &[
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// What the namespace lab, the tests and the demo shell out to.
const LAB_PACKAGES: &[&str] = &[
    "iproute2",
    "iperf3",
    "dnsmasq-base",
    "ethtool",
    "tcpdump",
    "nftables",
    "curl",
    // DHCP-addressed uplinks in the lab (`lab up --dhcp`): the gateway's client.
    "udhcpc",
    // The systemd lab test boots this machine's root under systemd-nspawn.
    "systemd-container",
    // The NAT behaviour test: a classic STUN client and server (RFC 3489 classification).
    "stun-client",
    "stun-server",
];
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const BPF_LINKER_VERSION: &str = "0.13";

pub fn run() -> anyhow::Result<()> {
    ensure_installed()
}

/// Installs whatever is missing and says what it did. Other tasks call it first: when all is
/// there it costs one `dpkg-query` and one `bpf-linker --version`.
pub fn ensure_installed() -> anyhow::Result<()> {
    let started = Instant::now();
    let actions = install_missing()?;
    if actions.is_empty() {
        println!(
            "setup: everything already installed ({:.1?})",
            started.elapsed()
        );
    } else {
        println!(
            "setup: done in {:.1?}: {}",
            started.elapsed(),
            actions.join("; ")
        );
    }
    Ok(())
}

fn install_missing() -> anyhow::Result<Vec<String>> {
    let mut actions = Vec::new();

    let wanted: Vec<&str> = TOOLCHAIN_PACKAGES
        .iter()
        .chain(LAB_PACKAGES)
        .copied()
        .collect();
    let missing = missing_packages(&wanted)?;
    if !missing.is_empty() {
        println!("setup: installing Debian packages: {}", missing.join(" "));
        apt_get(&["update"])?;
        let mut install = vec!["install", "-y", "--no-install-recommends"];
        install.extend(missing.iter().map(String::as_str));
        apt_get(&install)?;
        actions.push(format!("installed {}", missing.join(" ")));
    }

    match bpf_linker_version() {
        Some(version) if is_wanted_bpf_linker(&version) => {}
        found => {
            let found = found.unwrap_or_else(|| "none".to_owned());
            println!(
                "setup: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (found: {found}); \
                 this takes a minute or more"
            );
            install_bpf_linker()?;
            actions.push(format!("installed bpf-linker {BPF_LINKER_VERSION}"));
        }
    }
    Ok(actions)
}

/// Packages in `wanted` that dpkg does not report as installed; one query for all of them.
fn missing_packages(wanted: &[&str]) -> anyhow::Result<Vec<String>> {
    // dpkg-query exits non-zero when it has never heard of a package, yet still prints the
    // others, so its exit status is not an error here: absent lines mean missing.
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(wanted)
        .stderr(Stdio::null())
        .output()
        .context("running dpkg-query (is this Debian?)")?;
    let installed: BTreeSet<&str> = std::str::from_utf8(&output.stdout)
        .context("dpkg-query printed non-UTF-8")?
        .lines()
        .filter(|line| line.ends_with(" install ok installed"))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    Ok(wanted
        .iter()
        .filter(|package| !installed.contains(*package))
        .map(|package| (*package).to_owned())
        .collect())
}

fn apt_get(args: &[&str]) -> anyhow::Result<()> {
    util::run(
        Command::new("apt-get")
            .args(["-q", "-o", "Dpkg::Use-Pty=0"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get needs root: run `cargo xtask setup` as root")
}

/// `bpf-linker --version` from PATH or cargo's bin directory (where `cargo install` puts it and
/// where balancer/build.rs also looks), or `None` when there is none that runs.
fn bpf_linker_version() -> Option<String> {
    let candidates = [
        PathBuf::from("bpf-linker"),
        cargo_bin_dir().join("bpf-linker"),
    ];
    candidates.iter().find_map(|linker| {
        let output = Command::new(linker).arg("--version").output().ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    })
}

fn is_wanted_bpf_linker(version_line: &str) -> bool {
    version_line
        .strip_prefix("bpf-linker ")
        .is_some_and(|version| version.starts_with(&format!("{BPF_LINKER_VERSION}.")))
}

fn install_bpf_linker() -> anyhow::Result<()> {
    // llvm-sys finds LLVM through llvm-config, which Debian keeps out of PATH.
    let mut paths = vec![PathBuf::from(LLVM_BIN)];
    if let Some(path) = env::var_os("PATH") {
        paths.extend(env::split_paths(&path));
    }
    let path = env::join_paths(paths).context("building PATH for cargo install")?;
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    util::run(
        Command::new(cargo)
            .args(["install", "bpf-linker", "--force", "--no-default-features"])
            .args(["--features", "llvm-22", "--version"])
            .arg(format!("~{BPF_LINKER_VERSION}"))
            .env("PATH", path),
    )?;
    match bpf_linker_version() {
        Some(version) if is_wanted_bpf_linker(&version) => Ok(()),
        found => bail!(
            "installed bpf-linker, but `bpf-linker --version` reports {found:?}; is {} on PATH?",
            cargo_bin_dir().display()
        ),
    }
}

fn cargo_bin_dir() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

#[cfg(test)]
mod tests {
    use super::is_wanted_bpf_linker;

    #[test]
    fn bpf_linker_version_matches_minor_line_only() {
        assert!(is_wanted_bpf_linker("bpf-linker 0.13.0"));
        assert!(is_wanted_bpf_linker("bpf-linker 0.13.2"));
        assert!(!is_wanted_bpf_linker("bpf-linker 0.130.0"));
        assert!(!is_wanted_bpf_linker("bpf-linker 0.12.1"));
        assert!(!is_wanted_bpf_linker("something else"));
    }
}
