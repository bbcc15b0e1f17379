//! Issue 12 items 1 and 2: outsiders cost nothing, and the proxy is no way around the office's
//! firewall. A stranger on the LAN wire (an address outside `[lan] networks`) is closed at
//! accept without an HTTP answer, so 1,100 of its connections do not delay a LAN client; the LAN
//! address reached from the uplink side is not served; a LAN host, an uplink's subnet and port
//! 25 are refused, and `proxy.allow` opens one; a client over `max_client_connections` is
//! closed at accept.
//!
//! Root only. Each test builds its own lab (prefix `bal-pxg?<pid>`); dropping the fixture stops
//! the daemon, runs `balancer down` and removes the lab.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[allow(dead_code)]
#[path = "proxy/support.rs"]
mod support;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use support::*;

const WHOAMI_URL: &str = "http://198.18.9.1:8080/";
/// An address on the LAN wire but outside the configured LAN network (198.18.0.0/25).
const STRANGER: &str = "198.18.0.200";
const STRANGER_CONNECTIONS: usize = 1_100;

/// The median of `n` timings of a LAN client's request through the proxy.
fn median_request_seconds(gw: &ProxyLab, n: usize) -> f64 {
    let mut times: Vec<f64> = (0..n)
        .map(|_| {
            let curl = gw.curl(1, &[WHOAMI_URL]);
            assert_eq!(curl.code, 200, "{curl:?}\n{}", gw.log());
            curl.seconds
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[n / 2]
}

#[test]
fn strangers_and_the_uplink_side_are_closed_without_an_answer() {
    let gw = ProxyLab::up_with_lan("pxg", "listen = \"198.18.0.1:3128\"", "\"198.18.0.0/25\"");
    let lab = &gw.lab;
    let baseline = median_request_seconds(&gw, 5);

    // The stranger sits on client 2's wire with an address outside 198.18.0.0/25.
    lab.exec_ok(
        &lab.client(2),
        &[
            "ip",
            "addr",
            "add",
            &format!("{STRANGER}/24"),
            "dev",
            "eth0",
        ],
    )
    .unwrap();
    let (limit, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    if limit < 4096 {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 4096, 4096)
            .unwrap();
    }
    let held: Vec<TcpStream> = in_namespace(&lab.client(2), || {
        let source: SocketAddr = format!("{STRANGER}:0").parse().unwrap();
        (0..STRANGER_CONNECTIONS)
            .filter_map(|_| {
                let socket =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                        .ok()?;
                socket.bind(&source.into()).ok()?;
                let proxy: SocketAddr = "198.18.0.1:3128".parse().unwrap();
                socket
                    .connect_timeout(&proxy.into(), Duration::from_secs(2))
                    .ok()?;
                let mut stream: TcpStream = socket.into();
                let _ = stream.write_all(b"GET http://198.18.9.1:8080/ HTTP/1.1\r\nHost: x\r\n");
                Some(stream)
            })
            .collect()
    });
    assert!(
        held.len() >= STRANGER_CONNECTIONS * 9 / 10,
        "the stranger connected {} times",
        held.len()
    );

    // While the stranger holds them all, a LAN client is served as fast as before.
    let loaded = median_request_seconds(&gw, 5);
    eprintln!("LAN request: {baseline:.3}s alone, {loaded:.3}s beside the stranger");
    assert!(
        loaded <= baseline + 0.1,
        "delayed from {baseline:.3}s to {loaded:.3}s"
    );

    // Every stranger connection was closed by the proxy without a byte of HTTP.
    for mut stream in held.into_iter().step_by(100) {
        let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(2));
        assert!(closed && answer.is_empty(), "stranger got {answer:?}");
    }
    wait_until(Duration::from_secs(2), || {
        gw.status()["proxy"]["strangers"].as_u64().unwrap_or(0)
            >= (STRANGER_CONNECTIONS * 9 / 10) as u64
    });

    // The LAN address, reached from the uplink side (ISP 1's router, routed at the gateway),
    // finds nothing listening: the proxy's sockets are bound to the LAN interface.
    lab.exec_ok(
        &lab.isp(1),
        &[
            "ip",
            "route",
            "add",
            "198.18.0.0/24",
            "via",
            &lab.uplink_source(1).to_string(),
        ],
    )
    .unwrap();
    let from_uplink = in_namespace(&lab.isp(1), || {
        match TcpStream::connect_timeout(
            &"198.18.0.1:3128".parse().unwrap(),
            Duration::from_secs(2),
        ) {
            Err(error) => format!("not connected: {error}"),
            Ok(mut stream) => {
                let _ = stream.write_all(
                    b"GET http://198.18.9.1:8080/ HTTP/1.1\r\nHost: 198.18.9.1:8080\r\n\r\n",
                );
                let mut answer = Vec::new();
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = stream.read_to_end(&mut answer);
                String::from_utf8_lossy(&answer).into_owned()
            }
        }
    });
    assert!(
        !from_uplink.contains("HTTP/"),
        "served from the uplink side: {from_uplink:?}"
    );
    assert!(from_uplink.starts_with("not connected"), "{from_uplink:?}");
}

/// A page served by a LAN host (client 2) on port 8088, answering `lan-page`.
fn lan_page(gw: &ProxyLab) -> std::thread::JoinHandle<()> {
    let listener: TcpListener = in_namespace(&gw.lab.client(2), || {
        TcpListener::bind("198.18.0.12:8088").unwrap()
    });
    std::thread::spawn(move || {
        for stream in listener.incoming().take(8) {
            let Ok(mut stream) = stream else { return };
            let mut head = [0u8; 4096];
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.read(&mut head);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nlan-page\n",
            );
        }
    })
}

#[test]
fn office_networks_and_low_ports_are_refused_and_allow_opens_one() {
    let mut gw = ProxyLab::up("pxh", "listen = \"198.18.0.1:3128\"");
    let _page = lan_page(&gw);
    let modem = format!("http://{}:8080/", gw.lab.uplink_gateway(1));
    for url in ["http://198.18.0.12:8088/", modem.as_str()] {
        let refused = gw.curl(1, &[url]);
        assert_eq!(refused.code, 403, "{url}: {refused:?}\n{}", gw.log());
        assert!(
            refused.body.contains("proxy.allow")
                && refused.body.contains("http://198.18.0.1:3128/proxy.pac"),
            "{url}: the reason names proxy.allow and the PAC URL: {:?}",
            refused.body
        );
    }
    // Through a tunnel too.
    let (tunnel, _) = raw_exchange(
        &gw.lab.client(1),
        b"CONNECT 198.18.0.12:443 HTTP/1.1\r\nHost: 198.18.0.12:443\r\n\r\n",
        Duration::from_secs(3),
    );
    assert!(tunnel.starts_with("HTTP/1.1 403"), "{tunnel}");

    // Port 25 and other low ports: refused before any connection is tried.
    let started = Instant::now();
    let smtp = gw.curl(1, &["-d", "HELO x", "http://198.18.9.1:25/"]);
    assert_eq!(smtp.code, 403, "{smtp:?}");
    assert!(smtp.body.contains("proxy.http_ports"), "{smtp:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let ok = gw.curl(1, &[WHOAMI_URL]);
    assert_eq!(ok.code, 200, "{ok:?}");

    // proxy.allow opens the LAN host, reached by the main table (not out of an uplink).
    gw.stop();
    gw.start("listen = \"198.18.0.1:3128\"\nallow = [\"198.18.0.12/32\"]");
    let opened = gw.curl(1, &["http://198.18.0.12:8088/"]);
    assert_eq!(
        (opened.code, opened.body.trim()),
        (200, "lan-page"),
        "{opened:?}\n{}",
        gw.log()
    );
    let still = gw.curl(1, &[&modem]);
    assert_eq!(still.code, 403, "only the allowed host opens: {still:?}");

    // max_client_connections: a client's connections over it are closed at accept, unanswered,
    // and counted; the ones within it are served.
    gw.stop();
    gw.start("listen = \"198.18.0.1:3128\"\nmax_client_connections = 5");
    let streams: Vec<TcpStream> = in_namespace(&gw.lab.client(1), || {
        (0..8)
            .map(|_| TcpStream::connect("198.18.0.1:3128").unwrap())
            .collect()
    });
    // Admission is decided at accept: let the proxy take all eight from the kernel's queue
    // before a served request frees a slot (else a late accept fits in that slot).
    wait_until(Duration::from_secs(5), || {
        gw.status()["proxy"]["over_limit"].as_u64() == Some(3)
    });
    let answers: Vec<(String, bool)> = streams
        .into_iter()
        .map(|mut stream| {
            let _ = stream.write_all(
                b"GET http://198.18.9.1:8080/ HTTP/1.1\r\nHost: 198.18.9.1:8080\r\nConnection: close\r\n\r\n",
            );
            read_until_closed(&mut stream, Duration::from_secs(3))
        })
        .collect();
    let served = answers
        .iter()
        .filter(|(answer, _)| answer.starts_with("HTTP/1.1 200"))
        .count();
    let closed_unanswered = answers
        .iter()
        .filter(|(answer, closed)| answer.is_empty() && *closed)
        .count();
    assert_eq!((served, closed_unanswered), (5, 3), "{answers:?}");
    wait_until(Duration::from_secs(2), || {
        gw.status()["proxy"]["over_limit"].as_u64() == Some(3)
    });
}
