//! `udp-peer`: one UDP socket on a fixed local address and port that both sends and listens,
//! as a peer-to-peer application does (hole punching, a game console behind the NAT): every
//! `--interval-ms` it sends `from <local>` to each `--send-to` address (at most `--sends`
//! rounds), and it records every datagram it receives with its source until `--seconds` pass;
//! with `--answer` it answers each with `answer from <local> to <source>` (a service).
//! Prints JSON {local, sent, received: [{from, payload}]}.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::Serialize;

use crate::MAX_CLIENT_SECONDS;

/// Most datagrams recorded; later ones are only counted.
const MAX_RECORDED: usize = 1000;

#[derive(Serialize)]
struct Received {
    from: String,
    payload: String,
}

#[derive(Serialize)]
struct Summary {
    local: String,
    sent: u32,
    received: Vec<Received>,
    dropped_records: u64,
}

pub(crate) fn udp_peer(
    bind: SocketAddr,
    send_to: &[SocketAddr],
    sends: u32,
    interval: Duration,
    seconds: f64,
    answer: bool,
) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
    let local = socket.local_addr()?;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds.clamp(0.1, MAX_CLIENT_SECONDS));
    let interval = interval.max(Duration::from_millis(10));
    let mut summary = Summary {
        local: local.to_string(),
        sent: 0,
        received: Vec::new(),
        dropped_records: 0,
    };
    let mut rounds = 0u32;
    let mut next_send = Instant::now();
    let mut buf = [0u8; 2048];
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if rounds < sends && now >= next_send {
            for target in send_to {
                // A refused or unreachable target (ICMP) must not end the peer: it keeps trying.
                if socket
                    .send_to(format!("from {local}").as_bytes(), target)
                    .is_ok()
                {
                    summary.sent += 1;
                }
            }
            rounds += 1;
            next_send = now + interval;
        }
        let wake = if rounds < sends {
            next_send.min(deadline)
        } else {
            deadline
        };
        let wait = wake
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        socket.set_read_timeout(Some(wait))?;
        // Timeouts, and ICMP errors reported on the socket, just go on until the deadline.
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            if answer {
                let _ = socket.send_to(format!("answer from {local} to {from}").as_bytes(), from);
            }
            if summary.received.len() < MAX_RECORDED {
                summary.received.push(Received {
                    from: from.to_string(),
                    payload: String::from_utf8_lossy(&buf[..n]).into_owned(),
                });
            } else {
                summary.dropped_records += 1;
            }
        }
    }
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
