//! `icmp-probe`: one UDP datagram (optionally with a small TTL) from a connected socket, then
//! the ICMP error it brings back, seen twice: on a raw ICMP socket (who sent it, its type and
//! code, and the packet it quotes, which must name this socket's own address and port), and as
//! the error the UDP socket reports (ECONNREFUSED for "port unreachable").

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::Serialize;

#[derive(Serialize)]
struct ProbeSummary {
    /// The probe's socket address as the client sees it.
    local: String,
    /// Who sent the ICMP error.
    from: String,
    icmp_type: u8,
    icmp_code: u8,
    /// Source and destination of the quoted datagram.
    quoted_src: String,
    quoted_dst: String,
    /// What the UDP socket reported afterwards: "connection refused", another error, or null.
    socket_error: Option<String>,
}

pub(crate) fn icmp_probe(target: SocketAddrV4, ttl: u32, timeout: Duration) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{
        AddressFamily, SockFlag, SockProtocol, SockType, SockaddrIn, recvfrom, setsockopt, socket,
        sockopt,
    };

    let raw = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Icmp,
    )
    .context("opening a raw ICMP socket (needs root)")?;
    let udp = UdpSocket::bind("0.0.0.0:0").context("binding the probe socket")?;
    udp.connect(target)
        .with_context(|| format!("connecting to {target}"))?;
    udp.set_ttl(ttl).context("setting the TTL")?;
    let SocketAddr::V4(local) = udp.local_addr()? else {
        bail!("the probe socket is not IPv4");
    };
    setsockopt(
        &raw,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::from(libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        }),
    )?;

    let deadline = Instant::now() + timeout;
    let mut next_send = Instant::now();
    let mut buf = [0u8; 2048];
    let summary = loop {
        if Instant::now() >= deadline {
            bail!("no ICMP error about {local} -> {target} within {timeout:?}");
        }
        if Instant::now() >= next_send {
            // Repeated a few times within the timeout: routers rate-limit ICMP errors.
            let _ = udp.send(b"icmp-probe\n");
            next_send = Instant::now() + timeout / 4;
        }
        let n = match recvfrom::<SockaddrIn>(raw.as_raw_fd(), &mut buf) {
            Ok((n, _)) => n,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("receiving ICMP"),
        };
        if let Some(summary) = parse_error(&buf[..n], target) {
            break summary;
        }
    };

    // The UDP socket's view: a pending error shows on the next receive.
    udp.set_read_timeout(Some(Duration::from_millis(200)))?;
    let socket_error = match udp.recv(&mut buf) {
        Ok(_) => None,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Some("connection refused".into()),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(e) => Some(e.to_string()),
    };
    let summary = ProbeSummary {
        local: local.to_string(),
        socket_error,
        ..summary
    };
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

/// An ICMP error (with its IP header, as a raw socket hands it over) quoting a UDP datagram to
/// `target`, or `None`.
fn parse_error(packet: &[u8], target: SocketAddrV4) -> Option<ProbeSummary> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let ip = packet.get(..20)?;
    let icmp = packet.get(ihl..)?;
    if ihl < 20 || icmp.len() < 8 || ![3, 11].contains(&icmp[0]) {
        return None;
    }
    let quoted = &icmp[8..];
    let qihl = usize::from(quoted.first()? & 0x0f) * 4;
    let ports = quoted.get(qihl..qihl + 4)?;
    if qihl < 20 || quoted.get(9) != Some(&17) {
        return None;
    }
    let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let src = SocketAddrV4::new(addr(quoted.get(12..16)?), port(&ports[0..2]));
    let dst = SocketAddrV4::new(addr(quoted.get(16..20)?), port(&ports[2..4]));
    if dst != target {
        return None;
    }
    Some(ProbeSummary {
        local: String::new(),
        from: addr(&ip[12..16]).to_string(),
        icmp_type: icmp[0],
        icmp_code: icmp[1],
        quoted_src: src.to_string(),
        quoted_dst: dst.to_string(),
        socket_error: None,
    })
}
