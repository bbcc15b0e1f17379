//! The gateway is more than an uplink switch, in the lab: a branch office behind another
//! interface stays reachable from the LAN with the clients' own addresses (connected, static,
//! and a route added while the daemon runs, or in a VPN's table); raw packets of another
//! protocol and stray TCP from the LAN reach no ISP and are counted; DHCP and multicast create
//! no flow; `check` warns about a masquerade rule on an uplink, not about a DNAT forward. (Port
//! forwards and the gateway's own services are in `office_inbound.rs`.)
//!
//! Root only. Each test builds its own lab (prefix `bal-of?<pid>`); the branch office is one
//! more namespace, `<prefix>-br`, deleted by its guard.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use balancer_tests::{
    lab::{Lab, LabSpec, SERVER_ADDR},
    process::ChildGuard,
};
use common::{office::*, transparent::*, *};

/// The branch office's side: 198.18.20.2 on the link, 198.18.21.1 behind a static route,
/// 198.18.22.1 behind a route added later.
const BRANCH_LINK: Ipv4Addr = Ipv4Addr::new(198, 18, 20, 2);
const BRANCH_STATIC: Ipv4Addr = Ipv4Addr::new(198, 18, 21, 1);
const BRANCH_LATER: Ipv4Addr = Ipv4Addr::new(198, 18, 22, 1);
/// Behind a route in table 220 only, as strongSwan installs its tunnels' routes.
const BRANCH_VPN: Ipv4Addr = Ipv4Addr::new(198, 18, 23, 1);

/// A namespace behind the gateway's `office0` (a veth), with whoami servers on its addresses.
struct Branch {
    ns: String,
    _servers: Vec<ChildGuard>,
}

impl Branch {
    fn up(lab: &Lab) -> Branch {
        let ns = format!("{}-br", lab.prefix());
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &ns]);
        let mut branch = Branch {
            ns: ns.clone(),
            _servers: Vec::new(),
        };
        let gw = lab.gw();
        ip(&[
            "-n", &gw, "link", "add", "office0", "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ]);
        for cmd in ["addr add 198.18.20.1/24 dev office0", "link set office0 up"] {
            let args: Vec<&str> = ["-n", gw.as_str()]
                .into_iter()
                .chain(cmd.split(' '))
                .collect();
            ip(&args);
        }
        for cmd in [
            "link set lo up",
            "addr add 198.18.20.2/24 dev eth0",
            "addr add 198.18.21.1/32 dev lo",
            "addr add 198.18.22.1/32 dev lo",
            "addr add 198.18.23.1/32 dev lo",
            "link set eth0 up",
            "route add default via 198.18.20.1",
        ] {
            let args: Vec<&str> = ["-n", ns.as_str()]
                .into_iter()
                .chain(cmd.split(' '))
                .collect();
            ip(&args);
        }
        let tool = lab.labtool().to_string_lossy().into_owned();
        for addr in [BRANCH_LINK, BRANCH_STATIC, BRANCH_LATER, BRANCH_VPN] {
            let addr = addr.to_string();
            branch
                ._servers
                .push(lab.spawn(&ns, &[&tool, "serve", "--addr", &addr]).unwrap());
        }
        branch
    }
}

impl Drop for Branch {
    fn drop(&mut self) {
        self._servers.clear();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
    }
}

#[test]
fn a_branch_office_stays_reachable_untranslated() {
    let gw = Gateway::up("ofa", |p| LabSpec::new(p, 3));
    let lab = &gw.lab;
    let branch = Branch::up(lab);
    lab.exec_ok(
        &lab.gw(),
        &["ip", "route", "add", "198.18.21.1/32", "via", "198.18.20.2"],
    )
    .unwrap();
    for (what, server) in [("connected", BRANCH_LINK), ("static", BRANCH_STATIC)] {
        let server = SocketAddrV4::new(server, WHOAMI);
        // The daemon follows the new interface and route within its debounce.
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in 1..=2 {
            for udp in [false, true] {
                let seen = loop {
                    match whoami(lab, &lab.client(c), udp, server) {
                        Ok(seen) => break seen,
                        Err(e) if Instant::now() > deadline => panic!(
                            "client {c} to the branch ({what} route, udp={udp}): {e}\n{}",
                            gw.diagnostics()
                        ),
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                };
                assert_eq!(
                    *seen.ip(),
                    lab.client_addr(c),
                    "the branch must see client {c}'s own address ({what} route)"
                );
            }
        }
    }
    // Office routes are in every uplink table, so replies and bound sockets reach them.
    for table in ["2001", "2002", "2003"] {
        let routes = lab
            .exec_ok(&lab.gw(), &["ip", "route", "show", "table", table])
            .unwrap();
        assert!(
            routes.contains("198.18.20.0/24 dev office0"),
            "{table}: {routes}"
        );
        assert!(
            routes.contains("198.18.21.1 via 198.18.20.2 dev office0"),
            "{table}: {routes}"
        );
    }

    // Before its route exists, the third network is the internet's: translated, and no ISP
    // knows it. Added while the daemon runs, it works within 2 s, untranslated.
    let later = SocketAddrV4::new(BRANCH_LATER, WHOAMI);
    assert!(whoami(lab, &lab.client(1), false, later).is_err());
    lab.exec_ok(
        &lab.gw(),
        &["ip", "route", "add", "198.18.22.0/24", "via", "198.18.20.2"],
    )
    .unwrap();
    let added = Instant::now();
    let seen = loop {
        if let Ok(seen) = whoami(lab, &lab.client(1), false, later) {
            break seen;
        }
        assert!(
            added.elapsed() < Duration::from_secs(4),
            "the route added at run time was not followed\n{}",
            gw.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = added.elapsed();
    eprintln!("route added at run time: reachable after {took:?}");
    assert!(
        took <= Duration::from_secs(2),
        "followed only after {took:?}"
    );
    assert_eq!(*seen.ip(), lab.client_addr(1));
    let udp = whoami(lab, &lab.client(2), true, later).unwrap();
    assert_eq!(*udp.ip(), lab.client_addr(2));
    drop(branch);
}

/// A VPN daemon's own table (220, like strongSwan's, here with its rule after balancer's): its
/// routes are office destinations once the table is listed in `[lan] route_tables`. Without
/// that, the LAN's packets to the branch are balanced out of an uplink and lost.
#[test]
fn a_vpn_table_in_route_tables_is_an_office_destination() {
    let mut gw = Gateway::up("off", |p| LabSpec::new(p, 2));
    let branch = Branch::up(&gw.lab);
    let lab = &gw.lab;
    let gw_ns = lab.gw();
    for argv in [
        &[
            "ip",
            "route",
            "add",
            "198.18.23.0/24",
            "via",
            "198.18.20.2",
            "table",
            "220",
        ][..],
        &["ip", "rule", "add", "priority", "20000", "lookup", "220"][..],
    ] {
        lab.exec_ok(&gw_ns, argv).unwrap();
    }
    let vpn = SocketAddrV4::new(BRANCH_VPN, WHOAMI);
    assert!(
        whoami(lab, &lab.client(1), false, vpn).is_err(),
        "without route_tables the VPN's network is the internet's"
    );

    gw.stop_daemon();
    let lab = &gw.lab;
    let text = lab
        .balancer_config_toml()
        .replacen("[lan]\n", "[lan]\nroute_tables = [220]\n", 1);
    assert!(text.contains("route_tables"), "{text}");
    let config = write_config(lab, "balancer-vpn.toml", &text);
    let daemon = start_daemon(lab, &config);
    gw.daemon = Some(daemon);
    wait_for_dataplane(&gw.lab);
    let lab = &gw.lab;
    for c in 1..=2 {
        for udp in [false, true] {
            let seen = whoami(lab, &lab.client(c), udp, vpn).unwrap_or_else(|e| {
                panic!(
                    "client {c} (udp={udp}) to the VPN's table: {e}\n{}",
                    gw.diagnostics()
                )
            });
            assert_eq!(*seen.ip(), lab.client_addr(c), "udp={udp}");
        }
    }
    let copied = lab
        .exec_ok(&lab.gw(), &["ip", "route", "show", "table", "2001"])
        .unwrap();
    assert!(
        copied.contains("198.18.23.0/24 via 198.18.20.2 dev office0"),
        "{copied}"
    );
    drop(branch);
}

/// Counts, in each ISP, packets arriving from the gateway with a source other than the
/// uplink's own address: what the ISP drops, and what must never leave.
fn count_wrong_sources(lab: &Lab) {
    for i in 1..=lab.uplinks() {
        let ruleset = format!(
            "table ip wrongsrc {{\n chain pre {{\n type filter hook prerouting priority -300;\n\
             iifname \"down0\" ip saddr != {} counter\n }}\n}}\n",
            lab.uplink_source(i)
        );
        nft(lab, &lab.isp(i), &ruleset);
    }
}

fn wrong_sources(lab: &Lab) -> Vec<u64> {
    (1..=lab.uplinks())
        .map(|i| {
            let json = lab
                .exec_ok(
                    &lab.isp(i),
                    &["nft", "-j", "list", "table", "ip", "wrongsrc"],
                )
                .unwrap();
            let value: serde_json::Value = serde_json::from_str(&json).unwrap();
            value["nftables"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|item| item["rule"]["expr"].as_array())
                .flatten()
                .filter_map(|expr| expr["counter"]["packets"].as_u64())
                .sum()
        })
        .collect()
}

#[test]
fn untranslatable_lan_traffic_reaches_no_isp_and_non_unicast_gets_no_flow() {
    let gw = Gateway::up("ofc", |p| LabSpec::new(p, 3));
    let lab = &gw.lab;
    count_wrong_sources(lab);
    let client = lab.client(1);
    let server = SERVER_ADDR.to_string();
    let send = |args: &[&str]| {
        let out = lab.labtool_exec(&client, args).unwrap();
        assert!(
            out.status.success(),
            "labtool {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    send(&["raw-send", &server, "--protocol", "47", "--count", "100"]);
    send(&[
        "raw-send",
        &server,
        "--stray-tcp",
        "--dst-port",
        "9000",
        "--count",
        "100",
    ]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        wrong_sources(lab),
        [0, 0, 0],
        "LAN packets left with their private source\n{}",
        gw.diagnostics()
    );
    assert!(reason(lab, "drop_other_protocol") >= 100);
    assert!(reason(lab, "drop_tcp_without_flow") >= 100);

    // DHCP from 0.0.0.0 and multicast: no flow, no port.
    let flows_before = flow_entries(lab);
    send(&["raw-send", "--dhcp", "eth0", "--count", "5"]);
    // Five mDNS-like datagrams; nobody answers, which is fine.
    lab.labtool_exec(
        &client,
        &[
            "udp-whoami",
            "224.0.0.251:5353",
            "--attempts",
            "5",
            "--timeout-ms",
            "250",
        ],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        flow_entries(lab),
        flows_before,
        "non-unicast traffic got a flow"
    );
    assert!(
        reason(lab, "pass_non_unicast") >= 10,
        "{}",
        gw.diagnostics()
    );
    assert_eq!(wrong_sources(lab), [0, 0, 0]);

    // Ordinary traffic is translated as before.
    let seen = lab
        .tcp_whoami(&client, None, Duration::from_secs(3))
        .unwrap();
    assert!(gw.uplink_sources().contains(seen.ip()));

    // The counters do see a wrong source: the gateway's own socket bound to its LAN address
    // leaves by its default uplink untranslated (the ISP drops it; nobody answers).
    let _ = lab.udp_whoami(
        &lab.gw(),
        Some(balancer_tests::lab::LAN_GATEWAY),
        Duration::from_millis(300),
    );
    assert!(
        wrong_sources(lab).iter().sum::<u64>() >= 1,
        "the ISPs' counters saw nothing"
    );
}

#[test]
fn check_warns_about_masquerade_on_an_uplink_not_about_a_forward() {
    let spec = LabSpec {
        servers: false,
        ..LabSpec::new(&prefix("ofd"), 2)
    };
    let lab = Lab::up(spec).unwrap_or_else(|e| panic!("lab up: {e:#}"));
    let config = write_config(&lab, "balancer.toml", &lab.balancer_config_toml());
    let check = || {
        let out = balancer(&lab, &["check", "-c", &config]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    nft(
        &lab,
        &lab.gw(),
        "table ip office {\n chain pre {\n type nat hook prerouting priority dstnat;\n\
         iifname \"wan1\" tcp dport 8080 dnat to 198.18.0.11:9000\n }\n\
         chain post {\n type nat hook postrouting priority srcnat;\n oifname \"tun0\" masquerade\n }\n}\n",
    );
    let quiet = check();
    assert!(
        !quiet.contains("nftables"),
        "a DNAT forward alone must not warn: {quiet}"
    );
    nft(
        &lab,
        &lab.gw(),
        "add rule ip office post oifname \"wan2\" masquerade\n",
    );
    let warned = check();
    assert!(
        warned.contains("nftables chain `ip office post`") && warned.contains("masquerade to wan2"),
        "{warned}"
    );
    assert!(!warned.contains("wan1"), "{warned}");
}
