//! Raw-IP point-to-point uplinks in the lab: what PPPoE's `ppp0` or an LTE modem's `wwan0` is to
//! tc and routing (no Ethernet header, `A peer B`), made of a TUN device in the gateway and one in
//! the ISP router, relayed by `labtool tun-relay` running in the gateway's namespace (so tearing
//! the lab down kills it with the rest). Ending the relay deletes both interfaces, as a dropped
//! session does; connecting again re-creates them, with a new ifindex.

use std::{
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use super::{Lab, topology::ip_batch};
use crate::process::{ChildGuard, DEFAULT_TIMEOUT, run_bounded};

/// The ISP router's end of every uplink.
const ISP_DEVICE: &str = "down0";

impl Lab {
    /// Name of the relay of raw-IP uplink i among the lab's servers (and of its log).
    fn relay_name(&self, i: usize) -> String {
        format!("tun-relay-{}", self.uplink_interface(i))
    }

    /// Brings raw-IP uplink i up with the gateway at `source` and the ISP router at `peer`:
    /// starts the relay, waits for both devices, then addresses them and sets them up. The
    /// ISP's rules and routes name `down0` and the source, so they apply to the new device.
    pub fn connect_raw_ip(
        &mut self,
        i: usize,
        source: Ipv4Addr,
        peer: Ipv4Addr,
    ) -> anyhow::Result<()> {
        let (gw, isp, wan) = (self.gw(), self.isp(i), self.uplink_interface(i));
        let log = self
            .state_dir
            .join("logs")
            .join(format!("{}.log", self.relay_name(i)));
        let labtool = self.labtool.to_string_lossy().into_owned();
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &gw, &labtool, "tun-relay", &wan])
            .args(["--peer-netns", &isp, "--peer", ISP_DEVICE]);
        // Own process group: a Ctrl-C at the terminal that ran `lab up` must not end the link.
        command.process_group(0);
        // The log is appended to across reconnections: only what this relay writes counts.
        let logged_before = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
        let mut guard = ChildGuard::spawn(&mut command, &log)
            .with_context(|| format!("starting the relay of {wan}"))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !guard
            .log()
            .get(logged_before..)
            .is_some_and(|new| new.contains("ready"))
        {
            if let Some(status) = guard.try_wait()? {
                bail!(
                    "the relay of {wan} exited with {status}: {}",
                    guard.log().trim()
                );
            }
            if Instant::now() >= deadline {
                bail!("the relay of {wan} did not create its devices within 5 s");
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.servers.push(guard);
        // The ISP's end first: when pppd addresses ppp0, the session is up at both ends, so a
        // balancer that takes the uplink the moment it has its address must find a peer there.
        ip_batch(
            &isp,
            &[
                format!("addr add {peer} peer {source} dev {ISP_DEVICE}"),
                format!("link set {ISP_DEVICE} up"),
            ],
        )?;
        ip_batch(
            &gw,
            &[
                format!("addr add {source} peer {peer} dev {wan}"),
                format!("link set {wan} up"),
            ],
        )?;
        self.write_state()
    }

    /// Makes ISP i's customer address `address`: its router forwards only packets from it, and
    /// the internet host routes it back through that ISP (what a renumbered line looks like
    /// from outside).
    pub fn set_isp_customer(&self, i: usize, address: Ipv4Addr) -> anyhow::Result<()> {
        ip_batch(
            &self.isp(i),
            &[
                "rule del prio 100".to_owned(),
                format!("rule add iif {ISP_DEVICE} from {address}/32 lookup main prio 100"),
            ],
        )?;
        ip_batch(
            &self.inet(),
            &[format!(
                "route replace {address}/32 via 198.19.{i}.2 dev isp{i}"
            )],
        )
    }

    /// Ends raw-IP uplink i's relay: both of its interfaces disappear at once, as when a PPP
    /// session or a modem drops. Waits until the gateway's interface is gone.
    pub fn disconnect_raw_ip(&mut self, i: usize) -> anyhow::Result<()> {
        let name = self.relay_name(i);
        let position = self
            .servers
            .iter()
            .position(|s| super::servers::server_name(s) == name)
            .with_context(|| format!("uplink {i} has no running relay"))?;
        let mut guard = self.servers.remove(position);
        guard.terminate(Duration::from_secs(1))?;
        let wan = self.uplink_interface(i);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = run_bounded(
                Command::new("ip").args(["-n", &self.gw(), "link", "show", "dev", &wan]),
                DEFAULT_TIMEOUT,
            )?;
            if !out.status.success() {
                break;
            }
            if Instant::now() >= deadline {
                bail!("{wan} still exists 5 s after its relay ended");
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.write_state()
    }
}
