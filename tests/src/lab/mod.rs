//! The network-namespace lab: a gateway, two LAN clients, one ISP router per uplink and an
//! "internet" host, wired with veth pairs, shaped with tbf, with echo/HTTP/DNS/iperf3 servers.
//!
//! This module owns the topology (names and addresses other tests and docs rely on), bringing it
//! up and tearing it down (also after an interrupted `up`, by namespace name), and running
//! commands inside it. It only ever touches namespaces whose names start with the lab prefix
//! (always `bal-…`) and only uses addresses from 198.18.0.0/15.
//!
//! Topology for prefix P and uplinks 1..N:
//! ```text
//!  P-c1 eth0 198.18.0.11 ─┐                    ┌ wan1 198.18.1.2 ── down0 198.18.1.1 P-isp1 up0 198.19.1.2 ── isp1 198.19.1.1 ┐
//!  P-c2 eth0 198.18.0.12 ─┴ lan0 198.18.0.1 P-gw ┼ wan2 198.18.2.2 ── down0 198.18.2.1 P-isp2 up0 198.19.2.2 ── isp2 198.19.2.1 ┼ P-inet srv0 198.18.9.1, .53
//!                                              └ wanN 198.18.N.2 ── down0 198.18.N.1 P-ispN up0 198.19.N.2 ── ispN 198.19.N.1 ┘
//! ```
//!
//! The lab is split by concern:
//! - this module: the names and addresses ([`LabSpec`], the constants), [`Lab`] and running
//!   commands in its namespaces;
//! - `topology`: building the namespaces, links, addresses, routes, sysctls and shaping, and
//!   the bpffs mount;
//! - `servers`: starting the internet host's servers and waiting until they answer;
//! - `clients`: the client helpers (`labtool` run in a namespace) and what they report;
//! - `state`: the state file and finding a lab's namespaces by name;
//! - `teardown`: [`Lab::down`] and tearing down on drop;
//! - `status`: the human-readable state of a lab;
//! - `tweaks`: changes to a lab that is up (an interface's MTU, dropping ICMP);
//! - `dhcp`: DHCP-addressed uplinks (dnsmasq at the ISP, udhcpc on the gateway);
//! - `raw_ip`: raw-IP point-to-point uplinks (TUN devices and their relay), connected and
//!   disconnected like a PPP session.

mod clients;
mod dhcp;
mod raw_ip;
mod servers;
mod state;
mod status;
mod teardown;
mod topology;
mod tweaks;

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::process::{self, ChildGuard, DEFAULT_TIMEOUT, describe, run_bounded};

pub use clients::{LinkCounters, Ping, SourceShare, StreamResult, Streams, TcpMany, Transfer};
pub use dhcp::dhcp_route_metric;
pub use state::{LabState, find_namespaces, is_lab_namespace, read_state, state_dir};
pub use topology::{ensure_bpffs, tbf_burst_bytes};

/// Where each lab keeps its small state (spec, server PIDs, logs): `STATE_ROOT/<prefix>/`.
pub const STATE_ROOT: &str = "/run/balancer-lab";
/// The default lab prefix used by `cargo xtask lab`.
pub const DEFAULT_PREFIX: &str = "bal-lab";
/// Longest prefix: keeps namespace names short and leaves room for several labs at once.
pub const MAX_PREFIX_LEN: usize = 12;
pub const MAX_UPLINKS: usize = 8;

/// The gateway's LAN address (clients' default route) and network.
pub const LAN_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const LAN_NETWORK: &str = "198.18.0.0/24";
pub const LAN_INTERFACE: &str = "lan0";
/// The internet host's service address (whoami, HTTP, source, sink, iperf3).
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 1);
/// The internet host's DNS server address; it resolves `*.lab.example` to [`SERVER_ADDR`].
pub const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 53);
pub const DNS_NAME: &str = "lab.example";
pub const WHOAMI_PORT: u16 = 9000;
pub const HTTP_PORT: u16 = 8080;
pub const SOURCE_PORT: u16 = 9001;
pub const SINK_PORT: u16 = 9002;
pub const IPERF_PORTS: [u16; 4] = [5201, 5202, 5203, 5204];
/// tbf's queueing bound: at most this much delay is buffered before tbf drops.
pub const SHAPER_LATENCY_MS: u32 = 20;
/// Where the balancer pins its maps and TCX links (a bpf filesystem in the root mount namespace).
pub const BPFFS: &str = "/run/balancer/bpffs";

/// Reverse-path filtering on the gateway (`net.ipv4.conf.{all,default}.rp_filter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RpFilter {
    /// rp_filter = 1: the reply must arrive on the interface the route back would use.
    Strict,
    /// rp_filter = 2: any route back is enough.
    Loose,
}

impl RpFilter {
    pub fn sysctl_value(self) -> u8 {
        match self {
            RpFilter::Strict => 1,
            RpFilter::Loose => 2,
        }
    }
}

impl std::str::FromStr for RpFilter {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "strict" => Ok(RpFilter::Strict),
            "loose" => Ok(RpFilter::Loose),
            other => bail!("rp-filter must be strict or loose, not {other:?}"),
        }
    }
}

/// What lab to build.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabSpec {
    /// Namespace name prefix: starts with `bal-`, at most [`MAX_PREFIX_LEN`] characters.
    pub prefix: String,
    /// Number of uplinks (ISP routers), 1..=8.
    pub uplinks: usize,
    /// Per-uplink rate in Mbit/s, both directions; empty = unshaped.
    pub rates_mbit: Vec<u32>,
    /// Uplinks 1 and 2 share 198.18.1.0/24 and both ISP routers are 198.18.1.1 (ARP-flux case).
    pub same_subnet: bool,
    pub rp_filter: RpFilter,
    /// Start the servers in the internet namespace.
    pub servers: bool,
    /// Uplinks (1-based) that are raw-IP point-to-point links, like PPPoE's `ppp0` or an LTE
    /// modem's `wwan0`: a TUN device at each end relayed by `labtool tun-relay`, the gateway's
    /// `wan<i>` with `198.18.i.2 peer 198.18.i.1`, and no Ethernet header.
    #[serde(default)]
    pub raw_ip: Vec<usize>,
    /// Uplinks (1-based) whose gateway address comes by DHCP: dnsmasq in the ISP's namespace
    /// leases `198.18.i.2/24` with router `198.18.i.1`, and udhcpc on the gateway installs it
    /// with a default route in the main table (metric [`dhcp_route_metric`]).
    #[serde(default)]
    pub dhcp: Vec<usize>,
}

impl LabSpec {
    /// Default rates (20, 20, 10, then 10 Mbit/s), strict rp_filter, servers on.
    pub fn new(prefix: &str, uplinks: usize) -> Self {
        Self {
            prefix: prefix.to_owned(),
            uplinks,
            rates_mbit: Self::default_rates(uplinks),
            same_subnet: false,
            rp_filter: RpFilter::Strict,
            servers: true,
            raw_ip: Vec::new(),
            dhcp: Vec::new(),
        }
    }

    pub fn default_rates(uplinks: usize) -> Vec<u32> {
        (1..=uplinks)
            .map(|i| if i <= 2 { 20 } else { 10 })
            .collect()
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        validate_prefix(&self.prefix)?;
        ensure!(
            (1..=MAX_UPLINKS).contains(&self.uplinks),
            "uplinks must be 1..={MAX_UPLINKS}, not {}",
            self.uplinks
        );
        ensure!(
            self.rates_mbit.is_empty() || self.rates_mbit.len() == self.uplinks,
            "{} rates given for {} uplinks",
            self.rates_mbit.len(),
            self.uplinks
        );
        ensure!(
            self.rates_mbit.iter().all(|r| (1..=10_000).contains(r)),
            "rates must be 1..=10000 Mbit/s: {:?}",
            self.rates_mbit
        );
        ensure!(
            !self.same_subnet || self.uplinks >= 2,
            "--same-subnet needs at least 2 uplinks"
        );
        for &i in &self.dhcp {
            ensure!(
                (1..=self.uplinks).contains(&i)
                    && !self.is_raw_ip(i)
                    && !(self.same_subnet && i <= 2),
                "DHCP uplink {i} must be one of the uplinks 1..={}, Ethernet, and not in --same-subnet",
                self.uplinks
            );
        }
        for &i in &self.raw_ip {
            ensure!(
                (1..=self.uplinks).contains(&i),
                "raw-IP uplink {i} is not one of the uplinks 1..={}",
                self.uplinks
            );
            ensure!(
                !(self.same_subnet && i <= 2),
                "uplinks 1 and 2 share an Ethernet subnet with --same-subnet; uplink {i} cannot be raw-IP"
            );
        }
        Ok(())
    }

    /// Uplink i's shaped rate (1-based), `None` when unshaped.
    pub fn rate_mbit(&self, i: usize) -> Option<u32> {
        i.checked_sub(1)
            .and_then(|k| self.rates_mbit.get(k))
            .copied()
    }

    /// Whether uplink i gets its address by DHCP.
    pub fn is_dhcp(&self, i: usize) -> bool {
        self.dhcp.contains(&i)
    }

    /// Whether uplink i is a raw-IP point-to-point link.
    pub fn is_raw_ip(&self, i: usize) -> bool {
        self.raw_ip.contains(&i)
    }

    pub fn uplink_source(&self, i: usize) -> Ipv4Addr {
        if self.same_subnet && i == 2 {
            Ipv4Addr::new(198, 18, 1, 3)
        } else {
            Ipv4Addr::new(198, 18, octet(i), 2)
        }
    }

    pub fn uplink_gateway(&self, i: usize) -> Ipv4Addr {
        if self.same_subnet && i == 2 {
            Ipv4Addr::new(198, 18, 1, 1)
        } else {
            Ipv4Addr::new(198, 18, octet(i), 1)
        }
    }
}

fn octet(i: usize) -> u8 {
    u8::try_from(i).unwrap_or(u8::MAX)
}

/// The prefix must be ours (`bal-`) and short; teardown deletes by this prefix, so this check
/// is what keeps `down` from touching anything else.
pub fn validate_prefix(prefix: &str) -> anyhow::Result<()> {
    ensure!(
        prefix.starts_with("bal-") && prefix.len() > 4,
        "lab prefix {prefix:?} must start with \"bal-\""
    );
    ensure!(
        prefix.len() <= MAX_PREFIX_LEN,
        "lab prefix {prefix:?} is longer than {MAX_PREFIX_LEN} characters"
    );
    ensure!(
        prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !prefix.ends_with('-'),
        "lab prefix {prefix:?} may hold only a-z, 0-9 and inner '-'"
    );
    Ok(())
}

/// A lab that is up. Dropping it tears it down (also during a panic) unless [`Lab::keep`] was called.
pub struct Lab {
    spec: LabSpec,
    labtool: PathBuf,
    state_dir: PathBuf,
    servers: Vec<ChildGuard>,
    spawned: AtomicUsize,
    keep: bool,
}

impl Lab {
    /// Builds the lab with [`labtool_path`] as the server binary.
    pub fn up(spec: LabSpec) -> anyhow::Result<Lab> {
        Self::up_with_labtool(spec, &labtool_path())
    }

    /// Builds the lab. An existing lab with the same prefix is torn down first (with a note on
    /// stderr): a leftover from an interrupted run must not make the next run fail.
    pub fn up_with_labtool(spec: LabSpec, labtool: &Path) -> anyhow::Result<Lab> {
        spec.validate()?;
        ensure!(
            nix::unistd::geteuid().is_root(),
            "the lab needs root (network namespaces)"
        );
        ensure_bpffs()?;
        if spec.servers || !spec.raw_ip.is_empty() {
            ensure!(
                labtool.is_file(),
                "labtool binary not found at {} (build it: cargo build -p balancer-tests --bin labtool, or set BALANCER_LABTOOL)",
                labtool.display()
            );
        }
        let prefix = spec.prefix.clone();
        let state_dir = state_dir(&prefix);
        if !find_namespaces(&prefix)?.is_empty() || state_dir.exists() {
            eprintln!("lab {prefix}: already exists, tearing it down first");
            Lab::down(&prefix)?;
        }
        fs::create_dir_all(state_dir.join("logs"))
            .with_context(|| format!("creating {}", state_dir.display()))?;
        // From here on, an error drops `lab`, which tears down whatever was built.
        let mut lab = Lab {
            spec,
            labtool: labtool.to_owned(),
            state_dir,
            servers: Vec::new(),
            spawned: AtomicUsize::new(0),
            keep: false,
        };
        lab.write_state()?;
        lab.build()
            .with_context(|| format!("bringing lab {prefix} up"))?;
        Ok(lab)
    }

    /// Leaves the lab (and its servers) running after this value is gone; `Lab::down` removes it.
    pub fn keep(mut self) {
        self.keep = true;
        for server in self.servers.drain(..) {
            server.release();
        }
    }

    pub fn spec(&self) -> &LabSpec {
        &self.spec
    }
    pub fn prefix(&self) -> &str {
        &self.spec.prefix
    }
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
    pub fn labtool(&self) -> &Path {
        &self.labtool
    }

    pub fn gw(&self) -> String {
        format!("{}-gw", self.spec.prefix)
    }
    /// LAN client n (1 or 2).
    pub fn client(&self, n: usize) -> String {
        format!("{}-c{n}", self.spec.prefix)
    }
    /// ISP router for uplink i (1-based).
    pub fn isp(&self, i: usize) -> String {
        format!("{}-isp{i}", self.spec.prefix)
    }
    pub fn inet(&self) -> String {
        format!("{}-inet", self.spec.prefix)
    }
    /// All namespaces of this lab, in creation order.
    pub fn namespaces(&self) -> Vec<String> {
        let mut all = vec![self.gw(), self.client(1), self.client(2)];
        all.extend((1..=self.spec.uplinks).map(|i| self.isp(i)));
        all.push(self.inet());
        all
    }

    /// Client n's LAN address (198.18.0.1n).
    pub fn client_addr(&self, n: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, 10 + octet(n))
    }
    /// The gateway's address on uplink i (what the ISP lets through).
    pub fn uplink_source(&self, i: usize) -> Ipv4Addr {
        self.spec.uplink_source(i)
    }
    /// ISP i's address on the uplink (the "modem").
    pub fn uplink_gateway(&self, i: usize) -> Ipv4Addr {
        self.spec.uplink_gateway(i)
    }
    /// The gateway's interface for uplink i: `wan<i>`.
    pub fn uplink_interface(&self, i: usize) -> String {
        format!("wan{i}")
    }
    pub fn uplinks(&self) -> usize {
        self.spec.uplinks
    }

    /// A product config for this lab: the LAN, and one `[[uplink]]` per ISP with weights
    /// proportional to the rates (reduced, e.g. 2,2,1 for 20/20/10; all 1 when unshaped).
    pub fn balancer_config_toml(&self) -> String {
        let divisor = self.spec.rates_mbit.iter().copied().fold(0, gcd).max(1);
        let mut toml =
            format!("[lan]\ninterfaces = [\"{LAN_INTERFACE}\"]\nnetworks = [\"{LAN_NETWORK}\"]\n");
        for i in 1..=self.spec.uplinks {
            let weight = self.spec.rate_mbit(i).map_or(1, |r| r / divisor);
            let _ = write!(
                toml,
                "\n[[uplink]]\nname = \"isp{i}\"\ninterface = \"{}\"\ngateway = \"{}\"\nsource = \"{}\"\nweight = {weight}\n",
                self.uplink_interface(i),
                self.uplink_gateway(i),
                self.uplink_source(i)
            );
        }
        toml
    }

    /// `ip netns exec ns argv…` with [`DEFAULT_TIMEOUT`]; a non-zero exit is returned, not an error.
    pub fn exec(&self, ns: &str, argv: &[&str]) -> anyhow::Result<Output> {
        self.exec_timeout(ns, argv, DEFAULT_TIMEOUT)
    }

    pub fn exec_timeout(
        &self,
        ns: &str,
        argv: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Output> {
        self.check_ns(ns)?;
        run_bounded(
            Command::new("ip").args(["netns", "exec", ns]).args(argv),
            timeout,
        )
        .with_context(|| format!("in {ns}: {}", describe(argv)))
    }

    /// Like [`Lab::exec`] but fails (with stderr) on a non-zero exit; returns stdout.
    pub fn exec_ok(&self, ns: &str, argv: &[&str]) -> anyhow::Result<String> {
        let output = self.exec(ns, argv)?;
        process::check(&format!("in {ns}: {}", describe(argv)), &output)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs `labtool args…` in `ns` (bounded); a non-zero exit is returned, not an error.
    pub fn labtool_exec(&self, ns: &str, args: &[&str]) -> anyhow::Result<Output> {
        let tool = self.labtool.to_string_lossy().into_owned();
        let argv: Vec<&str> = std::iter::once(tool.as_str())
            .chain(args.iter().copied())
            .collect();
        self.exec(ns, &argv)
    }

    /// Starts `argv` in `ns`; the guard kills and reaps it on drop. Output goes to a log file
    /// under the lab's state dir (`ChildGuard::log`).
    pub fn spawn(&self, ns: &str, argv: &[&str]) -> anyhow::Result<ChildGuard> {
        self.check_ns(ns)?;
        let n = self.spawned.fetch_add(1, Ordering::Relaxed);
        let name = argv
            .first()
            .and_then(|a| Path::new(a).file_name())
            .map_or("child".into(), |f| f.to_string_lossy());
        let log = self
            .state_dir
            .join("logs")
            .join(format!("{ns}-{name}-{n}.log"));
        ChildGuard::spawn(
            Command::new("ip").args(["netns", "exec", ns]).args(argv),
            &log,
        )
        .with_context(|| format!("in {ns}: {}", describe(argv)))
    }

    fn check_ns(&self, ns: &str) -> anyhow::Result<()> {
        ensure!(
            ns.strip_prefix(self.spec.prefix.as_str())
                .is_some_and(|rest| rest.starts_with('-')),
            "namespace {ns:?} is not part of lab {}",
            self.spec.prefix
        );
        Ok(())
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Where the labtool binary is: `$BALANCER_LABTOOL`, else next to the current executable (or one
/// level up, for test binaries in target/<profile>/deps), else target/debug in the workspace.
/// Integration tests of this crate can pass `env!("CARGO_BIN_EXE_labtool")` to `up_with_labtool`.
pub fn labtool_path() -> PathBuf {
    if let Some(path) = std::env::var_os("BALANCER_LABTOOL") {
        return PathBuf::from(path);
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("labtool"));
            if let Some(up) = dir.parent() {
                candidates.push(up.join("labtool"));
            }
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
        });
    candidates.push(target.join("debug").join("labtool"));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| target.join("debug").join("labtool"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_checked() {
        assert!(validate_prefix("bal-lab").is_ok());
        assert!(validate_prefix("bal-t123456a").is_ok());
        assert!(validate_prefix("lab").is_err());
        assert!(validate_prefix("bal-").is_err());
        assert!(validate_prefix("bal-much-too-long").is_err());
        assert!(validate_prefix("bal-a b").is_err());
    }

    #[test]
    fn namespace_matching_is_exact() {
        assert!(is_lab_namespace("bal-lab", "bal-lab-gw"));
        assert!(is_lab_namespace("bal-lab", "bal-lab-isp12"));
        assert!(is_lab_namespace("bal-lab", "bal-lab-c2"));
        assert!(!is_lab_namespace("bal-lab", "bal-lab2-gw"));
        assert!(!is_lab_namespace("bal-lab", "bal-lab-x-gw"));
        assert!(!is_lab_namespace("bal-lab", "bal-lab-isp"));
    }

    #[test]
    fn config_weights_follow_rates() {
        let lab = Lab {
            spec: LabSpec::new("bal-unit", 3),
            labtool: PathBuf::new(),
            state_dir: PathBuf::new(),
            servers: Vec::new(),
            spawned: AtomicUsize::new(0),
            keep: true,
        };
        let toml = lab.balancer_config_toml();
        assert!(toml.contains("interfaces = [\"lan0\"]"));
        assert!(toml.contains("name = \"isp3\"\ninterface = \"wan3\"\ngateway = \"198.18.3.1\"\nsource = \"198.18.3.2\"\nweight = 1"));
        assert_eq!(toml.matches("weight = 2").count(), 2);
    }

    #[test]
    fn same_subnet_addresses() {
        let mut spec = LabSpec::new("bal-unit", 3);
        spec.same_subnet = true;
        assert_eq!(spec.uplink_source(2), Ipv4Addr::new(198, 18, 1, 3));
        assert_eq!(spec.uplink_gateway(2), Ipv4Addr::new(198, 18, 1, 1));
        assert_eq!(spec.uplink_source(3), Ipv4Addr::new(198, 18, 3, 2));
    }

    #[test]
    fn burst_covers_a_timer_tick() {
        for rate in [1, 10, 20, 100, 1000] {
            let per_tick = u64::from(rate) * 1_000_000 / 8 / 250;
            assert!(tbf_burst_bytes(rate) >= per_tick.max(2 * 1514));
        }
    }
}
