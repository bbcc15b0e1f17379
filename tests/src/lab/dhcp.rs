//! DHCP-addressed uplinks in the lab, as cable and fibre modems hand them out: dnsmasq serves
//! the uplink's address (one lease, two minutes) from the ISP router's namespace, and Debian's
//! `udhcpc` on the gateway installs it with a default route in the main table, at a metric of
//! its own per uplink (two DHCP clients must not fight over one default route). The client
//! runs the lab's own script, which touches only its interface's address and route, never
//! /etc/resolv.conf (`ip netns exec` shares the host's /etc).

use std::{
    fs,
    net::Ipv4Addr,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use super::Lab;
use crate::process::{ChildGuard, DEFAULT_TIMEOUT, run_ok};

/// The gateway's main-table metric of DHCP uplink i's default route.
pub fn dhcp_route_metric(i: usize) -> u32 {
    100 + u32::try_from(i).unwrap_or(0)
}

/// udhcpc calls this with the event as $1 and the lease in the environment.
const CLIENT_SCRIPT: &str = r#"#!/bin/sh
# The lab's udhcpc script: the leased address and a default route via the router, on
# $interface only. METRIC comes from the lab (one per DHCP uplink).
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    current=$(ip -4 -o addr show dev "$interface" | awk '{print $4}')
    if [ "$current" != "$ip/$mask" ]; then
      ip -4 addr flush dev "$interface"
      ip addr add "$ip/$mask" dev "$interface"
    fi
    for r in $router; do
      ip route replace default via "$r" dev "$interface" metric "$METRIC"
      break
    done
    ;;
esac
exit 0
"#;

impl Lab {
    /// Starts DHCP uplink i: the server in its ISP's namespace leasing `address` (router: the
    /// ISP's address), then the client on the gateway's `wan<i>`, and waits until the gateway
    /// has the address.
    pub fn start_dhcp(&mut self, i: usize, address: Ipv4Addr) -> anyhow::Result<()> {
        self.start_dhcp_server(i, address)?;
        let (gw, wan) = (self.gw(), self.uplink_interface(i));
        let script = self.state_dir.join("udhcpc.script");
        fs::write(&script, CLIENT_SCRIPT)
            .with_context(|| format!("writing {}", script.display()))?;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
        let log = self
            .state_dir
            .join("logs")
            .join(format!("dhcp-client-{wan}.log"));
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &gw, "env"])
            .arg(format!("METRIC={}", dhcp_route_metric(i)))
            .args(["udhcpc", "-f", "-i", &wan, "-s"])
            .arg(&script)
            // Ask once a second; release the lease when stopped, as a client on shutdown does.
            .args(["-t", "10", "-T", "1", "-A", "1", "-R"]);
        command.process_group(0);
        let guard = ChildGuard::spawn(&mut command, &log)
            .with_context(|| format!("starting udhcpc on {wan}"))?;
        self.servers.push(guard);
        self.wait_for_address(i, address)?;
        self.write_state()
    }

    /// (Re)starts the DHCP server of uplink i leasing `address`; a running one is stopped
    /// first. Renumbering: call this with a new address, then [`Lab::renew_dhcp`].
    pub fn start_dhcp_server(&mut self, i: usize, address: Ipv4Addr) -> anyhow::Result<()> {
        let name = format!("dhcp-server-isp{i}");
        if let Some(position) = self
            .servers
            .iter()
            .position(|s| super::servers::server_name(s) == name)
        {
            let mut old = self.servers.remove(position);
            old.terminate(Duration::from_secs(1))?;
        }
        let (isp, dir) = (self.isp(i), self.state_dir.clone());
        let router = self.uplink_gateway(i);
        let log = dir.join("logs").join(format!("{name}.log"));
        let leases = dir.join(format!("{name}.leases"));
        // A new server forgets the old lease, so a renewal of the old address is refused and
        // the client falls back to discovery, as after a real renumbering.
        let _ = fs::remove_file(&leases);
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &isp]).args([
            "dnsmasq".to_owned(),
            "--keep-in-foreground".to_owned(),
            "--conf-file=/dev/null".to_owned(),
            "--no-resolv".to_owned(),
            "--no-hosts".to_owned(),
            // DHCP only: no DNS server here.
            "--port=0".to_owned(),
            "--interface=down0".to_owned(),
            "--bind-interfaces".to_owned(),
            "--dhcp-authoritative".to_owned(),
            format!("--dhcp-range={address},{address},255.255.255.0,2m"),
            format!("--dhcp-option=option:router,{router}"),
            format!("--dhcp-leasefile={}", leases.display()),
            format!("--pid-file={}", dir.join(format!("{name}.pid")).display()),
            "--user=root".to_owned(),
            "--log-dhcp".to_owned(),
            format!("--log-facility={}", log.display()),
        ]);
        command.process_group(0);
        let guard = ChildGuard::spawn(&mut command, &log)
            .with_context(|| format!("starting the DHCP server in {isp}"))?;
        self.servers.push(guard);
        self.write_state()
    }

    /// Makes DHCP uplink i's client ask again now (SIGUSR1: renew), e.g. after the server
    /// was restarted with another address.
    pub fn renew_dhcp(&self, i: usize) -> anyhow::Result<()> {
        let name = format!("dhcp-client-{}", self.uplink_interface(i));
        let client = self
            .servers
            .iter()
            .find(|s| super::servers::server_name(s) == name)
            .with_context(|| format!("uplink {i} has no DHCP client"))?;
        crate::process::signal(client.pid(), nix::sys::signal::Signal::SIGUSR1);
        Ok(())
    }

    /// Renumbers DHCP uplink i to `address`, as an ISP does at a new lease: its router now
    /// forwards only the new address, the server leases only it, and the client is told to
    /// renew, which the server refuses, so the client drops the old address and asks again.
    /// Returns once the gateway holds the new address.
    pub fn renumber_dhcp(&mut self, i: usize, address: Ipv4Addr) -> anyhow::Result<()> {
        self.set_isp_customer(i, address)?;
        self.start_dhcp_server(i, address)?;
        self.renew_dhcp(i)?;
        self.wait_for_address(i, address)
    }

    /// Waits up to 10 s until uplink i's interface holds `address`.
    pub fn wait_for_address(&self, i: usize, address: Ipv4Addr) -> anyhow::Result<()> {
        let wan = self.uplink_interface(i);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let shown = run_ok(
                Command::new("ip").args([
                    "-n",
                    &self.gw(),
                    "-4",
                    "-o",
                    "addr",
                    "show",
                    "dev",
                    &wan,
                ]),
                DEFAULT_TIMEOUT,
            )?;
            if shown.contains(&format!(" {address}/")) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{wan} did not get {address} by DHCP within 10 s (it has: {})",
                    shown.trim()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}
