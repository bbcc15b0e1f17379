//! Issue 12 items 6 and 7 in the lab: a tunnel on an uplink that dies silently is closed within
//! 2.5 s (the proxy follows the transparent flows' reset), a 300 ms carrier blip closes none,
//! one whose uplink is renumbered is closed at once,
//! and a 15 s flood of requests through the proxy leaves every uplink's health unchanged (the
//! proxy runs on worker threads of its own).
//!
//! Root only. Each test builds its own lab (prefix `bal-pxu?<pid>`) with health probes to the
//! internet host; dropping the fixture stops the daemon, runs `balancer down` and removes the lab.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[allow(dead_code)]
#[path = "proxy/support.rs"]
mod support;

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use support::*;

/// A CONNECT tunnel from client 1 to the whoami server: the stream and the uplink (1-based)
/// whose address the server saw.
fn open_tunnel(gw: &ProxyLab) -> (TcpStream, usize) {
    let (stream, answer) = in_namespace(&gw.lab.client(1), || {
        let mut stream = TcpStream::connect("198.18.0.1:3128").unwrap();
        stream
            .write_all(b"CONNECT 198.18.9.1:9000 HTTP/1.1\r\nHost: 198.18.9.1:9000\r\n\r\n")
            .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut answer = Vec::new();
        let mut buffer = [0u8; 512];
        // The 200 head, then the whoami line the server sends first.
        loop {
            let text = String::from_utf8_lossy(&answer).into_owned();
            if text
                .split_once("\r\n\r\n")
                .is_some_and(|(_, body)| body.ends_with('\n'))
            {
                break;
            }
            let n = stream.read(&mut buffer).unwrap();
            assert!(n > 0, "tunnel closed early: {text:?}");
            answer.extend_from_slice(&buffer[..n]);
        }
        (stream, String::from_utf8_lossy(&answer).into_owned())
    });
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let peer: SocketAddrV4 = answer
        .rsplit("\r\n\r\n")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let uplink = gw.uplink_of(*peer.ip());
    (stream, uplink)
}

#[test]
fn tunnels_close_when_their_uplink_dies_but_not_on_a_carrier_blip() {
    let gw = ProxyLab::up_tracked(
        "pxu",
        "listen = \"198.18.0.1:3128\"\nconnect_ports = [9000]",
    );
    let lab = &gw.lab;

    // A 300 ms carrier blip on the tunnel's uplink closes nothing.
    let (mut blipped, blip_uplink) = open_tunnel(&gw);
    lab.exec_ok(
        &lab.isp(blip_uplink),
        &["ip", "link", "set", "down0", "down"],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    lab.exec_ok(&lab.isp(blip_uplink), &["ip", "link", "set", "down0", "up"])
        .unwrap();
    let (_, closed) = read_until_closed(&mut blipped, Duration::from_secs(3));
    assert!(
        !closed,
        "a 300 ms blip closed the tunnel on uplink {blip_uplink}\n{}",
        gw.log()
    );

    // Another tunnel; its uplink then dies silently (carrier up, everything dropped).
    let (mut doomed, dead) = open_tunnel(&gw);
    let cut = Instant::now();
    for (priority, iif) in [("50", "down0"), ("51", "up0")] {
        lab.exec_ok(
            &lab.isp(dead),
            &[
                "ip",
                "rule",
                "add",
                "priority",
                priority,
                "iif",
                iif,
                "blackhole",
            ],
        )
        .unwrap();
    }
    let (_, closed) = read_until_closed(&mut doomed, Duration::from_secs(5));
    let after = cut.elapsed();
    eprintln!("tunnel on dead uplink {dead} closed after {after:?}");
    assert!(
        closed,
        "the tunnel on dead uplink {dead} was not closed\n{}",
        gw.log()
    );
    assert!(
        after <= Duration::from_millis(2500),
        "closed {after:?} after the cut"
    );
    // The blipped tunnel, on a live uplink, is still open (unless it was the same uplink).
    if blip_uplink != dead {
        let (_, closed) = read_until_closed(&mut blipped, Duration::from_millis(200));
        assert!(
            !closed,
            "the tunnel on live uplink {blip_uplink} was closed too"
        );
    }

    // An uplink renumbered (a new lease, an LTE reconnect): its old address can carry nothing
    // any more, so what runs on it is closed at once.
    let (mut renumbered, uplink) = open_tunnel(&gw);
    assert_ne!(uplink, dead, "new tunnels avoid the dead uplink");
    let interface = lab.uplink_interface(uplink);
    let old = format!("{}/24", lab.uplink_source(uplink));
    let new = format!("198.18.{uplink}.77/24");
    let cut = Instant::now();
    // Removed first: deleting a primary address takes its secondaries with it.
    lab.exec_ok(&lab.gw(), &["ip", "addr", "del", &old, "dev", &interface])
        .unwrap();
    lab.exec_ok(&lab.gw(), &["ip", "addr", "add", &new, "dev", &interface])
        .unwrap();
    let (_, closed) = read_until_closed(&mut renumbered, Duration::from_secs(3));
    let after = cut.elapsed();
    eprintln!("tunnel on uplink {uplink} closed {after:?} after it was renumbered");
    assert!(
        closed,
        "the tunnel outlived its uplink's address\n{}",
        gw.log()
    );
    assert!(
        after <= Duration::from_millis(500),
        "closed {after:?} after the renumbering"
    );
}

#[test]
fn a_request_flood_leaves_every_uplinks_health_unchanged() {
    let gw = ProxyLab::up_tracked("pxv", "listen = \"198.18.0.1:3128\"");
    let before: Vec<u64> = (1..=3)
        .map(|i| gw.health(i)["transitions"].as_u64().unwrap_or(0))
        .collect();
    let stop = AtomicBool::new(false);
    let served = AtomicU64::new(0);
    let flood = Duration::from_secs(15);
    let mut states = Vec::new();
    std::thread::scope(|scope| {
        for worker in 0..8 {
            let (stop, served) = (&stop, &served);
            let ns = gw.lab.client(1 + worker % 2);
            scope.spawn(move || {
                in_namespace(&ns, || {
                    let request =
                        b"GET http://198.18.9.1:8080/ HTTP/1.1\r\nHost: 198.18.9.1:8080\r\n\r\n";
                    let mut buffer = [0u8; 4096];
                    while !stop.load(Ordering::Relaxed) {
                        // Keep-alive as long as the proxy keeps the connection.
                        let Ok(mut stream) = TcpStream::connect("198.18.0.1:3128") else {
                            continue;
                        };
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                        while !stop.load(Ordering::Relaxed) {
                            if stream.write_all(request).is_err() {
                                break;
                            }
                            match stream.read(&mut buffer) {
                                Ok(n) if n > 0 => served.fetch_add(1, Ordering::Relaxed),
                                _ => break,
                            };
                        }
                    }
                })
            });
        }
        let started = Instant::now();
        while started.elapsed() < flood {
            states.push(
                (1..=3)
                    .map(|i| gw.health(i)["state"].clone())
                    .collect::<Vec<_>>(),
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let served = served.load(Ordering::Relaxed);
    eprintln!(
        "flood: {served} responses in {flood:?} ({:.0}/s)",
        served as f64 / flood.as_secs_f64()
    );
    assert!(served > 1000, "the flood did not flood: {served} responses");
    let after: Vec<u64> = (1..=3)
        .map(|i| gw.health(i)["transitions"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(
        before,
        after,
        "health transitions during the flood\n{}",
        gw.log()
    );
    assert!(
        states.iter().flatten().all(|state| state == "up"),
        "every uplink stayed up: {states:?}"
    );
}
