//! Uplinks as they come in the field, in the lab: a raw-IP point-to-point uplink (TUN devices,
//! no Ethernet header, `A peer B`, what PPPoE's `ppp0` or an LTE modem's `wwan0` is to tc) and a
//! DHCP-addressed one (dnsmasq at the ISP, udhcpc on the gateway), beside Ethernet: transparent,
//! proxied and the gateway's own traffic, and the lab's redial and renumbering. The raw-IP and
//! DHCP uplinks are configured by interface name only: their addresses and gateways are learned.
//! Each ISP forwards only its own uplink's source address, so a connection that arrives with
//! the right source proves the translation (or the gateway's own routing) on that uplink.
//!
//! Root only. Each test builds its own lab (prefix `bal-fu<pid>`) with `balancer run` in it,
//! one at a time under the shared lock of `common::transparent`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use balancer_tests::{
    lab::{DNS_ADDR, Lab, LabSpec, dhcp_route_metric},
    process::{DEFAULT_TIMEOUT, run_bounded},
};
use common::{
    field::{LAN, PROXY, proxied_sources},
    transparent::Gateway,
};

/// wan1 Ethernet, wan2 raw IP, wan3 DHCP; unshaped, so only the kind of link differs.
fn field_lab() -> Gateway {
    Gateway::up_with(
        "fu",
        |p| {
            let mut spec = LabSpec::new(p, 3);
            spec.rates_mbit.clear();
            spec.raw_ip = vec![2];
            spec.dhcp = vec![3];
            spec
        },
        by_interface_config,
    )
}

/// wan1, Ethernet without a default route in main, names its gateway; the raw-IP wan2 and the
/// DHCP wan3 are named by interface only. With the forward proxy on the LAN.
fn by_interface_config(lab: &Lab) -> String {
    let dns = format!("dns = [\"{DNS_ADDR}\"]");
    format!(
        "{LAN}\n[[uplink]]\nname = \"isp1\"\ninterface = \"wan1\"\ngateway = \"{}\"\n{dns}\n\
         \n[[uplink]]\nname = \"lte\"\ninterface = \"wan2\"\n{dns}\n\
         \n[[uplink]]\nname = \"cable\"\ninterface = \"wan3\"\n{dns}\n\
         \n[proxy]\nlisten = \"{PROXY}\"\n",
        lab.uplink_gateway(1)
    )
}

#[test]
fn raw_ip_and_dhcp_uplinks_named_by_interface_carry_transparent_proxied_and_own_traffic() {
    let gw = field_lab();
    let lab = &gw.lab;
    // The lab really built the field's links: no link-layer header on wan2, a leased address
    // and a DHCP default route on wan3.
    let wan2 = lab
        .exec_ok(&lab.gw(), &["ip", "-d", "addr", "show", "dev", "wan2"])
        .unwrap();
    assert!(
        wan2.contains("link/none") && wan2.contains("198.18.2.2 peer 198.18.2.1/32"),
        "{wan2}"
    );
    let main = lab
        .exec_ok(&lab.gw(), &["ip", "route", "show", "default"])
        .unwrap();
    assert!(
        main.contains(&format!(
            "default via 198.18.3.1 dev wan3 metric {}",
            dhcp_route_metric(3)
        )),
        "{main}"
    );

    // What the daemon learned: the raw-IP link's peer and the lease's router are the gateways.
    let status = common::field::status(lab);
    for (row, i) in [(1, 2), (2, 3)] {
        let row = &status["uplinks"][row];
        assert_eq!(row["source"], lab.uplink_source(i).to_string(), "{row:#}");
        assert_eq!(row["gateway"], lab.uplink_gateway(i).to_string(), "{row:#}");
        assert_eq!(row["stages"]["usable"]["ok"], true, "{row:#}");
    }

    // Transparent: new connections from a client are spread over all three, each translated
    // to its uplink's address (any other source is dropped by that ISP).
    let many = lab
        .tcp_many(&lab.client(1), 30, None, Duration::from_secs(2))
        .unwrap();
    assert_eq!(many.failed, 0, "{many:?}\n{}", gw.diagnostics());
    for i in 1..=3 {
        let seen = many
            .sources
            .get(&lab.uplink_source(i))
            .copied()
            .unwrap_or(0);
        // Equal weights; the round-robin cursor is per CPU, so the split is near, not exactly,
        // even.
        assert!(seen >= 5, "uplink {i}: {many:?}\n{}", gw.diagnostics());
    }
    // A transfer on the raw-IP uplink works in both directions, segments and all.
    let streams = lab.streams(&lab.client(2), 6, 2.0, 0.0).unwrap();
    assert_eq!(streams.failed, 0, "{streams:?}");
    assert!(
        streams
            .sources
            .get(&lab.uplink_source(2))
            .is_some_and(|s| s.bytes > 1_000_000),
        "{streams:?}"
    );

    // The gateway's own sockets bound to each uplink's address leave by that uplink.
    for i in 2..=3 {
        let seen = lab
            .tcp_whoami(
                &lab.gw(),
                Some(lab.uplink_source(i)),
                Duration::from_secs(3),
            )
            .unwrap();
        assert_eq!(*seen.ip(), lab.uplink_source(i));
    }

    // Proxied: the proxy binds each upstream connection to an uplink's learned address.
    let seen = proxied_sources(lab, 9);
    for i in 1..=3 {
        let source = lab.uplink_source(i).to_string();
        assert!(
            seen.get(&source).is_some_and(|&n| n >= 2),
            "uplink {i} ({source}) under-used or unused by the proxy: {seen:?}\n{}",
            gw.diagnostics()
        );
    }
    assert_eq!(
        seen.values().sum::<u32>(),
        9,
        "only uplink addresses: {seen:?}"
    );
}

/// Ending a raw-IP uplink's relay deletes both of its interfaces, as a dropped PPP session
/// does; connecting again makes new ones (a new ifindex) that the daemon attaches to.
#[test]
fn a_raw_ip_uplink_that_drops_and_comes_back_carries_traffic_again() {
    let mut gw = field_lab();
    let before = ifindex(&gw, "wan2");
    gw.lab.disconnect_raw_ip(2).unwrap();
    let isp_side = run_bounded(
        Command::new("ip").args(["-n", &gw.lab.isp(2), "link", "show", "dev", "down0"]),
        DEFAULT_TIMEOUT,
    )
    .unwrap();
    assert!(
        !isp_side.status.success(),
        "the ISP's end outlived the relay"
    );
    let (source, peer) = (gw.lab.uplink_source(2), gw.lab.uplink_gateway(2));
    gw.lab.connect_raw_ip(2, source, peer).unwrap();
    assert_ne!(
        ifindex(&gw, "wan2"),
        before,
        "a new device, as after a redial"
    );
    // The daemon follows link events; give it its reconcile delay.
    std::thread::sleep(Duration::from_secs(2));
    let lab = &gw.lab;
    let many = lab
        .tcp_many(&lab.client(1), 30, None, Duration::from_secs(2))
        .unwrap();
    assert_eq!(many.failed, 0, "{many:?}\n{}", gw.diagnostics());
    assert!(
        many.sources.get(&source).copied().unwrap_or(0) >= 5,
        "{many:?}\n{}\n{}",
        gw.diagnostics(),
        gw.daemon_log()
    );
}

fn ifindex(gw: &Gateway, interface: &str) -> u32 {
    let shown = gw
        .lab
        .exec_ok(
            &gw.lab.gw(),
            &["cat", &format!("/sys/class/net/{interface}/ifindex")],
        )
        .unwrap();
    shown.trim().parse().unwrap()
}

/// The lab renumbers its DHCP uplink as an ISP does: the old lease is refused, the client drops
/// the old address and gets the new one, and the ISP now forwards only the new address.
#[test]
fn the_lab_renumbers_a_dhcp_uplink() {
    let mut spec = LabSpec::new(&common::prefix("fn"), 1);
    spec.rates_mbit.clear();
    spec.dhcp = vec![1];
    let mut lab = balancer_tests::lab::Lab::up(spec).unwrap();
    let (old, new) = (lab.uplink_source(1), "198.18.1.7".parse().unwrap());
    lab.renumber_dhcp(1, new).unwrap();
    let shown = lab
        .exec_ok(
            &lab.gw(),
            &["ip", "-4", "-o", "addr", "show", "dev", "wan1"],
        )
        .unwrap();
    assert!(!shown.contains(&format!(" {old}/")), "{shown}");
    // The gateway's own traffic leaves by the DHCP default route with the new address.
    let seen = lab
        .tcp_whoami(&lab.gw(), Some(new), Duration::from_secs(3))
        .unwrap();
    assert_eq!(*seen.ip(), new);
}

/// Two DHCP uplinks, each client installing its own default route in main at a metric of its
/// own, both named by interface only: each learns its gateway from its own route, whatever its
/// metric, and both carry new flows and the gateway's own traffic.
#[test]
fn two_dhcp_uplinks_with_distinct_metrics_each_learn_their_gateway() {
    let gw = Gateway::up_with(
        "f2",
        |p| {
            let mut spec = LabSpec::new(p, 2);
            spec.rates_mbit.clear();
            spec.dhcp = vec![1, 2];
            spec
        },
        |_| {
            format!(
                "{LAN}\n[[uplink]]\nname = \"cable\"\ninterface = \"wan1\"\n\n[[uplink]]\nname = \"fibre\"\ninterface = \"wan2\"\n"
            )
        },
    );
    let lab = &gw.lab;
    let main = lab
        .exec_ok(&lab.gw(), &["ip", "route", "show", "default"])
        .unwrap();
    for i in 1..=2 {
        assert!(
            main.contains(&format!(
                "default via {} dev wan{i} metric {}",
                lab.uplink_gateway(i),
                dhcp_route_metric(i)
            )),
            "{main}"
        );
    }
    let status = common::field::status(lab);
    for i in 1..=2 {
        let row = &status["uplinks"][i - 1];
        assert_eq!(row["source"], lab.uplink_source(i).to_string(), "{row:#}");
        assert_eq!(row["gateway"], lab.uplink_gateway(i).to_string(), "{row:#}");
    }
    let many = lab
        .tcp_many(&lab.client(1), 20, None, Duration::from_secs(2))
        .unwrap();
    assert_eq!(many.failed, 0, "{many:?}\n{}", gw.diagnostics());
    for i in 1..=2 {
        assert!(
            many.sources
                .get(&lab.uplink_source(i))
                .is_some_and(|&n| n >= 5),
            "uplink {i}: {many:?}"
        );
        let seen = lab
            .tcp_whoami(
                &lab.gw(),
                Some(lab.uplink_source(i)),
                Duration::from_secs(3),
            )
            .unwrap();
        assert_eq!(*seen.ip(), lab.uplink_source(i));
    }
}

/// A raw-IP link whose address has no peer (some LTE modems hand out a plain /32): there is no
/// gateway to learn and none is needed; the uplink's routes use the device only, and it
/// carries new flows and the gateway's own traffic with its address.
#[test]
fn a_raw_ip_uplink_without_a_peer_needs_no_gateway() {
    let gw = field_lab();
    let lab = &gw.lab;
    let source = lab.uplink_source(2);
    common::field::ip(
        lab,
        &lab.gw(),
        &[
            "addr flush dev wan2".into(),
            format!("addr add {source}/32 dev wan2"),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    let table = loop {
        let table = lab
            .exec_ok(&lab.gw(), &["ip", "route", "show", "table", "2002"])
            .unwrap();
        if table.contains(&format!(
            "default dev wan2 proto 77 scope link src {source}"
        )) {
            break table;
        }
        assert!(
            Instant::now() < deadline,
            "the uplink's table must route by device only:\n{table}\n{}",
            gw.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !table.contains(" via "),
        "no gateway to route via:\n{table}"
    );
    let row = common::field::status(lab)["uplinks"][1].clone();
    // `status` shows a route by device only as gateway "dev".
    assert_eq!(row["gateway"], "dev", "{row:#}");
    assert_eq!(row["stages"]["usable"]["ok"], true, "{row:#}");
    common::field::wait_for_new_flows_from(lab, source, Duration::from_secs(2));
    let seen = lab
        .tcp_whoami(&lab.gw(), Some(source), Duration::from_secs(3))
        .unwrap();
    assert_eq!(*seen.ip(), source);
}
