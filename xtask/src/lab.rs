//! `cargo xtask lab up|down|status`: the network-namespace lab (built by `balancer_tests::lab`).

use std::{path::PathBuf, process::Command};

use anyhow::Context;
use balancer_tests::lab::{self, DEFAULT_PREFIX, Lab, LabSpec, RpFilter};
use clap::Subcommand;

use crate::util;

#[derive(clap::Args)]
pub struct LabArgs {
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build the lab (an existing lab with the same prefix is torn down first) and leave it up.
    Up(UpArgs),
    /// Remove the lab: its namespaces, the processes in them and its state dir.
    Down(PrefixArg),
    /// Show the lab's namespaces, addresses, shaping and servers.
    Status(PrefixArg),
}

#[derive(clap::Args)]
struct PrefixArg {
    /// Namespace prefix (starts with "bal-", at most 12 characters).
    #[arg(long, default_value = DEFAULT_PREFIX)]
    prefix: String,
}

#[derive(clap::Args)]
struct UpArgs {
    #[command(flatten)]
    prefix: PrefixArg,
    /// Number of uplinks (ISP routers), 1..=8.
    #[arg(long, default_value_t = 3)]
    uplinks: usize,
    /// Per-uplink rates in Mbit/s, e.g. 20,20,10 (default: 20, 20, then 10 each).
    #[arg(long, value_delimiter = ',', conflicts_with = "unshaped")]
    rates: Vec<u32>,
    /// No shaping at all.
    #[arg(long)]
    unshaped: bool,
    /// Uplinks 1 and 2 in one subnet, both ISP routers at 198.18.1.1 (ARP flux).
    #[arg(long)]
    same_subnet: bool,
    /// Reverse-path filter on the gateway.
    #[arg(long, default_value = "strict")]
    rp_filter: RpFilter,
    /// Do not start the servers in the internet namespace.
    #[arg(long)]
    no_servers: bool,
    /// Uplinks (1-based, e.g. 2 or 2,3) that are raw-IP point-to-point links like PPPoE or an
    /// LTE modem: TUN devices without an Ethernet header, `198.18.i.2 peer 198.18.i.1`.
    #[arg(long, value_delimiter = ',')]
    raw_ip: Vec<usize>,
    /// Uplinks (1-based) addressed by DHCP: dnsmasq at the ISP, udhcpc on the gateway
    /// (address and a default route in the main table, metric 100 + i).
    #[arg(long, value_delimiter = ',')]
    dhcp: Vec<usize>,
}

pub fn run(args: &LabArgs) -> anyhow::Result<()> {
    match &args.command {
        LabCommand::Up(up_args) => up(up_args),
        LabCommand::Down(p) => {
            let started = std::time::Instant::now();
            let found = lab::find_namespaces(&p.prefix)?.len();
            Lab::down(&p.prefix)?;
            println!(
                "lab {}: down ({found} namespaces removed in {:.1} s)",
                p.prefix,
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        LabCommand::Status(p) => {
            print!("{}", Lab::status(&p.prefix)?);
            Ok(())
        }
    }
}

fn up(args: &UpArgs) -> anyhow::Result<()> {
    let mut spec = LabSpec::new(&args.prefix.prefix, args.uplinks);
    if args.unshaped {
        spec.rates_mbit.clear();
    } else if !args.rates.is_empty() {
        spec.rates_mbit.clone_from(&args.rates);
    }
    spec.same_subnet = args.same_subnet;
    spec.rp_filter = args.rp_filter;
    spec.servers = !args.no_servers;
    spec.raw_ip.clone_from(&args.raw_ip);
    spec.dhcp.clone_from(&args.dhcp);
    spec.validate()?;

    let labtool = build_labtool()?;
    let started = std::time::Instant::now();
    let lab = Lab::up_with_labtool(spec, &labtool)?;
    let shown = picture(&lab);
    let state_dir = lab.state_dir().display().to_string();
    // Keep before printing: a closed stdout (`| head`) must not tear the fresh lab down.
    lab.keep();
    println!("{shown}");
    println!(
        "(up in {:.1} s; state in {state_dir})",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Builds the labtool binary (the lab's servers and clients) and returns its path.
fn build_labtool() -> anyhow::Result<PathBuf> {
    let root = util::workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    util::run(Command::new(cargo).current_dir(&root).args([
        "build",
        "--quiet",
        "-p",
        "balancer-tests",
        "--bin",
        "labtool",
    ]))
    .context("building labtool")?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(target.join("debug").join("labtool"))
}

/// A short picture of the topology with addresses, and commands to try.
pub(crate) fn picture(lab: &Lab) -> String {
    let spec = lab.spec();
    let mut s = String::new();
    let p = lab.prefix();
    s.push_str(&format!("lab {p} is up\n\n"));
    s.push_str(&format!(
        "  {:<10} eth0 {} ─┐\n  {:<10} eth0 {} ─┴─ lan0 {}/24  [{}]  (no default route, ip_forward=0, rp_filter {:?})\n",
        lab.client(1),
        lab.client_addr(1),
        lab.client(2),
        lab.client_addr(2),
        lab::LAN_GATEWAY,
        lab.gw(),
        spec.rp_filter,
    ));
    for i in 1..=spec.uplinks {
        let rate = spec
            .rate_mbit(i)
            .map_or("unshaped".to_owned(), |r| format!("{r} Mbit/s"));
        let (address, kind) = if spec.is_raw_ip(i) {
            (
                format!("{} peer {}", lab.uplink_source(i), lab.uplink_gateway(i)),
                ", raw IP (TUN relay)",
            )
        } else if spec.is_dhcp(i) {
            (format!("{}/24", lab.uplink_source(i)), ", DHCP")
        } else {
            (format!("{}/24", lab.uplink_source(i)), "")
        };
        s.push_str(&format!(
            "      {} {:<12} ── down0 {:<12} [{}] up0 198.19.{i}.2 ── isp{i} 198.19.{i}.1  ({rate}{kind})\n",
            lab.uplink_interface(i),
            address,
            lab.uplink_gateway(i),
            lab.isp(i),
        ));
    }
    s.push_str(&format!(
        "  [{}] srv0 {} (whoami tcp/udp {}, http {}, source {}, sink {}, iperf3 5201-5204), dns {} (*.{})\n",
        lab.inet(),
        lab::SERVER_ADDR,
        lab::WHOAMI_PORT,
        lab::HTTP_PORT,
        lab::SOURCE_PORT,
        lab::SINK_PORT,
        lab::DNS_ADDR,
        lab::DNS_NAME,
    ));
    let tool = lab.labtool().display().to_string();
    let gw = lab.gw();
    let src = lab.uplink_source(1);
    s.push_str("\nTry:\n");
    s.push_str(&format!(
        "  ip netns exec {gw} ip rule add from {src} lookup 101\n"
    ));
    s.push_str(&format!(
        "  ip netns exec {gw} ip route add default via {} dev wan1 table 101\n",
        lab.uplink_gateway(1)
    ));
    s.push_str(&format!(
        "  ip netns exec {gw} {tool} tcp-whoami {}:9000 --bind {src}\n",
        lab::SERVER_ADDR
    ));
    s.push_str(&format!(
        "  ip netns exec {gw} {tool} download {}:9001 --bind {src} --seconds 3\n",
        lab::SERVER_ADDR
    ));
    s.push_str(&format!(
        "  ip netns exec {gw} iperf3 -c {} -p 5201 -B {src} -t 3\n",
        lab::SERVER_ADDR
    ));
    s.push_str(&format!(
        "  ip netns exec {} {tool} dns {} www.{}   # needs the gateway to route\n",
        lab.client(1),
        lab::DNS_ADDR,
        lab::DNS_NAME
    ));
    s.push_str(&format!(
        "  cargo xtask lab status --prefix {p}\n  cargo xtask lab down --prefix {p}\n"
    ));
    s
}
