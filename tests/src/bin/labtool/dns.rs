//! `dns`: one A query over UDP and the IPv4 addresses of the answer.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::{Context, bail};

use crate::net::{any_addr, udp_ask};

/// One A query over UDP; returns the answer section's IPv4 addresses.
pub(crate) fn dns_query(
    server: SocketAddr,
    bind: Option<IpAddr>,
    name: &str,
    timeout: Duration,
    attempts: u32,
) -> anyhow::Result<Vec<Ipv4Addr>> {
    let id: u16 = (std::process::id() as u16) ^ 0x5a5a;
    let mut query = Vec::with_capacity(64);
    query.extend_from_slice(&id.to_be_bytes());
    query.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, one question
    for label in name.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|l| (1..64).contains(l))
            .context("bad DNS label")?;
        query.push(len);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    let socket = UdpSocket::bind(SocketAddr::new(bind.unwrap_or(any_addr(&server)), 0))
        .context("binding the DNS client socket")?;
    socket.connect(server)?;
    let reply = udp_ask(&socket, &query, timeout, attempts, |r| {
        r.len() >= 12 && r[..2] == id.to_be_bytes()
    })?;
    if let Some(reply) = reply {
        return parse_a_records(&reply);
    }
    bail!("no DNS answer from {server} within {timeout:?}")
}

fn parse_a_records(reply: &[u8]) -> anyhow::Result<Vec<Ipv4Addr>> {
    let rcode = reply[3] & 0x0f;
    if rcode != 0 {
        bail!("DNS rcode {rcode}");
    }
    let qd = u16::from_be_bytes([reply[4], reply[5]]);
    let an = u16::from_be_bytes([reply[6], reply[7]]);
    let mut at = 12;
    let skip_name = |mut at: usize| -> anyhow::Result<usize> {
        loop {
            let len = *reply.get(at).context("truncated name")?;
            if len & 0xc0 == 0xc0 {
                return Ok(at + 2);
            }
            if len == 0 {
                return Ok(at + 1);
            }
            at += 1 + usize::from(len);
        }
    };
    for _ in 0..qd {
        at = skip_name(at)? + 4;
    }
    let mut addrs = Vec::new();
    for _ in 0..an {
        at = skip_name(at)?;
        let fixed = reply.get(at..at + 10).context("truncated record")?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let data = reply
            .get(at + 10..at + 10 + rdlen)
            .context("truncated record data")?;
        if rtype == 1 && rdlen == 4 {
            addrs.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 10 + rdlen;
    }
    Ok(addrs)
}
