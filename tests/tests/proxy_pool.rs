//! Issue 12 item 8 in the lab: idle upstream connections are shared across client connections
//! (each fresh client connection still gets its uplink by the policy, and takes an idle
//! connection of that uplink to the origin), and a pooled connection of an uplink that was
//! released (silent past the reset delay) or renumbered is never handed out again.
//!
//! Root only. The test builds its own lab (prefix `bal-pxp<pid>`) with health probes to the
//! internet host; dropping the fixture stops the daemon, runs `balancer down` and removes the lab.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[allow(dead_code)]
#[path = "proxy/origin.rs"]
mod origin;
#[allow(dead_code)]
#[path = "proxy/support.rs"]
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use origin::Origin;
use support::*;

const ORIGIN: &str = "198.18.9.1:8092";

/// One request on a fresh client connection that says `Connection: close`: the uplink (1-based)
/// it left by and the number of the origin's TCP connection that carried it.
fn fresh_request(gw: &ProxyLab) -> (usize, usize) {
    let url = format!("http://{ORIGIN}/conn");
    let curl = gw.curl(1, &["-H", "Connection: close", &url]);
    assert_eq!(curl.code, 200, "{curl:?}\n{}", gw.log());
    let (peer, number) = curl.body.trim().split_once(' ').unwrap();
    let peer: SocketAddrV4 = peer.parse().unwrap();
    (gw.uplink_of(*peer.ip()), number.parse().unwrap())
}

/// Fresh requests until one leaves by `uplink`: the origin connection that carried it.
fn fresh_request_through(gw: &ProxyLab, uplink: usize) -> usize {
    for _ in 0..10 {
        let (way, number) = fresh_request(gw);
        if way == uplink {
            return number;
        }
    }
    panic!("no request left by uplink {uplink} in 10\n{}", gw.log());
}

#[test]
fn fresh_clients_share_idle_upstream_connections_but_never_a_dead_uplinks() {
    let gw = ProxyLab::up_tracked("pxp", "listen = \"198.18.0.1:3128\"");
    let lab = &gw.lab;
    let _origin = Origin::start(&lab.inet(), ORIGIN);

    // Twelve fresh client connections, one after the other: each uplink's first request opens a
    // connection to the origin, every later one on that uplink reuses it.
    let mut connections: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for _ in 0..12 {
        let (uplink, number) = fresh_request(&gw);
        connections.entry(uplink).or_default().insert(number);
    }
    eprintln!("origin connections per uplink: {connections:?}");
    assert_eq!(
        connections.len(),
        3,
        "the policy still spreads: {connections:?}"
    );
    for (uplink, numbers) in &connections {
        assert_eq!(
            numbers.len(),
            1,
            "uplink {uplink}'s requests came on several origin connections: {connections:?}"
        );
    }
    let pooled = |uplink: usize| *connections[&uplink].iter().next().unwrap();

    // Uplink 1 dies silently (carrier up, everything dropped) until the daemon gives up its
    // connections, then comes back: its pooled connection, still open at the origin, is never
    // handed out again.
    for (priority, iif) in [("50", "down0"), ("51", "up0")] {
        lab.exec_ok(
            &lab.isp(1),
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
    wait_until(Duration::from_secs(6), || {
        gw.log().contains("silent past the reset delay")
    });
    for priority in ["50", "51"] {
        lab.exec_ok(&lab.isp(1), &["ip", "rule", "del", "priority", priority])
            .unwrap();
    }
    wait_until(Duration::from_secs(6), || gw.health(1)["state"] == "up");
    let after_release = fresh_request_through(&gw, 1);
    assert_ne!(
        after_release,
        pooled(1),
        "a released uplink's pooled connection was reused\n{}",
        gw.log()
    );
    // The other uplinks' pooled connections are still in use.
    assert_eq!(fresh_request_through(&gw, 2), pooled(2));

    // Uplink 3 is renumbered, and its ISP carries the new address: its pooled connection from
    // the old address is not used again.
    lab.exec_ok(
        &lab.isp(3),
        &[
            "ip",
            "rule",
            "add",
            "iif",
            "down0",
            "from",
            "198.18.3.77/32",
            "lookup",
            "main",
            "prio",
            "100",
        ],
    )
    .unwrap();
    lab.exec_ok(
        &lab.inet(),
        &[
            "ip",
            "route",
            "add",
            "198.18.3.77/32",
            "via",
            "198.19.3.2",
            "dev",
            "isp3",
        ],
    )
    .unwrap();
    let interface = lab.uplink_interface(3);
    let old = format!("{}/24", lab.uplink_source(3));
    lab.exec_ok(&lab.gw(), &["ip", "addr", "del", &old, "dev", &interface])
        .unwrap();
    lab.exec_ok(
        &lab.gw(),
        &["ip", "addr", "add", "198.18.3.77/24", "dev", &interface],
    )
    .unwrap();
    let renumbered: Ipv4Addr = "198.18.3.77".parse().unwrap();
    wait_until(Duration::from_secs(8), || gw.health(3)["state"] == "up");
    let url = format!("http://{ORIGIN}/conn");
    let mut seen = None;
    for _ in 0..10 {
        let curl = gw.curl(1, &["-H", "Connection: close", &url]);
        assert_eq!(curl.code, 200, "{curl:?}\n{}", gw.log());
        let (peer, number) = curl.body.trim().split_once(' ').unwrap();
        let peer: SocketAddrV4 = peer.parse().unwrap();
        if *peer.ip() == renumbered {
            seen = Some(number.parse::<usize>().unwrap());
            break;
        }
        assert_ne!(
            peer.ip(),
            &lab.uplink_source(3),
            "a request left by uplink 3's old address\n{}",
            gw.log()
        );
    }
    let seen = seen.unwrap_or_else(|| panic!("nothing left by the new address\n{}", gw.log()));
    assert_ne!(seen, pooled(3));
}
