//! The control plane in the lab: real daemons in real namespaces, real connections, and the
//! kernel state read back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use balancer_tests::lab::{Lab, LabSpec, RpFilter};
use common::*;

#[test]
fn every_uplink_carries_its_own_source_and_restarts_adopt_without_duplicates() {
    let lab = Lab::up(LabSpec::new(&prefix("cp"), 3)).unwrap();
    let config = write_config(&lab, "balancer.toml", &lab.balancer_config_toml());
    let pristine = snapshot(&lab);
    assert!(
        lab.tcp_whoami(
            &lab.gw(),
            Some(lab.uplink_source(1)),
            Duration::from_millis(500)
        )
        .is_err(),
        "before the balancer runs, nothing may reach the internet (no default route in main)"
    );

    let mut daemon = start_daemon(&lab, &config);
    for i in 1..=3 {
        assert_leaves_by(&lab, Some(lab.uplink_source(i)), i, lab.uplink_source(i));
    }
    // The gateway's own unbound traffic leaves by the heaviest uplink (isp1, weight 2) with its address.
    assert_leaves_by(&lab, None, 1, lab.uplink_source(1));

    let rules = owned_rules(&lab);
    let routes = owned_routes(&lab);
    assert_eq!(
        rules.len(),
        1 + 3 * 2 + 2,
        "LAN, from+fwmark per uplink, fallback pair: {rules:#?}"
    );
    assert_eq!(
        routes.len(),
        3 * 4 + 1,
        "4 routes per uplink table plus the egress table: {routes:#?}"
    );
    for i in 1..=3 {
        let table = lab
            .exec_ok(
                &lab.gw(),
                &["ip", "route", "show", "table", &(2000 + i).to_string()],
            )
            .unwrap();
        let default = format!(
            "default via {} dev wan{i} proto 77 src {}",
            lab.uplink_gateway(i),
            lab.uplink_source(i)
        );
        assert!(table.contains(&default), "table {}: {table}", 2000 + i);
        assert!(
            table.contains("198.18.0.0/24 dev lan0"),
            "LAN route duplicated into table {}: {table}",
            2000 + i
        );
        assert!(
            table.contains("unreachable default"),
            "table {} must end the lookup: {table}",
            2000 + i
        );
    }
    let settings = lab
        .exec_ok(
            &lab.gw(),
            &[
                "sysctl",
                "-n",
                "net.ipv4.ip_forward",
                "net.ipv4.conf.wan2.arp_filter",
                "net.ipv4.conf.wan2.src_valid_mark",
                "net.ipv4.conf.all.rp_filter",
            ],
        )
        .unwrap();
    assert_eq!(
        settings.split_whitespace().collect::<Vec<_>>(),
        ["1", "1", "1", "1"],
        "rp_filter stays strict"
    );

    // SIGTERM leaves everything in place and traffic keeps flowing.
    let exit = daemon.terminate(Duration::from_secs(5)).unwrap();
    assert!(exit.success(), "daemon exit: {exit}\n{}", daemon.log());
    assert_eq!(owned_rules(&lab), rules);
    assert_eq!(owned_routes(&lab), routes);
    assert_leaves_by(&lab, Some(lab.uplink_source(2)), 2, lab.uplink_source(2));

    // A second run adopts: nothing added, nothing removed, no duplicates.
    let mut second = start_daemon(&lab, &config);
    assert!(
        second.log().contains("changed=0"),
        "adoption must change nothing:\n{}",
        second.log()
    );
    assert_eq!(owned_rules(&lab), rules);
    assert_eq!(owned_routes(&lab), routes);

    // The same after SIGKILL, which gives the daemon no chance to clean up.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    second
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("killed daemon must end");
    let mut third = start_daemon(&lab, &config);
    assert!(
        third.log().contains("changed=0"),
        "adoption after SIGKILL:\n{}",
        third.log()
    );
    assert_eq!(owned_rules(&lab), rules);
    assert_eq!(owned_routes(&lab), routes);

    // The daemon heals what someone removes behind its back.
    lab.exec_ok(
        &lab.gw(),
        &["ip", "route", "del", "default", "table", "2003"],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        owned_routes(&lab),
        routes,
        "the daemon must restore a deleted route"
    );

    // `down` refuses while the daemon runs, then removes everything and restores the settings.
    let refused = balancer(&lab, &["down"]);
    assert!(!refused.status.success());
    third.terminate(Duration::from_secs(5)).unwrap();
    let down = balancer(&lab, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert_eq!(
        snapshot(&lab),
        pristine,
        "after `down` the kernel must be as before the first run"
    );
}

#[test]
fn same_subnet_uplinks_leave_by_their_own_wire_and_arp_answers_only_for_the_owner() {
    // Loose rp_filter, so what stops ARP flux here is arp_filter and the from-rules, not rp_filter.
    let mut spec = LabSpec::new(&prefix("ss"), 2);
    spec.same_subnet = true;
    spec.rp_filter = RpFilter::Loose;
    let lab = Lab::up(spec).unwrap();
    assert_eq!(lab.uplink_gateway(1), lab.uplink_gateway(2));
    let wan2_mac = mac_of(&lab, "wan2");
    let isp2 = lab.isp(2);

    // Before: the gateway answers ISP 2's ARP for uplink 1's address on the wrong wire (ARP flux).
    assert_eq!(
        resolve_from_isp(&lab, &isp2, lab.uplink_source(1)),
        Some(wan2_mac.clone()),
        "the lab must show ARP flux first"
    );

    let config = write_config(&lab, "balancer.toml", &lab.balancer_config_toml());
    let _daemon = start_daemon(&lab, &config);
    assert_leaves_by(&lab, Some(lab.uplink_source(1)), 1, lab.uplink_source(1));
    assert_leaves_by(&lab, Some(lab.uplink_source(2)), 2, lab.uplink_source(2));

    lab.exec_ok(&isp2, &["ip", "neigh", "flush", "dev", "down0"])
        .unwrap();
    assert_eq!(
        resolve_from_isp(&lab, &isp2, lab.uplink_source(1)),
        None,
        "no answer for an address wan2 does not own"
    );
    assert_eq!(
        resolve_from_isp(&lab, &isp2, lab.uplink_source(2)),
        Some(wan2_mac),
        "wan2 still answers for its own"
    );
}

fn mac_of(lab: &Lab, interface: &str) -> String {
    let json = lab
        .exec_ok(&lab.gw(), &["ip", "-j", "link", "show", "dev", interface])
        .unwrap();
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value[0]["address"].as_str().unwrap().to_string()
}

/// Makes the ISP router ARP for `address` (by sending it a datagram) and returns the MAC it
/// learned, if any.
fn resolve_from_isp(lab: &Lab, isp: &str, address: std::net::Ipv4Addr) -> Option<String> {
    let target = format!("{address}:9");
    let _ = lab.labtool_exec(isp, &["udp-whoami", &target, "--timeout-ms", "1500"]);
    let json = lab
        .exec_ok(
            isp,
            &[
                "ip",
                "-j",
                "neigh",
                "show",
                "to",
                &address.to_string(),
                "dev",
                "down0",
            ],
        )
        .unwrap();
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value
        .get(0)
        .and_then(|entry| entry["lladdr"].as_str())
        .map(str::to_string)
}

#[test]
fn eight_uplinks_with_arbitrary_interface_names() {
    let mut spec = LabSpec::new(&prefix("u8"), 8);
    spec.rates_mbit = Vec::new();
    let lab = Lab::up(spec).unwrap();
    // Names with dots and dashes, as VLAN and PPP interfaces have: the settings paths must cope.
    let renames = [("wan3", "eth0.103"), ("wan8", "ppp-lte")];
    for (from, to) in renames {
        let gw = lab.gw();
        lab.exec_ok(&gw, &["ip", "link", "set", from, "down"])
            .unwrap();
        lab.exec_ok(&gw, &["ip", "link", "set", from, "name", to])
            .unwrap();
        lab.exec_ok(&gw, &["ip", "link", "set", to, "up"]).unwrap();
    }
    let mut text = lab.balancer_config_toml();
    for (from, to) in renames {
        text = text.replace(
            &format!("interface = \"{from}\""),
            &format!("interface = \"{to}\""),
        );
    }
    let config = write_config(&lab, "balancer.toml", &text);
    let pristine = snapshot(&lab);
    let daemon = start_daemon(&lab, &config);
    for i in 1..=8 {
        assert_leaves_by(&lab, Some(lab.uplink_source(i)), i, lab.uplink_source(i));
    }
    let arp_filter = lab
        .exec_ok(
            &lab.gw(),
            &["cat", "/proc/sys/net/ipv4/conf/eth0.103/arp_filter"],
        )
        .unwrap();
    assert_eq!(arp_filter.trim(), "1");
    drop(daemon);
    assert!(balancer(&lab, &["down"]).status.success());
    assert_eq!(snapshot(&lab), pristine);
}

#[test]
fn a_downed_uplink_does_not_stall_the_others_and_is_restored_when_it_returns() {
    let lab = Lab::up(LabSpec::new(&prefix("dn"), 2)).unwrap();
    let config = write_config(&lab, "balancer.toml", &lab.balancer_config_toml());
    let _daemon = start_daemon(&lab, &config);
    let gw = lab.gw();

    lab.exec_ok(&gw, &["ip", "link", "set", "wan2", "down"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    // Uplink 1 is still maintained: a route removed behind the daemon's back comes back.
    lab.exec_ok(&gw, &["ip", "route", "del", "default", "table", "2001"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_leaves_by(&lab, Some(lab.uplink_source(1)), 1, lab.uplink_source(1));
    let status: serde_json::Value =
        serde_json::from_slice(&balancer(&lab, &["status", "--json"]).stdout).unwrap();
    assert_eq!(
        status["uplinks"][1]["unavailable"], "wan2 is down",
        "{status:#}"
    );
    assert!(status["last_error"].is_null(), "{status:#}");
    let table = lab
        .exec_ok(&gw, &["ip", "route", "show", "table", "2002"])
        .unwrap();
    assert_eq!(
        table.trim(),
        "unreachable default proto 77 metric 4294967295",
        "wan2's traffic is refused, not leaked"
    );

    lab.exec_ok(&gw, &["ip", "link", "set", "wan2", "up"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_leaves_by(&lab, Some(lab.uplink_source(2)), 2, lab.uplink_source(2));
    let status: serde_json::Value =
        serde_json::from_slice(&balancer(&lab, &["status", "--json"]).stdout).unwrap();
    assert!(status["uplinks"][1]["unavailable"].is_null(), "{status:#}");
}
