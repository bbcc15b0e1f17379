//! Probes that really leave by one uplink: every socket is bound to the uplink's source address,
//! so the `from <source>` rule sends it through the uplink's table and nowhere else.
//!
//! ICMP echo uses one raw socket per uplink (bound to the source, it only sees replies to that
//! address); identifiers stay below the NAT port range so a reply never looks like a translated
//! flow's. TCP probes connect from an ephemeral port (also outside the NAT range); a refusal
//! counts as an answer, since the RST came back over the line.

use std::{
    collections::HashMap,
    io,
    mem::MaybeUninit,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{io::unix::AsyncFd, net::TcpSocket, sync::oneshot};

use crate::packet::internet_checksum;

/// ICMP echo identifiers start here (plus the uplink id): below the default NAT range, so the
/// data plane never takes a probe reply for a translated flow's.
const ECHO_ID_BASE: u16 = 40_000;

/// Sends ICMP echo requests out of one uplink and matches the replies.
pub struct EchoProber {
    socket: Arc<AsyncFd<Socket>>,
    id: u16,
    next_sequence: Mutex<u16>,
    waiting: Arc<Mutex<HashMap<u16, oneshot::Sender<Instant>>>>,
}

impl EchoProber {
    pub fn new(uplink_id: u32, source: Ipv4Addr) -> io::Result<EchoProber> {
        let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
        socket.set_nonblocking(true)?;
        socket.bind(&SocketAddr::from(SocketAddrV4::new(source, 0)).into())?;
        // SAFETY: the AsyncFd owns the socket, so its descriptor stays open and the same for
        // the AsyncFd's whole life.
        let socket =
            Arc::new(unsafe { AsyncFd::register(socket) }.map_err(|error| error.into_parts().1)?);
        let waiting: Arc<Mutex<HashMap<u16, oneshot::Sender<Instant>>>> = Arc::default();
        let id = ECHO_ID_BASE.wrapping_add(uplink_id as u16);
        tokio::spawn(receive_replies(socket.clone(), id, waiting.clone()));
        Ok(EchoProber {
            socket,
            id,
            next_sequence: Mutex::new(0),
            waiting,
        })
    }

    /// One echo to `target`; the round-trip time, or None if no reply came within `timeout`.
    pub async fn probe(&self, target: Ipv4Addr, timeout: Duration) -> Option<Duration> {
        let sequence = {
            let mut next = self.next_sequence.lock().ok()?;
            *next = next.wrapping_add(1);
            *next
        };
        let (sender, receiver) = oneshot::channel();
        self.waiting.lock().ok()?.insert(sequence, sender);
        let packet = echo_request(self.id, sequence);
        let sent = Instant::now();
        let destination: socket2::SockAddr = SocketAddr::from(SocketAddrV4::new(target, 0)).into();
        let result = loop {
            let Ok(mut guard) = self.socket.writable().await else {
                break None;
            };
            match guard.try_io(|inner| inner.get_ref().send_to(&packet, &destination)) {
                Ok(Ok(_)) => {
                    break tokio::time::timeout(timeout, receiver)
                        .await
                        .ok()
                        .and_then(Result::ok);
                }
                Ok(Err(_)) => break None,
                Err(_would_block) => continue,
            }
        };
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.remove(&sequence);
        }
        result.map(|answered| answered.saturating_duration_since(sent))
    }
}

async fn receive_replies(
    socket: Arc<AsyncFd<Socket>>,
    id: u16,
    waiting: Arc<Mutex<HashMap<u16, oneshot::Sender<Instant>>>>,
) {
    let mut buffer = [MaybeUninit::<u8>::uninit(); 1500];
    loop {
        let Ok(mut guard) = socket.readable().await else {
            return;
        };
        let received = guard.try_io(|inner| inner.get_ref().recv(&mut buffer));
        let length = match received {
            Ok(Ok(length)) => length,
            Ok(Err(_)) | Err(_) => continue,
        };
        let now = Instant::now();
        // SAFETY: recv initialised the first `length` bytes.
        let packet: Vec<u8> = buffer[..length]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        if let Some(sequence) = echo_reply_sequence(&packet, id)
            && let Ok(mut waiting) = waiting.lock()
            && let Some(sender) = waiting.remove(&sequence)
        {
            let _ = sender.send(now);
        }
    }
}

/// An ICMP echo request with an 8-byte payload.
fn echo_request(id: u16, sequence: u16) -> Vec<u8> {
    let mut packet = vec![8, 0, 0, 0];
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&sequence.to_be_bytes());
    packet.extend_from_slice(b"balancer");
    let checksum = internet_checksum(&packet);
    packet[2..4].copy_from_slice(&checksum.to_be_bytes());
    packet
}

/// The sequence number of an echo reply with our identifier, from a raw IPv4 packet.
fn echo_reply_sequence(packet: &[u8], id: u16) -> Option<u16> {
    let header = usize::from(packet.first()? & 0x0f) * 4;
    let icmp = packet.get(header..header + 8)?;
    let reply_id = u16::from_be_bytes([icmp[4], icmp[5]]);
    (icmp[0] == 0 && reply_id == id).then(|| u16::from_be_bytes([icmp[6], icmp[7]]))
}

/// A TCP connect from `source` to `target`; the time it took, or None on timeout or if the
/// line gave no answer (a refusal is an answer).
pub async fn tcp_probe(
    source: Ipv4Addr,
    target: SocketAddrV4,
    timeout: Duration,
) -> Option<Duration> {
    let socket = TcpSocket::new_v4().ok()?;
    socket
        .bind(SocketAddr::from(SocketAddrV4::new(source, 0)))
        .ok()?;
    let started = Instant::now();
    match tokio::time::timeout(timeout, socket.connect(SocketAddr::from(target))).await {
        Ok(Ok(_)) => Some(started.elapsed()),
        Ok(Err(error)) if error.kind() == io::ErrorKind::ConnectionRefused => {
            Some(started.elapsed())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_packets_have_a_valid_checksum_and_replies_are_matched_by_id() {
        let request = echo_request(40_001, 7);
        assert_eq!(
            internet_checksum(&request),
            0,
            "a correct checksum sums to zero"
        );
        let mut reply = vec![0x45u8; 20];
        reply.extend_from_slice(&request);
        reply[20] = 0; // echo reply
        assert_eq!(echo_reply_sequence(&reply, 40_001), Some(7));
        assert_eq!(
            echo_reply_sequence(&reply, 40_002),
            None,
            "another uplink's identifier"
        );
        reply[20] = 8;
        assert_eq!(
            echo_reply_sequence(&reply, 40_001),
            None,
            "a request is not a reply"
        );
        assert_eq!(echo_reply_sequence(&reply[..24], 40_001), None, "truncated");
    }
}
