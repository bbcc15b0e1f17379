//! The `balancer` command line: parses arguments and calls the library; each subcommand prints
//! what it did or found. Errors come back to `main`, which prints them with their causes.

use balancer_common::flow::{PROTOCOL_TCP, PROTOCOL_UDP};
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{
    config::Config,
    daemon::{self, DaemonError, RunOptions},
    firewall,
    netlink::Netlink,
    office,
    plan::{self, Strictness},
    reconcile,
    state::{StateDir, Status},
    teardown,
};

#[derive(Parser)]
#[command(
    name = "balancer",
    version,
    about = "Makes an office gateway's uplinks act as one fat pipe"
)]
pub struct Cli {
    /// State directory (default: /run/balancer/net-<network namespace inode>).
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Validate a config against this machine's interfaces and addresses; change nothing.
    Check {
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print the changes `run` would make, as `ip` and `sysctl` commands; change nothing.
    Plan {
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Apply the config and keep it applied (foreground daemon).
    Run {
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Remove everything on exit (for labs and tests); by default it stays in place.
        #[arg(long)]
        teardown_on_exit: bool,
    },
    /// Remove every rule and route the balancer installed and restore the settings it changed.
    Down {
        /// Accepted for symmetry; `down` works from its own record and needs no config.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Show per-uplink traffic and flow counters (from the kernel, daemon running or not).
    Stats {
        /// Print a versioned JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the running daemon's state.
    Status {
        /// Print the daemon's versioned JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let state_dir = StateDir::resolve(cli.state_dir.as_deref())?;
    match cli.command {
        Command::Check { config } => check(&config).await,
        Command::Plan { config } => show_plan(&config).await,
        Command::Run {
            config,
            teardown_on_exit,
        } => Ok(daemon::run(RunOptions {
            config_path: config,
            state_dir,
            teardown_on_exit,
        })
        .await?),
        Command::Down { config } => down(config, &state_dir).await,
        Command::Status { json } => status(&state_dir, json),
        Command::Stats { json } => {
            let pins = crate::dataplane::bpffs::PinDir::for_this_namespace()?;
            let stats = crate::stats::read(&pins, &state_dir.path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print!("{}", crate::stats::table(&stats));
            }
            Ok(())
        }
    }
}

async fn load_and_observe(path: &std::path::Path) -> anyhow::Result<(Config, plan::Observed)> {
    let config = Config::load(path)?;
    let netlink = Netlink::connect()?;
    let observed = reconcile::observe(&netlink, &config).await?;
    Ok((config, observed))
}

async fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let (config, observed) = load_and_observe(path).await?;
    plan::desired(&config, &observed, Strictness::Strict).map_err(|error| DaemonError::Config {
        path: path.display().to_string(),
        error,
    })?;
    println!("{}: OK, {} uplink(s)", path.display(), config.uplinks.len());
    println!("  {}", nat_summary(&config));
    for uplink in config.uplinks.iter().filter(|u| u.track.is_empty()) {
        // Probing only the modem cannot see a dead line behind it; without targets, only
        // carrier loss takes an uplink out of the rotation.
        eprintln!(
            "warning: uplink {} has no `track` targets: a line that dies behind its modem will not be noticed",
            uplink.name
        );
    }
    for (destination, interface) in office::too_wide(&config, &observed) {
        // Everything an office route covers is neither balanced nor translated.
        eprintln!(
            "warning: the route to {destination} via {interface} makes that much of the internet an office destination: \
             it is neither balanced nor translated (a VPN's redirect-gateway routes?); route only the office's networks there"
        );
    }
    warn_about_source_nat(&config);
    let states = crate::uplink::resolve(&config, &observed, &[]);
    warn_about_reserved_ports(&config, &states);
    for (uplink, state) in config.uplinks.iter().zip(&states) {
        let source = state.source.map_or("?".into(), |a| a.to_string());
        let via = match (state.gateway, state.routable || state.source.is_some()) {
            (Some(gateway), _) => format!("via {gateway}"),
            (None, true) => format!("dev {}", uplink.interface),
            (None, false) => "via ?".into(),
        };
        println!(
            "  {:<12} id {:<3} {} src {} {}  weight {}  table {}  mark {:#x}",
            uplink.name,
            uplink.id,
            uplink.interface,
            source,
            via,
            uplink.weight,
            uplink.table,
            uplink.mark
        );
        // Not an error: a hotplug interface or a learned address may come later.
        if !state.routable
            && let Some(reason) = state.unavailable()
        {
            println!("  {:<12} waiting: {reason}", "");
        }
    }
    Ok(())
}

/// The NAT behaviour the data plane is configured for, one line for `check` and `plan`.
fn nat_summary(config: &Config) -> String {
    let data = &config.dataplane;
    if !data.enabled {
        return "data plane: off".into();
    }
    format!(
        "data plane: NAT ports {}-{}, endpoint-independent mapping, filtering {}",
        data.nat_port_min,
        data.nat_port_max,
        data.filtering.name()
    )
}

/// Lists the ports inside the NAT range that the gateway listens on (on any or an uplink
/// address) or the host forwards (`host_ports`): `run` never maps them.
fn warn_about_reserved_ports(config: &Config, states: &[crate::uplink::UplinkState]) {
    let data = &config.dataplane;
    if !data.enabled {
        return;
    }
    let (min, max) = (data.nat_port_min, data.nat_port_max);
    let uplink_addrs: Vec<std::net::Ipv4Addr> = states.iter().filter_map(|s| s.source).collect();
    let ports = crate::host_ports::HostPortsReader::default().read();
    let keeps = "`run` keeps it out of the mappings (a LAN client using it as its source port gets another translated port)";
    let name = |protocol| {
        if protocol == PROTOCOL_TCP {
            "tcp"
        } else {
            "udp"
        }
    };
    for listener in &ports.listeners {
        let reachable = listener
            .addr
            .is_none_or(|addr| uplink_addrs.contains(&addr));
        if !reachable || !(min..=max).contains(&listener.port) {
            continue;
        }
        let addr = listener
            .addr
            .map_or("every address".into(), |a| a.to_string());
        let owner = crate::host_ports::socket_owner(listener.inode)
            .map(|comm| format!(" (process {comm})"))
            .unwrap_or_default();
        eprintln!(
            "warning: {} port {} is in the NAT range {min}-{max}: a socket listens on it on {addr}{owner}; {keeps}",
            name(listener.protocol),
            listener.port
        );
    }
    let forwarded = [
        (PROTOCOL_UDP, &ports.forwards.udp),
        (PROTOCOL_TCP, &ports.forwards.tcp),
    ];
    for (protocol, set) in forwarded {
        for port in set.iter().filter(|port| (min..=max).contains(*port)) {
            eprintln!(
                "warning: {} port {port} is in the NAT range {min}-{max}: the host's nftables DNAT forwards it; {keeps}",
                name(protocol)
            );
        }
    }
}

/// Warns about the host firewall's source NAT on an uplink (`firewall`).
fn warn_about_source_nat(config: &Config) {
    let uplinks: Vec<String> = config.uplinks.iter().map(|u| u.interface.clone()).collect();
    let found = firewall::read_ruleset().and_then(|ruleset| match ruleset {
        Some(ruleset) => firewall::source_nat_on_uplinks(&ruleset, &uplinks),
        None => Ok(Vec::new()),
    });
    match found {
        Ok(rules) => {
            for rule in rules {
                let handle = rule
                    .handle
                    .map(|h| format!(" (handle {h})"))
                    .unwrap_or_default();
                eprintln!(
                    "warning: nftables chain `{}`{handle} applies {} to {}: its ports on the uplink address can collide with \
                     balancer's NAT ports and send replies to the wrong client; balancer already translates LAN traffic \
                     leaving by its uplinks, so remove the rule or limit it to other interfaces (port forwards and filtering stay yours)",
                    rule.chain,
                    rule.action,
                    rule.interfaces.join(", ")
                );
            }
        }
        Err(error) => eprintln!("warning: could not read the nftables ruleset: {error:#}"),
    }
}

async fn show_plan(path: &std::path::Path) -> anyhow::Result<()> {
    let (config, observed) = load_and_observe(path).await?;
    let operations = plan::plan(&config, &observed, Strictness::Strict).map_err(|error| {
        DaemonError::Config {
            path: path.display().to_string(),
            error,
        }
    })?;
    println!("# {}", nat_summary(&config));
    if operations.is_empty() {
        println!(
            "# nothing to change: the kernel already matches {}",
            path.display()
        );
    }
    for operation in operations {
        println!("{operation}");
    }
    Ok(())
}

async fn down(config: Option<PathBuf>, state_dir: &StateDir) -> anyhow::Result<()> {
    if let Some(path) = config {
        // Only to catch a mistyped path; the record in the state directory drives the teardown.
        Config::load(&path)?;
    }
    let netlink = Netlink::connect()?;
    let report = teardown::down(&netlink, state_dir).await?;
    println!(
        "removed {} rule(s), {} route(s), {} data plane link(s) and {} map(s); restored {} setting(s)",
        report.rules, report.routes, report.links, report.maps, report.sysctls
    );
    Ok(())
}

fn status(state_dir: &StateDir, json: bool) -> anyhow::Result<()> {
    let document = state_dir.query("status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&document)?);
        return Ok(());
    }
    let status: Status = serde_json::from_value(document)?;
    println!(
        "daemon pid {}  config {}  reconciles {}",
        status.pid, status.config, status.reconciles
    );
    if let Some(error) = &status.last_error {
        println!("last error: {error}");
    }
    println!(
        "{:<12} {:>3} {:<10} {:<16} {:<16} {:>6} {:>6} {:<8} {:<8} {:>6} {:>8}  WHY",
        "UPLINK",
        "ID",
        "INTERFACE",
        "SOURCE",
        "GATEWAY",
        "WEIGHT",
        "TABLE",
        "CARRIER",
        "HEALTH",
        "LOSS%",
        "RTT ms",
    );
    for uplink in &status.uplinks {
        let health = uplink.health.as_ref();
        let state = match health {
            Some(h) if h.passive.is_some() => "down".to_string(),
            Some(h) if !h.tracked => "untracked".to_string(),
            Some(h) => format!("{:?}", h.state).to_lowercase(),
            None => "-".to_string(),
        };
        let why = uplink
            .unavailable
            .clone()
            .or_else(|| health.and_then(|h| h.passive.clone()))
            .or_else(|| health.and_then(|h| h.reason.clone()))
            .unwrap_or_default();
        println!(
            "{:<12} {:>3} {:<10} {:<16} {:<16} {:>6} {:>6} {:<8} {:<8} {:>6} {:>8}  {}",
            uplink.name,
            uplink.id,
            uplink.interface,
            uplink.source,
            uplink.gateway,
            uplink.weight,
            uplink.table,
            if uplink.carrier { "up" } else { "down" },
            state,
            health.map_or("-".to_string(), |h| format!("{:.1}", h.loss_percent)),
            health
                .and_then(|h| h.rtt_ms)
                .map_or("-".to_string(), |rtt| format!("{rtt:.1}")),
            why
        );
    }
    println!("stages:");
    for uplink in &status.uplinks {
        let stages: Vec<String> = uplink
            .stages
            .list()
            .iter()
            .map(|(name, stage)| format!("{name} {}", if stage.ok { "ok" } else { "no" }))
            .collect();
        println!("  {:<12} {}", uplink.name, stages.join(", "));
        if let Some((name, stage)) = uplink.stages.list().into_iter().find(|(_, s)| !s.ok) {
            println!("  {:<12} {name}: {}", "", stage.reason);
        }
        for error in &uplink.errors {
            println!("  {:<12} error: {error}", "");
        }
    }
    if let Some(reload) = &status.last_reload {
        println!(
            "last reload: {} {}",
            if reload.ok { "ok" } else { "refused" },
            reload.message
        );
    }
    if let Some(proxy) = &status.proxy {
        print!("{}", crate::proxy::table(proxy));
    }
    Ok(())
}
