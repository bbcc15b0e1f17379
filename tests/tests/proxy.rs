//! The multisourcing forward proxy in the lab: `curl --proxy http://198.18.0.1:3128` from a LAN
//! client, and raw clients for what curl will not send. The internet host answers HTTP with the
//! source address it sees, so every check of "which uplink" is what the far end observed (an ISP
//! drops any source but its own uplink's, so a wrong exit shows as a failure, not a wrong
//! answer).
//!
//! Root only. Each test builds its own lab (prefix `bal-px?<pid>`); dropping the fixture stops
//! the daemon, runs `balancer down` and removes the lab.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
// Shared with the other proxy test files, which use other parts of it.
#[allow(dead_code)]
#[path = "proxy/support.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;

const WHOAMI_URL: &str = "http://198.18.9.1:8080/";

/// Round robin by weight (2:2:1), names resolved out of the uplink the request then uses,
/// keep-alive towards the client, CONNECT tunnels both ways, and the counters in `status`.
#[test]
fn requests_spread_by_weight_and_resolve_through_their_uplink() {
    let gw = ProxyLab::up(
        "pxa",
        "listen = \"198.18.0.1:3128\"\nconnect_ports = [443, 8080, 9000]",
    );

    // 10 requests: smooth weighted round robin gives exactly 4/4/2 over 2:2:1.
    let uplinks: Vec<usize> = (0..10)
        .map(|_| gw.uplink_of(*gw.seen(1, WHOAMI_URL).ip()))
        .collect();
    let counts = tally(uplinks.iter().copied());
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        vec![(1, 4), (2, 4), (3, 2)],
        "sequence of uplinks: {uplinks:?}"
    );

    // Each name is asked out of the uplink whose address then fetches the page.
    for i in 0..6 {
        let name = format!("n{i}-{}.lab.example", std::process::id());
        let seen = gw.seen(1, &format!("http://{name}:8080/"));
        let queries = gw.dns_queries_from(&name);
        assert_eq!(
            queries,
            vec![*seen.ip()],
            "{name}: DNS queries came from {queries:?}, the request from {seen}"
        );
    }

    // Keep-alive: two requests on one client connection; the second needs no new connect.
    let both = gw.curl(1, &[WHOAMI_URL, "http://198.18.9.1:8080/bytes/100000"]);
    assert_eq!(both.code, 200, "{both:?}");
    assert_eq!(
        both.connects, 0,
        "the second request reused the connection: {both:?}"
    );

    // A download through the proxy arrives whole.
    let download = gw.curl(1, &["http://198.18.9.1:8080/bytes/1000000"]);
    assert_eq!(
        (download.code, download.size),
        (200, 1_000_000),
        "{}",
        download.stderr
    );

    // CONNECT: curl -p tunnels even plain HTTP; the page and the peer come through the tunnel.
    let tunnel = gw.curl(2, &["-p", "http://198.18.9.1:8080/bytes/300000"]);
    assert_eq!(
        (tunnel.connect_code, tunnel.code, tunnel.size),
        (200, 200, 300_000),
        "{}",
        tunnel.stderr
    );
    let whoami = raw_exchange(
        &gw.lab.client(2),
        b"CONNECT 198.18.9.1:9000 HTTP/1.1\r\nHost: 198.18.9.1:9000\r\n\r\n",
        Duration::from_secs(3),
    )
    .0;
    assert!(whoami.starts_with("HTTP/1.1 200"), "{whoami}");
    let peer = whoami.rsplit("\r\n\r\n").next().unwrap_or_default().trim();
    let ip = peer.split(':').next().unwrap().parse().unwrap();
    gw.uplink_of(ip);

    // Counters: per uplink, served in `status --json` and shown by `balancer status`.
    wait_until(Duration::from_secs(2), || {
        let status = gw.status();
        let rows = status["proxy"]["uplinks"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let sum = |f: &str| rows.iter().map(|r| r[f].as_u64().unwrap_or(0)).sum::<u64>();
        sum("requests") >= 19
            && sum("tunnels") >= 2
            && sum("bytes_down") > 1_400_000
            && sum("dns_queries") >= 6
    });
    let text = gw
        .lab
        .exec_ok(&gw.lab.gw(), &[&common::balancer_bin(), "status"])
        .unwrap();
    assert!(text.contains("proxy:") && text.contains("isp3"), "{text}");
}

/// Every refusal is an HTTP status with a reason: forbidden CONNECT ports,
/// the gateway itself, loopback and link-local, conflicting framing, heads too big or too slow.
#[test]
fn refusals() {
    let gw = ProxyLab::up(
        "pxb",
        "listen = \"198.18.0.1:3128\"\nheader_timeout = \"2s\"\nmax_header_bytes = 16384",
    );
    let lab = &gw.lab;

    let forbidden_port = gw.curl(1, &["-p", "http://198.18.9.1:9000/"]);
    assert_eq!(forbidden_port.connect_code, 403, "{forbidden_port:?}");
    for url in [
        "http://198.18.0.1:3128/",
        "http://198.18.1.2:8080/",
        "http://127.0.0.1:8080/",
        "http://169.254.1.1/",
        "http://0.0.0.0:8080/",
    ] {
        let refused = gw.curl(1, &[url]);
        assert_eq!(refused.code, 403, "{url}: {refused:?}");
        assert!(!refused.body.trim().is_empty(), "{url}: a reason is given");
    }
    let connect_loopback = raw_exchange(
        &lab.client(1),
        b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n",
        Duration::from_secs(3),
    )
    .0;
    assert!(
        connect_loopback.starts_with("HTTP/1.1 403"),
        "{connect_loopback}"
    );

    // Request smuggling: both Content-Length and Transfer-Encoding.
    let (smuggle, closed) = raw_exchange(
        &lab.client(1),
        b"POST http://198.18.9.1:8080/ HTTP/1.1\r\nHost: 198.18.9.1:8080\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET http://198.18.9.1:8080/ HTTP/1.1\r\nHost: 198.18.9.1:8080\r\n\r\n",
        Duration::from_secs(3),
    );
    assert!(smuggle.starts_with("HTTP/1.1 400"), "{smuggle}");
    assert!(
        closed && smuggle.matches("HTTP/1.1").count() == 1,
        "the connection ends there: {smuggle}"
    );

    // A head over the limit.
    let big = format!(
        "GET {WHOAMI_URL} HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let (too_big, _) = raw_exchange(&lab.client(1), big.as_bytes(), Duration::from_secs(3));
    assert!(too_big.starts_with("HTTP/1.1 431"), "{too_big}");

    // Slowloris: a byte a second never completes a head; the 2 s deadline cuts it.
    let started = Instant::now();
    let (answer, closed, sent) = support::in_namespace(&lab.client(1), || {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect("198.18.0.1:3128").unwrap();
        stream
            .write_all(format!("GET {WHOAMI_URL} HTTP/1.1\r\n").as_bytes())
            .unwrap();
        let mut sent = 0;
        for byte in b"X-Slow: aaaaaaaaaaaaaaaaaaaa" {
            std::thread::sleep(Duration::from_secs(1));
            if stream.write_all(&[*byte]).is_err() {
                break;
            }
            sent += 1;
            if started.elapsed() > Duration::from_secs(6) {
                break;
            }
        }
        let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(1));
        (answer, closed, sent)
    });
    let elapsed = started.elapsed();
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "after {sent} trickled bytes: {answer:?}"
    );
    assert!(closed, "the proxy closed the connection");
    assert!(
        sent <= 4 && elapsed < Duration::from_secs(6),
        "cut after {elapsed:?}, {sent} bytes"
    );

    let refused = gw.status()["proxy"]["refused"].as_u64().unwrap_or(0);
    assert!(refused >= 8, "refusals counted: {refused}");
}

/// sticky-site keeps a (client, site) on one uplink across names of the same registrable
/// domain; sticky-client keeps each client on one uplink whatever it asks.
#[test]
fn sticky_policies_keep_their_uplink() {
    let mut gw = ProxyLab::up(
        "pxc",
        "listen = \"198.18.0.1:3128\"\npolicy = \"sticky-site\"",
    );
    let pid = std::process::id();
    let site: Vec<usize> = (0..6)
        .map(|i| {
            gw.uplink_of(
                *gw.seen(1, &format!("http://h{i}-{pid}.lab.example:8080/"))
                    .ip(),
            )
        })
        .collect();
    let literal: Vec<usize> = (0..6)
        .map(|_| gw.uplink_of(*gw.seen(1, WHOAMI_URL).ip()))
        .collect();
    assert_eq!(
        tally(site.iter().copied()).len(),
        1,
        "one uplink for lab.example: {site:?}"
    );
    assert_eq!(
        tally(literal.iter().copied()).len(),
        1,
        "one uplink for the address: {literal:?}"
    );
    assert_ne!(
        site[0], literal[0],
        "two sites are balanced over two uplinks"
    );

    gw.stop();
    gw.start("listen = \"198.18.0.1:3128\"\npolicy = \"sticky-client\"");
    let mut per_client = Vec::new();
    for client in [1, 2] {
        let seen: Vec<usize> = (0..6)
            .map(|i| {
                let url = if i % 2 == 0 {
                    WHOAMI_URL.to_string()
                } else {
                    format!("http://c{client}x{i}-{pid}.lab.example:8080/")
                };
                gw.uplink_of(*gw.seen(client, &url).ip())
            })
            .collect();
        assert_eq!(
            tally(seen.iter().copied()).len(),
            1,
            "client {client}: {seen:?}"
        );
        per_client.push(seen[0]);
    }
    assert_ne!(
        per_client[0], per_client[1],
        "two clients are balanced over two uplinks"
    );
}

/// With uplink 1 black-holed behind its modem (carrier stays up, so only racing can help),
/// every request still succeeds well under a second, out of the other uplinks.
#[test]
fn a_blackholed_uplink_is_raced_around() {
    let gw = ProxyLab::up(
        "pxd",
        "listen = \"198.18.0.1:3128\"\nrace_delay = \"250ms\"",
    );
    let lab = &gw.lab;
    // Inside the ISP namespace only: everything towards the internet host is dropped there.
    lab.exec_ok(
        &lab.isp(1),
        &["ip", "route", "add", "blackhole", "198.18.9.0/24"],
    )
    .unwrap();
    let pid = std::process::id();
    let mut slowest = 0.0f64;
    for i in 0..10 {
        let url = if i % 2 == 0 {
            WHOAMI_URL.to_string()
        } else {
            format!("http://r{i}-{pid}.lab.example:8080/")
        };
        let curl = gw.curl(1, &[&url]);
        assert_eq!(curl.code, 200, "{url}: {curl:?}\n{}", gw.log());
        let seen: std::net::SocketAddrV4 = curl.body.trim().parse().unwrap();
        assert_ne!(
            gw.uplink_of(*seen.ip()),
            1,
            "{url} came out of the black hole"
        );
        assert!(curl.seconds < 0.8, "{url} took {:.3}s", curl.seconds);
        slowest = slowest.max(curl.seconds);
    }
    eprintln!("slowest request with uplink 1 black-holed: {slowest:.3}s");
    assert!(
        slowest > 0.2,
        "some requests tried uplink 1 first and were raced ({slowest:.3}s)"
    );
}
