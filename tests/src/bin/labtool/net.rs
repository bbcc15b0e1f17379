//! Sockets for the clients: a TCP connection from an optional local address (and port), bounded
//! by the client timeout, and a UDP question asked a few times within a timeout.

use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::ClientOpts;

/// A TCP connection from an optional local address, bounded by the client timeout.
pub(crate) fn connect(opts: &ClientOpts) -> anyhow::Result<TcpStream> {
    let stream = match opts.bind {
        None => TcpStream::connect_timeout(&opts.addr, opts.timeout()),
        Some(bind) => connect_from(bind, &opts.addr, opts.timeout()),
    };
    let stream = stream.with_context(|| match opts.bind {
        Some(bind) => format!("connecting to {} from {bind}", opts.addr),
        None => format!("connecting to {}", opts.addr),
    })?;
    stream.set_write_timeout(Some(opts.timeout()))?;
    Ok(stream)
}

/// std cannot bind before connect, so this does socket/bind/non-blocking connect by hand.
fn connect_from(
    bind: SocketAddr,
    addr: &SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind as nix_bind,
        connect as nix_connect, socket,
    };
    use std::os::fd::{AsRawFd, OwnedFd};

    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd: OwnedFd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    match bind {
        SocketAddr::V4(a) => nix_bind(fd.as_raw_fd(), &SockaddrIn::from(a))?,
        SocketAddr::V6(a) => nix_bind(fd.as_raw_fd(), &SockaddrIn6::from(a))?,
    }
    let started = match addr {
        SocketAddr::V4(a) => nix_connect(fd.as_raw_fd(), &SockaddrIn::from(*a)),
        SocketAddr::V6(a) => nix_connect(fd.as_raw_fd(), &SockaddrIn6::from(*a)),
    };
    match started {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let stream = TcpStream::from(fd);
    // Writable means connected or failed; SO_ERROR tells which.
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: pfd is a valid pollfd for the duration of the call and nfds is 1.
    let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
    if ready < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if ready == 0 {
        return Err(std::io::Error::new(
            ErrorKind::TimedOut,
            "connect timed out",
        ));
    }
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// The wildcard address of the server's family.
pub(crate) fn any_addr(server: &SocketAddr) -> IpAddr {
    if server.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    }
}

/// Sends `payload` on a connected UDP socket up to `attempts` times, spread evenly over
/// `timeout`, and returns the first reply `accept` takes. An ICMP "port unreachable" (the server
/// is not up yet) does not end an attempt early, so the whole `timeout` is really waited.
pub(crate) fn udp_ask(
    socket: &UdpSocket,
    payload: &[u8],
    timeout: Duration,
    attempts: u32,
    accept: impl Fn(&[u8]) -> bool,
) -> anyhow::Result<Option<Vec<u8>>> {
    let started = Instant::now();
    let mut buf = [0u8; 2048];
    for k in 1..=attempts {
        let attempt_end = started + timeout * k / attempts;
        // A send can fail transiently (an ICMP error from an earlier datagram); the next
        // attempt retries.
        let _ = socket.send(payload);
        loop {
            let left = attempt_end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            socket.set_read_timeout(Some(left))?;
            match socket.recv(&mut buf) {
                Ok(n) if accept(&buf[..n]) => return Ok(Some(buf[..n].to_vec())),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    thread::sleep(left.min(Duration::from_millis(20)));
                }
                Err(e) => return Err(e).context("receiving the answer"),
            }
        }
    }
    Ok(None)
}
