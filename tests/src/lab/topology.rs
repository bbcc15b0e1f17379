//! Building the lab: namespaces with their sysctls, the veth links, addresses and routes of the
//! gateway, the ISP routers, the internet host and the clients, tbf shaping on the uplinks, and
//! the bpf filesystem the balancer pins into.

use std::{fs, path::Path, process::Command};

use anyhow::{Context, ensure};

use super::{BPFFS, DNS_ADDR, LAN_GATEWAY, LAN_INTERFACE, Lab, SERVER_ADDR, SHAPER_LATENCY_MS};
use crate::process::{DEFAULT_TIMEOUT, run_ok};

/// tbf burst for a rate: 10 ms worth of the rate, at least 16 KiB.
/// tbf refills tokens per timer tick (HZ=250: 4 ms); the bucket must hold at least one tick's
/// worth (rate/250) or a single TCP stream cannot reach the rate. 10 ms (2.5 ticks) gives
/// headroom for timer jitter, and the 16 KiB floor (~11 full frames) keeps low rates from
/// starving on a 2-frame bucket, while the overshoot stays tiny next to a seconds-long transfer.
pub fn tbf_burst_bytes(rate_mbit: u32) -> u64 {
    (u64::from(rate_mbit) * 1_000_000 / 8 / 100).max(16 * 1024)
}

impl Lab {
    pub(super) fn build(&mut self) -> anyhow::Result<()> {
        let spec = self.spec.clone();
        let gw = self.gw();
        let inet = self.inet();

        // Namespaces first, each with its sysctls set before any interface exists, so the
        // interfaces inherit the `default` values instead of the host's.
        for ns in self.namespaces() {
            run_ok(
                Command::new("ip").args(["netns", "add", &ns]),
                DEFAULT_TIMEOUT,
            )?;
            let (forward, rp) = if ns == gw {
                (0, spec.rp_filter.sysctl_value())
            } else {
                (1, 1)
            };
            self.sysctls(&ns, forward, rp)?;
        }

        // Gateway: the LAN bridge with one veth per client, and one veth per uplink to its ISP.
        // No default route and no forwarding: that is the product's job.
        let mut cmds = vec![
            "link set lo up".to_owned(),
            format!("link add {LAN_INTERFACE} type bridge"),
            format!("addr add {LAN_GATEWAY}/24 dev {LAN_INTERFACE}"),
            format!("link set {LAN_INTERFACE} up"),
        ];
        for c in 1..=2 {
            cmds.push(format!(
                "link add lanc{c} type veth peer name eth0 netns {}",
                self.client(c)
            ));
            cmds.push(format!("link set lanc{c} master {LAN_INTERFACE}"));
            cmds.push(format!("link set lanc{c} up"));
        }
        for i in (1..=spec.uplinks).filter(|&i| !spec.is_raw_ip(i)) {
            let wan = self.uplink_interface(i);
            cmds.push(format!(
                "link add {wan} type veth peer name down0 netns {}",
                self.isp(i)
            ));
            // A DHCP uplink gets its address from its ISP once that is up (below).
            if !spec.is_dhcp(i) {
                cmds.push(format!("addr add {}/24 dev {wan}", self.uplink_source(i)));
            }
            cmds.push(format!("link set {wan} up"));
        }
        ip_batch(&gw, &cmds)?;

        // ISP routers: the uplink side, and a veth to the internet host. A raw-IP uplink's
        // devices come from its relay, started and addressed here.
        for i in 1..=spec.uplinks {
            let mut cmds = vec!["link set lo up".to_owned()];
            if !spec.is_raw_ip(i) {
                cmds.push(format!("addr add {}/24 dev down0", self.uplink_gateway(i)));
                cmds.push("link set down0 up".to_owned());
            }
            cmds.extend([
                format!("link add up0 type veth peer name isp{i} netns {inet}"),
                format!("addr add 198.19.{i}.2/24 dev up0"),
                "link set up0 up".to_owned(),
            ]);
            ip_batch(&self.isp(i), &cmds)?;
            if spec.is_raw_ip(i) {
                self.connect_raw_ip(i, self.uplink_source(i), self.uplink_gateway(i))?;
            }
        }

        // Internet host: the service addresses on a dummy interface, and a /32 route back to
        // each uplink source via its ISP, so a reply returns the way the request came.
        // srv0 is a dummy interface; kernels built without CONFIG_DUMMY (like this project's
        // CI VM) get a veth pair with both ends in inet instead, which behaves the same here.
        if ip_batch(&inet, &["link add srv0 type dummy".to_owned()]).is_err() {
            ip_batch(
                &inet,
                &[
                    "link add srv0 type veth peer name srv0peer".to_owned(),
                    "link set srv0peer up".to_owned(),
                ],
            )?;
        }
        let mut cmds = vec![
            "link set lo up".to_owned(),
            format!("addr add {SERVER_ADDR}/32 dev srv0"),
            format!("addr add {DNS_ADDR}/32 dev srv0"),
            "link set srv0 up".to_owned(),
        ];
        for i in 1..=spec.uplinks {
            cmds.push(format!("addr add 198.19.{i}.1/24 dev isp{i}"));
            cmds.push(format!("link set isp{i} up"));
        }
        for i in 1..=spec.uplinks {
            cmds.push(format!(
                "route add {}/32 via 198.19.{i}.2 dev isp{i}",
                self.uplink_source(i)
            ));
        }
        ip_batch(&inet, &cmds)?;

        // ISP routing, now that the internet side has carrier: forward only the own uplink's
        // source; anything else from the uplink side is blackholed (visible as loss, while the
        // rx counters on down0 still show it arrived). Local addresses keep working (prio 0),
        // but with rp_filter=1 the ISP also ignores ARP requests whose sender address is not
        // the uplink's (no way back to it), like a modem that only talks to its own customer.
        for i in 1..=spec.uplinks {
            ip_batch(
                &self.isp(i),
                &[
                    format!("route add default via 198.19.{i}.1 dev up0"),
                    format!(
                        "rule add iif down0 from {}/32 lookup main prio 100",
                        self.uplink_source(i)
                    ),
                    "rule add iif down0 blackhole prio 101".to_owned(),
                ],
            )?;
        }

        for i in (1..=spec.uplinks).filter(|&i| spec.is_dhcp(i)) {
            self.start_dhcp(i, self.uplink_source(i))?;
        }

        for c in 1..=2 {
            ip_batch(
                &self.client(c),
                &[
                    "link set lo up".to_owned(),
                    format!("addr add {}/24 dev eth0", self.client_addr(c)),
                    "link set eth0 up".to_owned(),
                    format!("route add default via {LAN_GATEWAY} dev eth0"),
                ],
            )?;
        }

        // Shaping: tbf on both directions of every uplink.
        for i in 1..=spec.uplinks {
            if let Some(rate) = spec.rate_mbit(i) {
                let tbf = |dev: &str| {
                    format!(
                        "qdisc replace dev {dev} root tbf rate {rate}mbit burst {} latency {SHAPER_LATENCY_MS}ms",
                        tbf_burst_bytes(rate)
                    )
                };
                tc_batch(&gw, &[tbf(&self.uplink_interface(i))])?;
                tc_batch(&self.isp(i), &[tbf("down0")])?;
            }
        }

        if spec.servers {
            self.start_servers()?;
        }
        self.write_state()
    }

    fn sysctls(&self, ns: &str, forward: u8, rp_filter: u8) -> anyhow::Result<()> {
        // ip_forward first: writing it resets all.accept_redirects, which is set after.
        let mut settings = vec![format!("net.ipv4.ip_forward={forward}")];
        for scope in ["all", "default"] {
            settings.extend([
                format!("net.ipv4.conf.{scope}.rp_filter={rp_filter}"),
                format!("net.ipv6.conf.{scope}.disable_ipv6=1"),
                format!("net.ipv4.conf.{scope}.accept_redirects=0"),
                format!("net.ipv4.conf.{scope}.send_redirects=0"),
                format!("net.ipv4.conf.{scope}.arp_filter=0"),
                format!("net.ipv4.conf.{scope}.arp_announce=0"),
                format!("net.ipv4.conf.{scope}.arp_ignore=0"),
            ]);
        }
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", ns, "sysctl", "-q", "-w"])
                .args(&settings),
            DEFAULT_TIMEOUT,
        )
        .with_context(|| format!("setting sysctls in {ns}"))?;
        Ok(())
    }
}

/// Makes sure a bpf filesystem is mounted at [`BPFFS`] in this (the root) mount namespace.
///
/// Why: the balancer pins its maps and TCX links there so that forwarding goes on while the
/// daemon is stopped and a new `run` can adopt them. Every `ip netns exec` runs its command in a
/// fresh private mount namespace, so a bpffs the daemon mounted itself would vanish with it, and
/// the pins with it. A bpffs mounted here beforehand is inherited by those namespaces (they
/// start as a copy of this one), and pins made in it outlive the daemon.
///
/// Idempotent: does nothing when [`BPFFS`] already is a bpf filesystem. It is never unmounted
/// (other labs, or a real daemon, may be using it); this is a mount, not a network change.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let path = Path::new(BPFFS);
    if is_bpffs(path) {
        return Ok(());
    }
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mount -t bpf bpf {}", path.display()))?;
    ensure!(
        is_bpffs(path),
        "{} is still not a bpf filesystem after mounting one",
        path.display()
    );
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Runs `ip -n ns -batch -` with these commands; the error names the namespace and the line.
pub(super) fn ip_batch(ns: &str, cmds: &[String]) -> anyhow::Result<()> {
    batch("ip", ns, cmds)
}

fn tc_batch(ns: &str, cmds: &[String]) -> anyhow::Result<()> {
    batch("tc", ns, cmds)
}

fn batch(tool: &str, ns: &str, cmds: &[String]) -> anyhow::Result<()> {
    let dir = std::env::temp_dir();
    let file = dir.join(format!("bal-lab-{}-{ns}-{tool}.batch", std::process::id()));
    fs::write(&file, cmds.join("\n") + "\n")
        .with_context(|| format!("writing {}", file.display()))?;
    let result = run_ok(
        Command::new(tool).args(["-n", ns, "-batch"]).arg(&file),
        DEFAULT_TIMEOUT,
    )
    .with_context(|| format!("{tool} in {ns}:\n  {}", cmds.join("\n  ")));
    let _ = fs::remove_file(&file);
    result.map(drop)
}
