//! ICMP errors, path MTU and MSS clamping through the balancer in the lab: errors about a
//! translated flow reach the LAN client that owns it, so path MTU discovery, "connection
//! refused" and traceroute-style "time exceeded" work through the NAT, and SYNs announce an MSS
//! that fits the uplink, so TCP works over a smaller-MTU uplink even where ICMP is filtered.
//!
//! The PMTU, ICMP-error and MSS tests run twice: over Ethernet uplinks, and over raw-IP
//! point-to-point uplinks (TUN devices without an Ethernet header, `A peer B`, as PPPoE or an
//! LTE modem gives them), where the data plane attaches its raw-IP program variants.
//!
//! Root only. Each test builds its own lab (prefix `bal-im<pid>`) with `balancer run` in it,
//! one at a time under the shared lock of `common::transparent`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{net::SocketAddrV4, thread, time::Duration};

use balancer_tests::lab::{LabSpec, SERVER_ADDR, SINK_PORT};
use common::transparent::Gateway;
use serde::Deserialize;

const UPLINKS: usize = 2;

/// The lab's uplinks: Ethernet (veth to a router), or raw-IP point-to-point for every uplink.
#[derive(Clone, Copy, Debug)]
enum Uplinks {
    Ethernet,
    RawIp,
}

fn lab_up(uplinks: Uplinks) -> Gateway {
    Gateway::up("im", |p| {
        let mut spec = LabSpec::new(p, UPLINKS);
        if let Uplinks::RawIp = uplinks {
            spec.raw_ip = (1..=UPLINKS).collect();
        }
        spec
    })
}

/// What `labtool icmp-probe` prints.
#[derive(Debug, Deserialize)]
struct Probe {
    local: String,
    from: String,
    icmp_type: u8,
    icmp_code: u8,
    quoted_src: String,
    quoted_dst: String,
    socket_error: Option<String>,
}

fn probe(gw: &Gateway, target: SocketAddrV4, ttl: u8) -> Probe {
    let lab = &gw.lab;
    let (target, ttl) = (target.to_string(), ttl.to_string());
    let args = ["icmp-probe", &target, "--ttl", &ttl, "--timeout-ms", "4000"];
    let out = lab.labtool_exec(&lab.client(1), &args).unwrap();
    assert!(
        out.status.success(),
        "icmp-probe {target} --ttl {ttl}: {}\n{}",
        String::from_utf8_lossy(&out.stderr).trim(),
        gw.diagnostics()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// An upload from a LAN client crosses a 1280-byte hop behind every ISP router: the router's
/// "fragmentation needed" reaches the client through the NAT, which lowers its path MTU.
#[test]
fn path_mtu_discovery_works_through_the_nat() {
    path_mtu_discovery(Uplinks::Ethernet);
}

#[test]
fn path_mtu_discovery_works_through_the_nat_over_raw_ip() {
    path_mtu_discovery(Uplinks::RawIp);
}

fn path_mtu_discovery(uplinks: Uplinks) {
    let gw = lab_up(uplinks);
    let lab = &gw.lab;
    // Only the router's side of the hop: the server keeps announcing MSS 1460, so the client
    // sends full-size segments until the router tells it otherwise (the few small segments
    // coming back are not affected).
    for i in 1..=UPLINKS {
        lab.set_mtu(&lab.isp(i), "up0", 1280).unwrap();
    }
    let sink = SocketAddrV4::new(SERVER_ADDR, SINK_PORT).to_string();
    let args = ["upload", &sink, "--seconds", "2", "--timeout-ms", "5000"];
    let out = lab.labtool_exec(&lab.client(1), &args).unwrap();
    assert!(
        out.status.success(),
        "upload through the 1280-byte hop: {}\n{}",
        String::from_utf8_lossy(&out.stderr).trim(),
        gw.diagnostics()
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bytes = summary["bytes"].as_u64().unwrap();
    eprintln!("upload through a 1280-byte hop: {summary}");
    assert!(bytes > 1_000_000, "only {bytes} bytes uploaded");
    // The client learnt the path MTU from the translated error.
    let route = lab
        .exec_ok(
            &lab.client(1),
            &["ip", "route", "get", &SERVER_ADDR.to_string()],
        )
        .unwrap();
    assert!(route.contains("mtu 1280"), "client's route: {route}");
}

/// A UDP datagram to a closed port on the internet host: the host's "port unreachable" reaches
/// the client, quoting the client's own address and port, and its socket reports it.
#[test]
fn closed_udp_port_is_refused_at_the_client() {
    closed_udp_port_is_refused(Uplinks::Ethernet);
}

#[test]
fn closed_udp_port_is_refused_at_the_client_over_raw_ip() {
    closed_udp_port_is_refused(Uplinks::RawIp);
}

fn closed_udp_port_is_refused(uplinks: Uplinks) {
    let gw = lab_up(uplinks);
    let probe = probe(&gw, SocketAddrV4::new(SERVER_ADDR, 9999), 64);
    eprintln!("{probe:?}");
    assert_eq!((probe.icmp_type, probe.icmp_code), (3, 3), "{probe:?}");
    assert_eq!(probe.from, SERVER_ADDR.to_string());
    assert_eq!(probe.quoted_src, probe.local, "the quote names the client");
    assert!(probe.local.starts_with(&gw.lab.client_addr(1).to_string()));
    assert_eq!(probe.quoted_dst, format!("{SERVER_ADDR}:9999"));
    assert_eq!(probe.socket_error.as_deref(), Some("connection refused"));
}

/// A datagram whose TTL runs out at the ISP router: the router's "time exceeded" reaches the
/// client, naming the client's own address and port.
#[test]
fn expired_ttl_brings_time_exceeded_to_the_client() {
    expired_ttl_brings_time_exceeded(Uplinks::Ethernet);
}

#[test]
fn expired_ttl_brings_time_exceeded_to_the_client_over_raw_ip() {
    expired_ttl_brings_time_exceeded(Uplinks::RawIp);
}

fn expired_ttl_brings_time_exceeded(uplinks: Uplinks) {
    let gw = lab_up(uplinks);
    // The gateway forwards with TTL 2 -> 1; the ISP router cannot.
    let probe = probe(&gw, SocketAddrV4::new(SERVER_ADDR, 9000), 2);
    eprintln!("{probe:?}");
    assert_eq!((probe.icmp_type, probe.icmp_code), (11, 0), "{probe:?}");
    let routers: Vec<String> = (1..=UPLINKS)
        .map(|i| gw.lab.uplink_gateway(i).to_string())
        .collect();
    assert!(
        routers.contains(&probe.from),
        "from {} not an ISP router",
        probe.from
    );
    assert_eq!(probe.quoted_src, probe.local, "the quote names the client");
    assert!(probe.local.starts_with(&gw.lab.client_addr(1).to_string()));
}

/// Uplinks with a PPPoE-like MTU of 1492 and ISPs that drop all ICMP towards the internet: no
/// "fragmentation needed" can reach the server, so only the clamped MSS in the client's SYN
/// keeps the server's segments small enough. Downloads work (with clamping disabled in the
/// kernel, this test black-holes: 0 bytes).
#[test]
fn mss_clamping_makes_tcp_work_over_a_smaller_mtu_without_icmp() {
    mss_clamping_without_icmp(Uplinks::Ethernet);
}

#[test]
fn mss_clamping_makes_tcp_work_over_a_smaller_mtu_without_icmp_over_raw_ip() {
    mss_clamping_without_icmp(Uplinks::RawIp);
}

fn mss_clamping_without_icmp(uplinks: Uplinks) {
    let gw = lab_up(uplinks);
    let lab = &gw.lab;
    for i in 1..=UPLINKS {
        lab.set_mtu(&lab.gw(), &lab.uplink_interface(i), 1492)
            .unwrap();
        lab.set_mtu(&lab.isp(i), "down0", 1492).unwrap();
        lab.drop_icmp_leaving(&lab.isp(i), "up0").unwrap();
    }
    // The daemon follows link changes (netlink) and writes the new MSS into the uplink slots.
    thread::sleep(Duration::from_secs(2));
    for round in 0..UPLINKS {
        let transfer = lab.download(&lab.client(1), None, 2.0).unwrap_or_else(|e| {
            panic!(
                "download {round} over MTU 1492: {e:#}\n{}",
                gw.diagnostics()
            )
        });
        eprintln!("download {round} over MTU 1492 without ICMP: {transfer:?}");
        assert!(transfer.bytes > 1_000_000, "{transfer:?}");
        assert!(
            transfer.max_gap_ms.unwrap_or(0.0) < 1000.0,
            "stalled: {transfer:?}"
        );
    }
}

/// Echo requests of 3000 bytes leave the client fragmented and the replies come back
/// fragmented: first fragments are translated like any echo, later ones by their IP id.
#[test]
fn fragmented_echo_crosses_the_nat() {
    fragmented_echo(Uplinks::Ethernet);
}

#[test]
fn fragmented_echo_crosses_the_nat_over_raw_ip() {
    fragmented_echo(Uplinks::RawIp);
}

fn fragmented_echo(uplinks: Uplinks) {
    let gw = lab_up(uplinks);
    let lab = &gw.lab;
    let server = SERVER_ADDR.to_string();
    let args = [
        "ping",
        &server,
        "--count",
        "3",
        "--size",
        "3000",
        "--timeout-ms",
        "2000",
    ];
    let out = lab.labtool_exec(&lab.client(1), &args).unwrap();
    assert!(
        out.status.success(),
        "ping -s 3000: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr).trim(),
        gw.diagnostics()
    );
    // The client really sent fragments and reassembled fragmented replies.
    let counters = lab
        .exec_ok(
            &lab.client(1),
            &["nstat", "-az", "IpFragCreates", "IpReasmOKs"],
        )
        .unwrap();
    let value = |name: &str| -> u64 {
        counters
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(value("IpFragCreates") >= 6, "{counters}");
    assert!(value("IpReasmOKs") >= 3, "{counters}");
}
