//! `cargo xtask test`: what CI runs. Installs what is missing, checks formatting and lints,
//! builds the binaries the integration tests drive, runs every test, and fails if a test left a
//! lab namespace behind.

use std::{collections::BTreeSet, process::Command};

use anyhow::{Context, bail};

use crate::{setup, util};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and clippy (quicker local runs; CI runs them).
    #[arg(long)]
    pub no_lint: bool,
    /// Arguments passed on to `cargo test` after `--` (e.g. a test name filter).
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

pub fn run(args: &TestArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the integration tests build network namespaces and need root; run as root (CI does)"
        );
    }
    setup::ensure_installed()?;
    let before = lab_namespaces()?;
    if !args.no_lint {
        util::run(cargo().args(["fmt", "--all", "--", "--check"]))
            .context("formatting differs: run `cargo fmt --all`")?;
    }
    // The tests run the real `balancer` and `labtool` binaries, so build them first.
    util::run(cargo().args(["build", "--workspace", "--bins"]))?;
    if !args.no_lint {
        util::run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    let tested = util::run(
        cargo()
            .args(["test", "--workspace", "--no-fail-fast"])
            .arg("--")
            .args(&args.cargo_test_args),
    );
    let leaked: Vec<String> = lab_namespaces()?.difference(&before).cloned().collect();
    if !leaked.is_empty() {
        bail!(
            "tests left network namespaces behind: {}",
            leaked.join(", ")
        );
    }
    tested
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(util::workspace_root());
    command
}

/// The project's namespaces that exist now (all carry the `bal-` prefix).
fn lab_namespaces() -> anyhow::Result<BTreeSet<String>> {
    let output = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("listing network namespaces")?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with("bal-"))
        .map(str::to_string)
        .collect())
}
