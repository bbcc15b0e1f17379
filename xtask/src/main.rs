//! `cargo xtask`: everything a developer or CI does besides plain cargo: install the toolchain,
//! build the eBPF object, run the namespace lab, the tests, the demo and the benchmarks.

mod bench;
mod bench_proxy;
mod build;
mod demo;
mod demo_failover;
mod lab;
mod setup;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, lab, test and demo tasks for the balancer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing (Debian packages, bpf-linker, lab tools); a quick no-op when all is there.
    Setup,
    /// Build the eBPF object with Debian's rustc, then user space.
    Build(build::BuildArgs),
    /// Bring the network-namespace lab up or down, or show it.
    Lab(lab::LabArgs),
    /// Run every check CI runs: formatting, lints, unit and lab integration tests (needs root).
    Test(test::TestArgs),
    /// Show the balancer at work in the lab, then tear everything down (needs root).
    Demo,
    /// Measure ours against plain forwarding and an mwan3-like nftables gateway in the lab (needs root).
    Bench(bench::BenchArgs),
    /// Measure the forward proxy against squid spreading over the same uplinks, in the lab (needs root).
    BenchProxy(bench_proxy::BenchProxyArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Build(args) => build::run(&args),
        Command::Lab(args) => lab::run(&args),
        Command::Test(args) => test::run(&args),
        Command::Demo => demo::run(),
        Command::Bench(args) => bench::run(&args),
        Command::BenchProxy(args) => bench_proxy::run(&args),
    }
}
