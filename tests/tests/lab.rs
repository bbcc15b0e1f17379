//! The lab itself behaves as documented: per-uplink paths reach the internet host with the
//! uplink's source, ISPs drop foreign sources, shaping holds the configured rates, DNS answers,
//! and `down` leaves nothing behind. Needs root; skipped (with a note) otherwise.
//!
//! Each test uses its own prefix (with the PID), so these run in parallel with other lab tests.

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use balancer_tests::lab::{self, Lab, LabSpec};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn prefix(tag: char) -> String {
    format!("bal-t{}{tag}", std::process::id() % 1_000_000)
}

fn up(spec: LabSpec) -> Lab {
    match Lab::up_with_labtool(spec, Path::new(env!("CARGO_BIN_EXE_labtool"))) {
        Ok(lab) => lab,
        Err(e) => panic!("lab up: {e:#}"),
    }
}

fn ok<T>(what: &str, result: anyhow::Result<T>) -> T {
    match result {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e:#}"),
    }
}

/// What the product will do: traffic from uplink i's source leaves by uplink i.
fn route_uplink(lab: &Lab, i: usize) {
    let table = (100 + i).to_string();
    let gw = lab.gw();
    let source = lab.uplink_source(i).to_string();
    let via = lab.uplink_gateway(i).to_string();
    let dev = lab.uplink_interface(i);
    ok(
        "route add",
        lab.exec_ok(
            &gw,
            &[
                "ip", "route", "add", "default", "via", &via, "dev", &dev, "table", &table,
            ],
        ),
    );
    ok(
        "rule add",
        lab.exec_ok(
            &gw,
            &["ip", "rule", "add", "from", &source, "lookup", &table],
        ),
    );
}

fn sysctl(lab: &Lab, ns: &str, key: &str) -> String {
    ok("sysctl", lab.exec_ok(ns, &["sysctl", "-n", key]))
        .trim()
        .to_owned()
}

#[test]
fn lab_routes_filters_shapes_and_tears_down() {
    if !is_root() {
        eprintln!("skipped: the lab needs root");
        return;
    }
    let started = Instant::now();
    let prefix = prefix('a');
    let lab = up(LabSpec::new(&prefix, 3));
    eprintln!("lab up in {:?}", started.elapsed());
    let gw = lab.gw();

    // The gateway starts without forwarding or a default route; those are the product's.
    assert_eq!(sysctl(&lab, &gw, "net.ipv4.ip_forward"), "0");
    assert_eq!(sysctl(&lab, &gw, "net.ipv4.conf.all.rp_filter"), "1");
    assert_eq!(
        sysctl(&lab, &gw, "net.ipv4.conf.wan1.accept_redirects"),
        "0"
    );
    assert_eq!(sysctl(&lab, &lab.isp(1), "net.ipv4.ip_forward"), "1");
    assert_eq!(
        sysctl(&lab, &lab.inet(), "net.ipv6.conf.all.disable_ipv6"),
        "1"
    );
    let default = ok(
        "route",
        lab.exec_ok(&gw, &["ip", "route", "show", "default"]),
    );
    assert!(
        default.trim().is_empty(),
        "gw has a default route: {default}"
    );

    // The LAN works: client 1 reaches the gateway (nothing listens on port 9: refused, not a timeout).
    let lan = ok(
        "lan probe",
        lab.labtool_exec(
            &lab.client(1),
            &["tcp-whoami", "198.18.0.1:9", "--timeout-ms", "2000"],
        ),
    );
    let lan_err = String::from_utf8_lossy(&lan.stderr);
    assert!(lan_err.contains("refused"), "client 1 -> gw: {lan_err}");

    route_uplink(&lab, 1);
    let seen = ok(
        "tcp whoami",
        lab.tcp_whoami(&gw, Some(lab.uplink_source(1)), Duration::from_secs(3)),
    );
    assert_eq!(*seen.ip(), lab.uplink_source(1), "TCP via uplink 1");

    // Wrong exit: uplink 2's source sent out of uplink 1. ISP 1 receives it and drops it.
    // (The whoami above resolved ISP 1's MAC: an ARP request carrying a foreign sender address
    // would itself go unanswered, as ISP 1's rp_filter finds no way back to that address.)
    let wrong = lab.uplink_source(2).to_string();
    ok(
        "wrong rule",
        lab.exec_ok(
            &gw,
            &[
                "ip", "rule", "add", "from", &wrong, "lookup", "101", "prio", "50",
            ],
        ),
    );
    let before = ok("rx", lab.isp_rx_packets(1));
    let answer = lab.udp_whoami(&gw, Some(lab.uplink_source(2)), Duration::from_millis(900));
    assert!(
        answer.is_err(),
        "ISP 1 forwarded a foreign source: {answer:?}"
    );
    let arrived = ok("rx", lab.isp_rx_packets(1)) - before;
    assert!(
        arrived >= 3,
        "the 3 datagrams should reach ISP 1's down0, saw {arrived} packets"
    );
    ok(
        "rule del",
        lab.exec_ok(&gw, &["ip", "rule", "del", "prio", "50"]),
    );

    // Right exits: each uplink's source comes out at the internet host unchanged.
    for i in 2..=3 {
        route_uplink(&lab, i);
    }
    for i in 1..=3 {
        let seen = ok(
            "tcp whoami",
            lab.tcp_whoami(&gw, Some(lab.uplink_source(i)), Duration::from_secs(3)),
        );
        assert_eq!(*seen.ip(), lab.uplink_source(i), "TCP via uplink {i}");
    }
    let seen = ok(
        "udp whoami",
        lab.udp_whoami(&gw, Some(lab.uplink_source(3)), Duration::from_secs(2)),
    );
    assert_eq!(*seen.ip(), lab.uplink_source(3));
    let body = ok(
        "http",
        lab.exec_ok(
            &gw,
            &[
                &lab.labtool().to_string_lossy(),
                "http-get",
                "198.18.9.1:8080",
                "--bind",
                &lab.uplink_source(2).to_string(),
            ],
        ),
    );
    assert!(body.starts_with("198.18.2.2:"), "HTTP whoami: {body:?}");

    // DNS through uplink 1.
    let dns = ok(
        "dns",
        lab.exec_ok(
            &gw,
            &[
                &lab.labtool().to_string_lossy(),
                "dns",
                &lab::DNS_ADDR.to_string(),
                "www.lab.example",
                "--bind",
                &lab.uplink_source(1).to_string(),
            ],
        ),
    );
    assert_eq!(dns.trim(), lab::SERVER_ADDR.to_string());

    // Shaping: uplinks 1 (20 Mbit/s) and 3 (10 Mbit/s) at once, 3 s each. TCP payload is ~95%
    // of the tbf rate (headers), so the bounds are loose around that.
    let (fast, slow) = std::thread::scope(|s| {
        let fast = s.spawn(|| lab.download(&gw, Some(lab.uplink_source(1)), 3.0));
        let slow = s.spawn(|| lab.download(&gw, Some(lab.uplink_source(3)), 3.0));
        (fast.join(), slow.join())
    });
    let fast = ok(
        "download 1",
        fast.unwrap_or_else(|_| Err(anyhow::anyhow!("panicked"))),
    );
    let slow = ok(
        "download 3",
        slow.unwrap_or_else(|_| Err(anyhow::anyhow!("panicked"))),
    );
    eprintln!(
        "uplink 1: {:.2} Mbit/s, uplink 3: {:.2} Mbit/s",
        fast.mbit_per_s, slow.mbit_per_s
    );
    assert!(
        (14.0..=21.0).contains(&fast.mbit_per_s),
        "uplink 1 (20 Mbit/s) gave {fast:?}"
    );
    assert!(
        (7.0..=10.5).contains(&slow.mbit_per_s),
        "uplink 3 (10 Mbit/s) gave {slow:?}"
    );

    // Down removes every namespace and the state dir; dropping afterwards is harmless.
    ok("down", Lab::down(&prefix));
    assert!(ok("list", lab::find_namespaces(&prefix)).is_empty());
    assert!(!lab::state_dir(&prefix).exists());
    drop(lab);
    eprintln!("total {:?}", started.elapsed());
}

#[test]
fn same_subnet_uplinks_reach_their_own_isp() {
    if !is_root() {
        eprintln!("skipped: the lab needs root");
        return;
    }
    let prefix = prefix('b');
    let mut spec = LabSpec::new(&prefix, 3);
    spec.same_subnet = true;
    spec.rates_mbit.clear();
    let lab = up(spec);
    let gw = lab.gw();

    let addr = |ns: &str, dev: &str| {
        ok(
            "addr",
            lab.exec_ok(ns, &["ip", "-br", "-4", "addr", "show", "dev", dev]),
        )
    };
    assert!(addr(&gw, "wan1").contains("198.18.1.2/24"));
    assert!(addr(&gw, "wan2").contains("198.18.1.3/24"));
    assert!(addr(&gw, "wan3").contains("198.18.3.2/24"));
    assert!(addr(&lab.isp(1), "down0").contains("198.18.1.1/24"));
    assert!(addr(&lab.isp(2), "down0").contains("198.18.1.1/24"));
    assert_eq!(lab.uplink_gateway(1), lab.uplink_gateway(2));
    assert_eq!(lab.uplink_source(2), Ipv4Addr::new(198, 18, 1, 3));
    let config = lab.balancer_config_toml();
    assert!(
        config.contains("interface = \"wan2\"\ngateway = \"198.18.1.1\"\nsource = \"198.18.1.3\"")
    );

    // Same gateway address, two wires: each source gets through its own ISP (the other ISP
    // would drop it), and the ISP that carried it counts the packets.
    for i in 1..=2 {
        route_uplink(&lab, i);
    }
    for i in 1..=2 {
        let other = 3 - i;
        let before = (
            ok("rx", lab.isp_rx_packets(i)),
            ok("rx", lab.isp_rx_packets(other)),
        );
        let seen = ok(
            "tcp whoami",
            lab.tcp_whoami(&gw, Some(lab.uplink_source(i)), Duration::from_secs(3)),
        );
        assert_eq!(*seen.ip(), lab.uplink_source(i), "via uplink {i}");
        let after = (
            ok("rx", lab.isp_rx_packets(i)),
            ok("rx", lab.isp_rx_packets(other)),
        );
        assert!(after.0 - before.0 >= 3, "ISP {i} carried the connection");
        assert!(
            after.1 - before.1 < 3,
            "ISP {other} saw traffic of uplink {i}"
        );
    }
}
