//! `tun-relay`: a raw-IP point-to-point link between two network namespaces, the way a PPPoE
//! session or an LTE modem's raw-IP interface looks to tc and routing (no Ethernet header, an
//! address with a peer). This kernel has no PPP, WireGuard or ipip, so a TUN device at each end
//! and this process copying packets between them stand in. The TUN devices are not persistent:
//! when the relay ends (killed, or its lifetime is over), the kernel deletes both interfaces,
//! as a dropped session deletes `ppp0`.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::fd::AsRawFd,
    thread,
    time::Duration,
};

use anyhow::{Context, bail};

/// Largest packet a TUN device hands over (its MTU is at most this in the lab).
const MAX_PACKET: usize = 65_535;

/// Creates `local` in this process's network namespace and `peer` in the namespace `peer_netns`
/// (a name under /run/netns), then relays packets both ways until `lifetime` is over or a
/// device fails. Prints `ready` once both devices exist.
pub(crate) fn tun_relay(
    local: &str,
    peer_netns: &str,
    peer: &str,
    lifetime: Duration,
) -> anyhow::Result<()> {
    let local_dev = open_tun(local).with_context(|| format!("creating TUN device {local}"))?;
    // setns applies to the calling thread only: the peer device is made on a thread that
    // enters the other namespace; the device stays there whichever thread reads it.
    let (netns, name) = (peer_netns.to_owned(), peer.to_owned());
    let peer_dev = thread::spawn(move || -> anyhow::Result<File> {
        let ns = File::open(format!("/run/netns/{netns}"))
            .with_context(|| format!("opening network namespace {netns}"))?;
        // SAFETY: a plain syscall on a valid descriptor; it changes only this thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("entering network namespace {netns}"));
        }
        open_tun(&name).with_context(|| format!("creating TUN device {name} in {netns}"))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread creating {peer} panicked"))??;
    println!("ready");
    std::io::stdout().flush()?;

    let copy = |mut from: File, mut to: File| {
        thread::spawn(move || -> std::io::Result<()> {
            let mut buf = vec![0u8; MAX_PACKET];
            loop {
                let n = from.read(&mut buf)?;
                // A write can fail while the far device is down (EIO): that packet is lost, as
                // on a real line, and the relay goes on.
                let _ = to.write(&buf[..n]);
            }
        })
    };
    let forward = copy(local_dev.try_clone()?, peer_dev.try_clone()?);
    let backward = copy(peer_dev, local_dev);
    let deadline = std::time::Instant::now() + lifetime;
    while std::time::Instant::now() < deadline {
        if forward.is_finished() || backward.is_finished() {
            bail!("a TUN device of the relay {local} <-> {peer_netns}/{peer} failed");
        }
        thread::sleep(Duration::from_millis(100));
    }
    // Returning ends the process, which closes both devices: the kernel deletes them.
    Ok(())
}

/// Opens /dev/net/tun and creates the TUN device `name` (IFF_TUN: IP packets, no Ethernet
/// header; IFF_NO_PI: no packet-info prefix) in the calling thread's network namespace.
fn open_tun(name: &str) -> anyhow::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        bail!(
            "interface name {name:?} must be 1..{} bytes",
            libc::IFNAMSIZ
        );
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun")?;
    // SAFETY: an all-zero ifreq is valid; the name is copied in bounds (checked above).
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) } != 0 {
        return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
    }
    Ok(file)
}
