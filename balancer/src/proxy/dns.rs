//! A small DNS client: A queries over UDP from an uplink's source address to that uplink's
//! resolvers, so a request's name lookup leaves by the same uplink as the request itself (an
//! ISP's resolver answers only its own customers, and CDNs answer by the asking address).

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use simple_dns::{CLASS, Packet, PacketFlag, QCLASS, QTYPE, Question, RCODE, TYPE, rdata::RData};
use tokio::net::UdpSocket;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("{name:?} is not a valid DNS name")]
    BadName { name: String },
    #[error(
        "uplink {uplink} has no resolvers (set uplink.dns, or nameservers in /etc/resolv.conf)"
    )]
    NoResolvers { uplink: String },
    #[error("querying {server} from {source_address}")]
    Io {
        server: Ipv4Addr,
        source_address: Ipv4Addr,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from {servers:?} within {timeout:?}")]
    Timeout {
        servers: Vec<Ipv4Addr>,
        timeout: Duration,
    },
    #[error("{name} does not resolve ({rcode})")]
    NoAddress { name: String, rcode: String },
}

/// The resolvers to use for an uplink: its own, else the system's (`/etc/resolv.conf`), which
/// are still queried from the uplink's address.
pub fn resolvers(configured: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
    if !configured.is_empty() {
        return configured.to_vec();
    }
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|text| system_resolvers(&text))
        .unwrap_or_default()
}

fn system_resolvers(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<Ipv4Addr>().ok())
        // A local stub (127.0.0.53) would answer from the gateway's default uplink, not ours.
        .filter(|address| !address.is_loopback())
        .collect()
}

/// The IPv4 addresses of `name`, asked from `source` of each resolver in turn, and how long
/// the answer may be kept (the smallest TTL in it).
pub async fn resolve(
    name: &str,
    source: Ipv4Addr,
    servers: &[Ipv4Addr],
    timeout: Duration,
    uplink: &str,
) -> Result<(Vec<Ipv4Addr>, Duration), DnsError> {
    if servers.is_empty() {
        return Err(DnsError::NoResolvers {
            uplink: uplink.to_string(),
        });
    }
    let query_id: u16 = rand_id();
    let query = build_query(name, query_id)?;
    let mut last = None;
    for &server in servers {
        match tokio::time::timeout(timeout, ask(&query, query_id, name, source, server)).await {
            Ok(Ok(addresses)) => return Ok(addresses),
            Ok(Err(error)) => last = Some(error),
            Err(_) => {}
        }
    }
    Err(last.unwrap_or(DnsError::Timeout {
        servers: servers.to_vec(),
        timeout,
    }))
}

fn build_query(name: &str, id: u16) -> Result<Vec<u8>, DnsError> {
    let bad = || DnsError::BadName {
        name: name.to_string(),
    };
    let mut packet = Packet::new_query(id);
    packet.set_flags(PacketFlag::RECURSION_DESIRED);
    let qname = simple_dns::Name::new(name).map_err(|_| bad())?;
    packet.questions.push(Question::new(
        qname,
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    packet.build_bytes_vec().map_err(|_| bad())
}

async fn ask(
    query: &[u8],
    id: u16,
    name: &str,
    source: Ipv4Addr,
    server: Ipv4Addr,
) -> Result<(Vec<Ipv4Addr>, Duration), DnsError> {
    let io = |source_error| DnsError::Io {
        server,
        source_address: source,
        source: source_error,
    };
    // Bound to the uplink's address: the `from <source>` rule carries the query out of it.
    let socket = UdpSocket::bind(SocketAddrV4::new(source, 0))
        .await
        .map_err(io)?;
    let server_address = SocketAddr::V4(SocketAddrV4::new(server, 53));
    socket.connect(server_address).await.map_err(io)?;
    socket.send(query).await.map_err(io)?;
    let mut buffer = vec![0u8; 1500];
    loop {
        let n = socket.recv(&mut buffer).await.map_err(io)?;
        // Anything that does not parse or is not our answer is ignored (spoofing, late replies).
        let Some(reply) = buffer.get(..n).and_then(|b| Packet::parse(b).ok()) else {
            continue;
        };
        if reply.id() != id || !reply.has_flags(PacketFlag::RESPONSE) {
            continue;
        }
        let addresses: Vec<Ipv4Addr> = reply
            .answers
            .iter()
            .filter_map(|record| match &record.rdata {
                RData::A(a) => Some(Ipv4Addr::from(a.address)),
                _ => None,
            })
            .collect();
        if addresses.is_empty() {
            let rcode = reply.rcode();
            let shown = if rcode == RCODE::NoError {
                "no A record".to_string()
            } else {
                format!("{rcode:?}")
            };
            return Err(DnsError::NoAddress {
                name: name.to_string(),
                rcode: shown,
            });
        }
        let ttl = reply
            .answers
            .iter()
            .map(|record| record.ttl)
            .min()
            .unwrap_or(0);
        return Ok((addresses, Duration::from_secs(u64::from(ttl))));
    }
}

/// A query id that an off-path attacker cannot guess cheaply; the source port is random too.
fn rand_id() -> u16 {
    let mut bytes = [0u8; 2];
    if getrandom(&mut bytes) {
        u16::from_ne_bytes(bytes)
    } else {
        // The clock's low bits still vary per query.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u16)
    }
}

fn getrandom(buffer: &mut [u8]) -> bool {
    // SAFETY: the pointer and length describe `buffer`, which outlives the call.
    let n = unsafe { libc::getrandom(buffer.as_mut_ptr().cast(), buffer.len(), 0) };
    usize::try_from(n).is_ok_and(|n| n == buffer.len())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn system_resolvers_skip_loopback_and_v6() {
        let text =
            "# x\nnameserver 127.0.0.53\nnameserver 192.0.2.53\nnameserver ::1\nsearch lan\n";
        assert_eq!(system_resolvers(text), vec![Ipv4Addr::new(192, 0, 2, 53)]);
    }

    #[test]
    fn query_is_an_a_question_with_recursion() {
        let bytes = build_query("www.lab.example", 0x1234).unwrap();
        let packet = Packet::parse(&bytes).unwrap();
        assert_eq!(packet.id(), 0x1234);
        assert!(packet.has_flags(PacketFlag::RECURSION_DESIRED));
        assert_eq!(packet.questions[0].qname.to_string(), "www.lab.example");
        assert!(
            build_query(&"x".repeat(64), 1).is_err(),
            "labels are at most 63 bytes"
        );
    }
}
