//! `ping`: ICMP echo over a raw socket, one request at a time, with the source of each reply.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::Serialize;

#[derive(Serialize)]
struct PingSummary {
    sent: u32,
    received: u32,
    /// Source addresses of the replies, with counts.
    sources: BTreeMap<String, u32>,
    max_rtt_ms: f64,
}

/// ICMP echo over a raw socket: one request at a time, each waiting up to `timeout` for the
/// reply with our identifier and its sequence number.
pub(crate) fn ping(
    addr: Ipv4Addr,
    count: u32,
    timeout: Duration,
    interval: Duration,
    id: u16,
    size: usize,
) -> anyhow::Result<()> {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, recvfrom, sendto,
        setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd;

    let fd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Icmp,
    )
    .context("opening a raw ICMP socket (needs root)")?;
    let dest = SockaddrIn::from(SocketAddrV4::new(addr, 0));
    let mut summary = PingSummary {
        sent: 0,
        received: 0,
        sources: BTreeMap::new(),
        max_rtt_ms: 0.0,
    };
    // Room for a reply larger than one frame (the kernel hands over reassembled datagrams).
    let mut buf = vec![0u8; 65_536];
    for k in 1..=count {
        let seq = (k & 0xffff) as u16;
        let request = echo_request(id, seq, size);
        let sent_at = Instant::now();
        sendto(fd.as_raw_fd(), &request, &dest, MsgFlags::empty())
            .with_context(|| format!("sending echo request {seq} to {addr}"))?;
        summary.sent += 1;
        let deadline = sent_at + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                println!("no reply from {addr}: id={id} seq={seq} within {timeout:?}");
                break;
            }
            setsockopt(
                &fd,
                sockopt::ReceiveTimeout,
                &nix::sys::time::TimeVal::from(libc::timeval {
                    tv_sec: libc::time_t::try_from(left.as_secs()).unwrap_or(60),
                    tv_usec: libc::suseconds_t::from(left.subsec_micros().max(1)),
                }),
            )?;
            let n = match recvfrom::<SockaddrIn>(fd.as_raw_fd(), &mut buf) {
                Ok((n, _)) => n,
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e).context("receiving ICMP"),
            };
            // A raw socket hands over the IP header too.
            let packet = &buf[..n];
            let ihl = usize::from(packet.first().map_or(0, |b| b & 0x0f)) * 4;
            let (Some(ip), Some(icmp)) = (packet.get(..20), packet.get(ihl..)) else {
                continue;
            };
            if ihl < 20 || icmp.len() < 8 {
                continue;
            }
            let reply_id = u16::from_be_bytes([icmp[4], icmp[5]]);
            let reply_seq = u16::from_be_bytes([icmp[6], icmp[7]]);
            if icmp[0] != 0 || reply_id != id || reply_seq != seq {
                continue; // not our echo reply (our own request, another ping, an error)
            }
            let source = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let rtt_ms = sent_at.elapsed().as_secs_f64() * 1e3;
            println!("reply from {source}: id={id} seq={seq} time={rtt_ms:.2} ms");
            summary.received += 1;
            summary.max_rtt_ms = summary.max_rtt_ms.max(rtt_ms);
            *summary.sources.entry(source.to_string()).or_default() += 1;
            break;
        }
        if k < count {
            thread::sleep(interval);
        }
    }
    println!("{}", serde_json::to_string(&summary)?);
    if summary.received < summary.sent {
        bail!(
            "{} of {} echo requests to {addr} were not answered",
            summary.sent - summary.received,
            summary.sent
        );
    }
    Ok(())
}

/// An ICMP echo request with `size` bytes of payload and a valid checksum.
fn echo_request(id: u16, seq: u16, size: usize) -> Vec<u8> {
    let mut packet = vec![8u8, 0, 0, 0];
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend((0..size).map(|b| (b as u8).wrapping_add(0x20)));
    let sum = internet_checksum(&packet);
    packet[2..4].copy_from_slice(&sum.to_be_bytes());
    packet
}

/// RFC 1071: the one's complement of the one's complement sum of 16-bit words.
fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
