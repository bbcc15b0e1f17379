//! `cargo xtask build`: the eBPF object with Debian's rustc, then user space.
//!
//! The eBPF build itself lives in balancer/build.rs, so a plain `cargo build` does the same;
//! this task adds the toolchain check first and says where the results are.

use std::{env, path::PathBuf, process::Command};

use crate::{setup, util};

#[derive(clap::Args)]
pub struct BuildArgs {
    /// Build user space in release mode.
    #[arg(long)]
    pub release: bool,
}

pub fn run(args: &BuildArgs) -> anyhow::Result<()> {
    setup::ensure_installed()?;
    let root = util::workspace_root();

    // The balancer library alone first: its build script is what compiles the eBPF object, and a
    // failure there should not be buried under the rest of the workspace's output.
    util::run(&mut cargo_build(args, &["--package", "balancer", "--lib"]))?;
    // Fixed by balancer/build.rs, whatever the profile or CARGO_TARGET_DIR.
    let object = root.join("target/bpf/bpfel-unknown-none/release/balancer-ebpf");
    println!("build: eBPF object {}", object.display());

    util::run(&mut cargo_build(args, &["--workspace", "--bins"]))?;
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let profile = if args.release { "release" } else { "debug" };
    println!(
        "build: balancer binary {}",
        target_dir.join(profile).join("balancer").display()
    );
    Ok(())
}

fn cargo_build(args: &BuildArgs, what: &[&str]) -> Command {
    let mut command = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command
        .current_dir(util::workspace_root())
        .arg("build")
        .args(what);
    if args.release {
        command.arg("--release");
    }
    command
}
