//! `raw-send`: packets no ordinary socket sends, for the tests of traffic the data plane must
//! not translate: another IP protocol or a stray TCP segment (a raw IPv4 socket; the kernel
//! writes the IP header with the host's own source), an unsolicited UDP datagram from a port of
//! our choosing, or a DHCP-like broadcast from 0.0.0.0
//! (a whole Ethernet frame on a packet socket, as a DHCP client sends before it has an address).

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    thread,
    time::Duration,
};

use anyhow::{Context, bail};

/// What to send.
pub(crate) enum RawKind {
    /// An IPv4 packet of this protocol with a few zero bytes of payload.
    Protocol(u8),
    /// A TCP segment with ACK set from `src_port` to `dst_port`, of no connection.
    StrayTcp { src_port: u16, dst_port: u16 },
    /// An unsolicited UDP datagram from `src` (the route's choice if unspecified) and
    /// `src_port` to `dst_port` (checksum 0, "none"), sent even while a socket of this host
    /// holds `src_port`: what a spoofer sends.
    UdpFrom {
        src: Ipv4Addr,
        src_port: u16,
        dst_port: u16,
    },
    /// UDP 0.0.0.0:68 -> 255.255.255.255:67 in a broadcast Ethernet frame on `interface`.
    DhcpBroadcast { interface: String },
}

const GAP: Duration = Duration::from_millis(2);

pub(crate) fn raw_send(kind: &RawKind, dst: Ipv4Addr, count: u32) -> anyhow::Result<()> {
    match kind {
        RawKind::Protocol(protocol) => {
            let socket = ip_socket(i32::from(*protocol))?;
            for _ in 0..count {
                send_ip(&socket, dst, &[0u8; 16])?;
                thread::sleep(GAP);
            }
        }
        RawKind::StrayTcp { src_port, dst_port } => {
            let socket = ip_socket(libc::IPPROTO_TCP)?;
            let mut segment = [0u8; 20];
            segment[0..2].copy_from_slice(&src_port.to_be_bytes());
            segment[2..4].copy_from_slice(&dst_port.to_be_bytes());
            segment[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
            segment[8..12].copy_from_slice(&0x0bad_cafeu32.to_be_bytes());
            segment[12] = 5 << 4;
            segment[13] = 0x10; // ACK
            segment[14..16].copy_from_slice(&64_240u16.to_be_bytes());
            for _ in 0..count {
                send_ip(&socket, dst, &segment)?;
                thread::sleep(GAP);
            }
        }
        RawKind::UdpFrom {
            src,
            src_port,
            dst_port,
        } => {
            let socket = ip_socket(libc::IPPROTO_UDP)?;
            bind_ip(&socket, *src)?;
            let mut datagram = [0u8; 12];
            datagram[0..2].copy_from_slice(&src_port.to_be_bytes());
            datagram[2..4].copy_from_slice(&dst_port.to_be_bytes());
            datagram[4..6].copy_from_slice(&12u16.to_be_bytes());
            datagram[8..12].copy_from_slice(b"spof");
            for _ in 0..count {
                send_ip(&socket, dst, &datagram)?;
                thread::sleep(GAP);
            }
        }
        RawKind::DhcpBroadcast { interface } => {
            let frame = dhcp_frame(interface)?;
            let socket = packet_socket()?;
            let index = nix::net::if_::if_nametoindex(interface.as_str())
                .with_context(|| format!("no interface {interface}"))?;
            for _ in 0..count {
                send_frame(&socket, index, &frame)?;
                thread::sleep(GAP);
            }
        }
    }
    println!("sent {count}");
    Ok(())
}

fn ip_socket(protocol: i32) -> anyhow::Result<OwnedFd> {
    // SAFETY: a plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("opening a raw IPv4 socket (needs root)");
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes the kernel write `src` as the source of what `socket` sends.
fn bind_ip(socket: &OwnedFd, src: Ipv4Addr) -> anyhow::Result<()> {
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(src).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `address` is valid for the length given.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const address).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if bound < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("binding to {src}"));
    }
    Ok(())
}

fn send_ip(socket: &OwnedFd, dst: Ipv4Addr, payload: &[u8]) -> anyhow::Result<()> {
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `payload` and `address` are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            0,
            (&raw const address).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("sending to {dst}"));
    }
    Ok(())
}

fn packet_socket() -> anyhow::Result<OwnedFd> {
    // SAFETY: a plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from((libc::ETH_P_IP as u16).to_be()),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("opening a packet socket (needs root)");
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send_frame(socket: &OwnedFd, ifindex: u32, frame: &[u8]) -> anyhow::Result<()> {
    // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    address.sll_ifindex = ifindex as i32;
    address.sll_halen = 6;
    address.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: `frame` and `address` are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const address).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error()).context("sending a frame");
    }
    Ok(())
}

/// Ethernet broadcast, IPv4 0.0.0.0 -> 255.255.255.255, UDP 68 -> 67, a few payload bytes.
fn dhcp_frame(interface: &str) -> anyhow::Result<Vec<u8>> {
    let mac_text = std::fs::read_to_string(format!("/sys/class/net/{interface}/address"))
        .with_context(|| format!("reading the MAC address of {interface}"))?;
    let mac: Vec<u8> = mac_text
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing MAC {mac_text:?}"))?;
    if mac.len() != 6 {
        bail!("MAC {mac_text:?} is not 6 bytes");
    }
    let payload = [1u8, 1, 6, 0, 0x39, 0x03, 0xf3, 0x26];
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut frame = Vec::with_capacity(14 + total);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[16..20].copy_from_slice(&[255; 4]);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&68u16.to_be_bytes());
    frame.extend_from_slice(&67u16.to_be_bytes());
    frame.extend_from_slice(&(udp_len as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]); // no UDP checksum
    frame.extend_from_slice(&payload);
    Ok(frame)
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
