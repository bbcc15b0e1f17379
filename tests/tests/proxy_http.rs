//! Issue 12 items 3 to 5: HTTP as RFC 9110/9112 ask (what the origin sees: Host without
//! userinfo, Via; loops refused; Max-Forwards; one framing per response; a request retried once
//! when a kept upstream connection turns out closed), the access log (one line per request or
//! tunnel, naming the client and the uplink the far end saw, reopened on SIGHUP) and the PAC
//! file (the office networks DIRECT).
//!
//! Root only. The lab's prefix is `bal-pxr<pid>`; dropping the fixture stops the daemon, runs
//! `balancer down` and removes the lab. The origin is a small server of the test's own in the
//! internet namespace (tests/tests/proxy/origin.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[allow(dead_code)]
#[path = "proxy/origin.rs"]
mod origin;
#[allow(dead_code)]
#[path = "proxy/support.rs"]
mod support;

use std::time::Duration;

use origin::Origin;
use support::*;

const ORIGIN: &str = "198.18.9.1:8089";
const ONCE_ORIGIN: &str = "198.18.9.1:8088";
const WHOAMI_URL: &str = "http://198.18.9.1:8080/";

#[test]
fn headers_loops_framing_retry_access_log_and_pac() {
    let mut gw = ProxyLab::up("pxr", "listen = \"198.18.0.1:3128\"");
    let lab = &gw.lab;
    let origin = Origin::start(&lab.inet(), ORIGIN);

    // Userinfo never reaches Host; Via does.
    let seen = gw.curl(1, &[&format!("http://alice:secret@{ORIGIN}/head")]);
    assert_eq!(seen.code, 200, "{seen:?}\n{}", gw.log());
    assert!(
        seen.body.contains(&format!("host: {ORIGIN}\r\n"))
            || seen.body.contains(&format!("Host: {ORIGIN}\r\n")),
        "{:?}",
        seen.body
    );
    assert!(!seen.body.contains("alice"), "{:?}", seen.body);
    let via = seen
        .body
        .lines()
        .find_map(|l| l.strip_prefix("via: ").or_else(|| l.strip_prefix("Via: ")))
        .unwrap_or_else(|| panic!("no Via at the origin: {:?}", seen.body))
        .trim()
        .to_string();
    assert!(via.starts_with("1.1 balancer-"), "{via}");

    // A request that already carries our Via has come round: refused, never forwarded.
    let before = origin.heads().len();
    let (looped, _) = raw_exchange(
        &lab.client(1),
        format!(
            "GET http://{ORIGIN}/head HTTP/1.1\r\nHost: {ORIGIN}\r\nVia: 1.0 other, {via}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
        Duration::from_secs(3),
    );
    assert!(looped.starts_with("HTTP/1.1 508"), "{looped}");
    assert!(looped.contains("loop"), "{looped}");
    assert_eq!(origin.heads().len(), before, "the loop reached the origin");

    // Max-Forwards: 0 ends at the proxy; 1 is forwarded as 0.
    let (options, _) = raw_exchange(
        &lab.client(1),
        format!(
            "OPTIONS http://{ORIGIN}/head HTTP/1.1\r\nHost: {ORIGIN}\r\nMax-Forwards: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
        Duration::from_secs(3),
    );
    assert!(
        options.starts_with("HTTP/1.1 200") && options.to_lowercase().contains("allow: "),
        "{options}"
    );
    assert_eq!(
        origin.heads().len(),
        before,
        "OPTIONS went past Max-Forwards: 0"
    );
    let trace = gw.curl(
        1,
        &[
            "-X",
            "TRACE",
            "-H",
            "Max-Forwards: 1",
            &format!("http://{ORIGIN}/head"),
        ],
    );
    assert_eq!(trace.code, 200, "{trace:?}");
    assert!(
        trace.body.to_lowercase().contains("max-forwards: 0"),
        "{:?}",
        trace.body
    );

    // Both framings from the server: Content-Length is dropped, the chunked body arrives whole.
    let both = gw.curl(1, &[&format!("http://{ORIGIN}/both")]);
    assert_eq!((both.code, both.body.as_str()), (200, "hello"), "{both:?}");

    // Trailers: asked for upstream when the client accepts them, and forwarded.
    let (trailers, _) = raw_exchange(
        &lab.client(1),
        format!(
            "GET http://{ORIGIN}/trailers HTTP/1.1\r\nHost: {ORIGIN}\r\nTE: trailers\r\nConnection: close, TE\r\n\r\n"
        )
        .as_bytes(),
        Duration::from_secs(3),
    );
    assert!(trailers.starts_with("HTTP/1.1 200"), "{trailers}");
    assert!(
        trailers
            .to_lowercase()
            .contains("\r\n0\r\nx-checksum: c0ffee\r\n"),
        "the trailer reached the client: {trailers:?}"
    );

    // The server closes the kept connection as the next request arrives: retried once. An
    // origin of its own, so the first request finds no pooled connection and opens one.
    let once_origin = Origin::start(&lab.inet(), ONCE_ORIGIN);
    let once = format!("http://{ONCE_ORIGIN}/once");
    let retried = gw.curl(1, &[&once, &once]);
    assert_eq!(retried.code, 200, "{retried:?}\n{}", gw.log());
    let once_heads = once_origin
        .heads()
        .iter()
        .filter(|h| h.starts_with("GET /once "))
        .count();
    assert_eq!(once_heads, 3, "first, dropped, retried");

    // A WebSocket handshake in absolute form: 101 from the server, then both ways.
    let echoed = in_namespace(&lab.client(1), || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect("198.18.0.1:3128").unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        stream
            .write_all(
                format!(
                    "GET http://{ORIGIN}/ws HTTP/1.1\r\nHost: {ORIGIN}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                )
                .as_bytes(),
            )
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        stream.write_all(b"ping-through-the-proxy").unwrap();
        let mut echo = [0u8; 22];
        let read = stream.read_exact(&mut echo).map(|()| echo.to_vec());
        (String::from_utf8_lossy(&head).into_owned(), read)
    });
    assert!(echoed.0.starts_with("HTTP/1.1 101"), "{:?}", echoed.0);
    assert!(
        echoed.0.to_lowercase().contains("upgrade: websocket"),
        "{:?}",
        echoed.0
    );
    assert_eq!(
        echoed.1.ok().as_deref(),
        Some(&b"ping-through-the-proxy"[..]),
        "the upgraded connection echoes"
    );
    let ws_head = origin
        .heads()
        .into_iter()
        .find(|h| h.starts_with("GET /ws "))
        .unwrap();
    assert!(
        ws_head.to_lowercase().contains("upgrade: websocket"),
        "{ws_head}"
    );

    // Names are cached by TTL per uplink: each uplink asks once, then answers from memory.
    let name = format!("cached-{}.lab.example", std::process::id());
    let uplinks: std::collections::BTreeSet<usize> = (0..6)
        .map(|_| gw.uplink_of(*gw.seen(1, &format!("http://{name}:8080/")).ip()))
        .collect();
    let mut queries = gw.dns_queries_from(&name);
    queries.sort();
    let mut asked: Vec<std::net::Ipv4Addr> =
        uplinks.iter().map(|&u| lab.uplink_source(u)).collect();
    asked.sort();
    assert_eq!(queries, asked, "one query per uplink used, for 6 requests");

    // The PAC file lists the office networks (LAN and the uplinks' subnets) as DIRECT.
    for path in ["/proxy.pac", "/wpad.dat"] {
        let pac = lab
            .exec_ok(
                &lab.client(1),
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    &format!("http://198.18.0.1:3128{path}"),
                ],
            )
            .unwrap();
        for network in ["198.18.0.0", "198.18.1.0", "198.18.2.0", "198.18.3.0"] {
            assert!(
                pac.contains(&format!(
                    "isInNet(host, \"{network}\", \"255.255.255.0\")) return \"DIRECT\""
                )),
                "{path} lacks {network}: {pac}"
            );
        }
        assert!(pac.contains("return \"PROXY 198.18.0.1:3128\""), "{pac}");
    }

    // The access log: one line per request or tunnel, naming the client and the uplink.
    let log_path = lab.state_dir().join("access.log");
    gw.stop();
    // The daemon starts under systemd's default soft limit of 1,024 open files (inherited).
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 1024, hard).unwrap();
    gw.start(&format!(
        "listen = \"198.18.0.1:3128\"\nconnect_ports = [8080, 9002]\naccess_log = \"{}\"",
        log_path.display()
    ));
    let lab = &gw.lab;
    let mut expected = Vec::new();
    for _ in 0..5 {
        let seen = gw.seen(1, &format!("{WHOAMI_URL}?token=secret"));
        expected.push((
            "GET",
            lab.client_addr(1),
            format!("isp{}", gw.uplink_of(*seen.ip())),
        ));
    }
    let tunnel = gw.curl(2, &["-p", WHOAMI_URL]);
    assert_eq!((tunnel.connect_code, tunnel.code), (200, 200), "{tunnel:?}");
    let tunnel_uplink = gw.uplink_of(
        tunnel
            .body
            .trim()
            .parse::<std::net::SocketAddrV4>()
            .unwrap()
            .ip()
            .to_owned(),
    );
    expected.push(("CONNECT", lab.client_addr(2), format!("isp{tunnel_uplink}")));
    let refused = gw.curl(1, &["http://198.18.0.12:8088/"]);
    assert_eq!(refused.code, 403);
    expected.push(("GET", lab.client_addr(1), "-".to_string()));
    // A client that gives up before the answer is logged too (status 499).
    let origin = Origin::start(&lab.inet(), "198.18.9.1:8090");
    let (gave_up, _) = raw_exchange(
        &lab.client(2),
        b"HEAD http://198.18.9.1:8090/slow HTTP/1.1\r\nHost: 198.18.9.1:8090\r\n\r\n",
        Duration::from_millis(300),
    );
    assert!(gave_up.is_empty(), "{gave_up}");
    wait_until(Duration::from_secs(3), || !origin.heads().is_empty());
    expected.push(("HEAD", lab.client_addr(2), "499".to_string()));
    let mut lines = Vec::new();
    wait_until(Duration::from_secs(3), || {
        lines = std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        lines.len() >= expected.len()
    });
    // The tunnel is logged when it ends, so it may come after the refusal.
    assert_eq!(lines.len(), expected.len(), "{lines:#?}");
    for (method, client, uplink) in &expected {
        let found = lines.iter().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let last = if uplink == "499" {
                fields.get(3).is_some_and(|code| code.ends_with("/499"))
            } else {
                fields.last() == Some(&uplink.as_str())
            };
            fields.get(2) == Some(&client.to_string().as_str())
                && fields.get(5) == Some(method)
                && last
        });
        assert!(
            found,
            "no line for {method} by {client} via {uplink}: {lines:#?}"
        );
    }
    assert!(
        !lines.iter().any(|l| l.contains("token=secret")),
        "query strings are left out: {lines:#?}"
    );

    // logrotate: the file is moved, SIGHUP, and the next line goes to a new file.
    let rotated = lab.state_dir().join("access.log.1");
    std::fs::rename(&log_path, &rotated).unwrap();
    let pid = gw.status()["pid"].as_u64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after = gw.curl(1, &[WHOAMI_URL]);
    assert_eq!(after.code, 200, "{after:?}\n{}", gw.log());
    wait_until(Duration::from_secs(3), || {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .count()
            == 1
    });
    assert_eq!(
        std::fs::read_to_string(&rotated).unwrap().lines().count(),
        expected.len()
    );

    // An upload through a tunnel arrives whole, and the half-close carries the count back.
    const UPLOAD: usize = 2_000_000;
    let counted = in_namespace(&lab.client(1), || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect("198.18.0.1:3128").unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(b"CONNECT 198.18.9.1:9002 HTTP/1.1\r\nHost: 198.18.9.1:9002\r\n\r\n")
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        let chunk = vec![0xa5u8; 1 << 16];
        let mut left = UPLOAD;
        while left > 0 {
            let n = left.min(chunk.len());
            stream.write_all(&chunk[..n]).unwrap();
            left -= n;
        }
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        (String::from_utf8_lossy(&head).into_owned(), answer)
    });
    assert!(counted.0.starts_with("HTTP/1.1 200"), "{counted:?}");
    assert_eq!(counted.1.trim(), UPLOAD.to_string(), "the sink's count");

    // Each tunnel costs the proxy three descriptors: 400 of them need more than the usual soft
    // limit of 1,024, which the daemon raised at start to fit max_connections (1,024).
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(soft >= 3 * 1024 + 1024, "open file limit {soft}");
    let mut tunnels = Vec::new();
    for client in [1, 2] {
        tunnels.extend(in_namespace(&lab.client(client), || {
            use std::io::{Read, Write};
            (0..200)
                .map(|_| {
                    let mut stream = std::net::TcpStream::connect("198.18.0.1:3128").unwrap();
                    stream
                        .write_all(
                            b"CONNECT 198.18.9.1:8080 HTTP/1.1\r\nHost: 198.18.9.1:8080\r\n\r\n",
                        )
                        .unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .unwrap();
                    let mut head = [0u8; 64];
                    let n = stream.read(&mut head).unwrap_or(0);
                    (stream, String::from_utf8_lossy(&head[..n]).into_owned())
                })
                .collect::<Vec<_>>()
        }));
    }
    let open = tunnels
        .iter()
        .filter(|(_, head)| head.starts_with("HTTP/1.1 200"))
        .count();
    assert_eq!(open, 400, "tunnels opened");
    let beside = gw.curl(1, &[WHOAMI_URL]);
    assert_eq!(
        beside.code,
        200,
        "a request beside 400 tunnels: {beside:?}\n{}",
        gw.log()
    );
}
