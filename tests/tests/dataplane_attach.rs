//! Proves the eBPF pipeline end to end: the object `balancer/build.rs` embeds loads, passes the
//! verifier, attaches through TCX to a real interface, sees real packets and lets them through.
//!
//! Root only. Everything happens in two throw-away network namespaces (`bal-dp-<pid>-lan` holds
//! the interface under test, `bal-dp-<pid>-peer` the sender); the root namespace is never touched.
//! Two namespaces because traffic between two addresses of one namespace is delivered over `lo`
//! and never crosses the veth.

use std::{
    fs::File,
    net::{Ipv4Addr, UdpSocket},
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use balancer::dataplane::{Dataplane, LanCounters};
use nix::sched::{CloneFlags, setns};

const LAN_IF: &str = "lan0";
const PEER_IF: &str = "peer0";
// 198.18.0.0/15 (RFC 2544, benchmarking) only: never routable, never an office's own network.
const LAN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 1);
const PEER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 2);
const PORT: u16 = 9;
const DATAGRAMS: u64 = 5;
const PAYLOAD: &[u8] = b"balancer dataplane_attach";

/// A network namespace deleted on drop, panics included; its veth ends and addresses go with it.
struct NetnsGuard {
    name: String,
}

impl NetnsGuard {
    fn create(name: String) -> anyhow::Result<Self> {
        ip(&["netns", "add", &name])?;
        Ok(Self { name })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(error) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleaning up namespace {}: {error:#}", self.name);
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (package iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `work` on a fresh thread that has joined namespace `netns`: `setns` only moves the
/// calling thread, so the test's own thread (and every other test) stays where it was.
fn in_netns<T: Send + 'static>(
    netns: &str,
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let path = format!("/run/netns/{netns}");
    let handle = thread::spawn(move || -> anyhow::Result<T> {
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {path}"))?;
        work()
    });
    match handle.join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

#[test]
fn lan_ingress_counts_real_packets_and_passes_them() -> anyhow::Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "this test loads eBPF and creates network namespaces: run it as root"
    );

    let prefix = format!("bal-dp-{}", std::process::id());
    let lan = NetnsGuard::create(format!("{prefix}-lan"))?;
    let peer = NetnsGuard::create(format!("{prefix}-peer"))?;
    ip(&[
        "-n", &lan.name, "link", "add", LAN_IF, "type", "veth", "peer", "name", PEER_IF, "netns",
        &peer.name,
    ])?;
    for (netns, dev, addr) in [(&lan, LAN_IF, LAN_ADDR), (&peer, PEER_IF, PEER_ADDR)] {
        let cidr = format!("{addr}/30");
        ip(&["-n", &netns.name, "addr", "add", &cidr, "dev", dev])?;
        ip(&["-n", &netns.name, "link", "set", dev, "up"])?;
    }

    let peer_name = peer.name.clone();
    let (before, after, received) = in_netns(&lan.name, move || {
        let mut dataplane = Dataplane::load()?;
        dataplane.attach_lan_ingress(LAN_IF)?;
        let receiver = UdpSocket::bind((LAN_ADDR, PORT)).context("binding the receiver")?;
        receiver.set_read_timeout(Some(Duration::from_secs(5)))?;
        // A socket keeps the namespace it was created in, so one made on a peer thread sends
        // from the peer namespace whichever thread uses it.
        let sender = in_netns(&peer_name, || {
            UdpSocket::bind((PEER_ADDR, 0)).context("binding the sender")
        })?;

        let before = dataplane.counters()?;
        let mut received = 0u64;
        let mut buffer = [0u8; 64];
        for _ in 0..DATAGRAMS {
            sender.send_to(PAYLOAD, (LAN_ADDR, PORT))?;
            // Each datagram must arrive: the program's verdict has to let packets through.
            let (len, from) = receiver
                .recv_from(&mut buffer)
                .context("receiving a datagram across the veth")?;
            ensure!(from.ip() == PEER_ADDR && buffer.get(..len) == Some(PAYLOAD));
            received += 1;
        }
        let after = dataplane.counters()?;
        Ok((before, after, received))
    })?;

    assert_eq!(received, DATAGRAMS);
    let delta = LanCounters {
        packets: after.packets - before.packets,
        bytes: after.bytes - before.bytes,
        ipv4: after.ipv4 - before.ipv4,
    };
    // At least: ARP and IPv6 neighbour traffic on the link may add a few more.
    let frame_len = (14 + 20 + 8 + PAYLOAD.len()) as u64;
    assert!(delta.packets >= DATAGRAMS, "{delta:?}");
    assert!(delta.ipv4 >= DATAGRAMS, "{delta:?}");
    assert!(delta.bytes >= DATAGRAMS * frame_len, "{delta:?}");
    Ok(())
}
