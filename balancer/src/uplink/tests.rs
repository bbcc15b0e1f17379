use std::collections::BTreeMap;

use super::*;
use crate::{
    plan::{self, Strictness},
    routing::{Route, RouteScope},
};

const LAN: &str = "[lan]\ninterfaces = [\"lan0\"]\nnetworks = [\"198.18.0.0/24\"]\n";

fn config(uplinks: &str) -> Config {
    Config::parse(&format!("{LAN}{uplinks}")).unwrap()
}

fn link(index: u32, name: &str, ethernet: bool) -> Link {
    Link {
        interface: Interface {
            index,
            name: name.into(),
        },
        up: true,
        carrier: true,
        mtu: 1500,
        raw_ip: !ethernet,
    }
}

fn main_default(ifindex: u32, name: &str, gateway: &str, metric: u32) -> Route {
    Route {
        table: MAIN_TABLE,
        destination: "0.0.0.0/0".parse().unwrap(),
        metric,
        kind: RouteKind::Unicast,
        gateway: Some(gateway.parse().unwrap()),
        interface: Some(Interface {
            index: ifindex,
            name: name.into(),
        }),
        preferred_source: None,
        scope: RouteScope::Universe,
        protocol: 16,
    }
}

fn observed(links: Vec<Link>, addresses: Vec<Address>, routes: Vec<Route>) -> Observed {
    let mut all = vec![link(2, "lan0", true)];
    all.extend(links);
    let mut addrs = vec![Address::new(2, "198.18.0.1/24".parse().unwrap())];
    addrs.extend(addresses);
    Observed {
        links: all,
        addresses: addrs,
        routes,
        rules: vec![],
        sysctls: BTreeMap::new(),
        local_port_range: Some((32768, 60999)),
        down: vec![],
    }
}

#[test]
fn a_dhcp_uplink_learns_source_and_gateway_from_the_interface_and_main() {
    let config = config("[[uplink]]\nname = \"cable\"\ninterface = \"wan1\"\n");
    let mut secondary = Address::new(3, "198.18.1.9/24".parse().unwrap());
    secondary.primary = false;
    let observed = observed(
        vec![link(3, "wan1", true)],
        vec![Address::new(3, "198.18.1.2/24".parse().unwrap()), secondary],
        vec![
            main_default(3, "wan1", "198.18.1.1", 1024),
            main_default(3, "wan1", "198.18.1.254", 2048),
        ],
    );
    let state = &resolve(&config, &observed, &[])[0];
    assert_eq!(state.source, Some("198.18.1.2".parse().unwrap()));
    assert_eq!(
        state.gateway,
        Some("198.18.1.1".parse().unwrap()),
        "lowest metric"
    );
    assert_eq!(state.connected, Some("198.18.1.0/24".parse().unwrap()));
    assert!(state.usable, "{:?}", state.stages);
    assert!(state.stages.addressed.reason.contains("learned"));
    let desired = plan::desired(&config, &observed, Strictness::Strict).unwrap();
    let shown: Vec<String> = desired.routes.iter().map(|r| r.to_string()).collect();
    assert!(
        shown
            .contains(&"default via 198.18.1.1 dev wan1 src 198.18.1.2 table 2001 proto 77".into()),
        "{shown:#?}"
    );
    let rules: Vec<String> = desired.rules.iter().map(|r| r.to_string()).collect();
    assert!(rules.contains(&"priority 10301 from 198.18.1.2/32 lookup 2001 proto 77".into()));
}

#[test]
fn an_ethernet_uplink_without_a_default_route_waits_and_check_accepts_it() {
    let config = config("[[uplink]]\nname = \"cable\"\ninterface = \"wan1\"\n");
    let observed = observed(
        vec![link(3, "wan1", true)],
        vec![Address::new(3, "198.18.1.2/24".parse().unwrap())],
        vec![],
    );
    let state = &resolve(&config, &observed, &[])[0];
    assert!(!state.routable && !state.usable);
    assert!(
        state
            .stages
            .addressed
            .reason
            .contains("waiting for a gateway"),
        "{:?}",
        state.stages
    );
    let desired = plan::desired(&config, &observed, Strictness::Strict).unwrap();
    assert!(
        desired
            .routes
            .iter()
            .all(|r| r.table != 2001 || r.kind == RouteKind::Unreachable),
        "only the terminal route: {:#?}",
        desired.routes
    );
    assert_eq!(desired.unavailable.len(), 1);
}

#[test]
fn a_point_to_point_uplink_uses_its_peer_and_a_raw_ip_one_needs_no_gateway() {
    let config = config(
        "[[uplink]]\nname = \"dsl\"\ninterface = \"ppp0\"\n[[uplink]]\nname = \"lte\"\ninterface = \"wwan0\"\n",
    );
    let mut ppp = Address::new(3, "198.19.23.1/32".parse().unwrap());
    ppp.peer = Some("198.19.23.254".parse().unwrap());
    let observed = observed(
        vec![link(3, "ppp0", false), link(4, "wwan0", false)],
        vec![ppp, Address::new(4, "198.19.24.7/32".parse().unwrap())],
        vec![],
    );
    let states = resolve(&config, &observed, &[]);
    assert_eq!(states[0].gateway, Some("198.19.23.254".parse().unwrap()));
    assert_eq!(
        states[0].connected,
        Some("198.19.23.254/32".parse().unwrap())
    );
    assert_eq!(states[1].gateway, None);
    assert!(states[1].usable, "{:?}", states[1].stages);
    let desired = plan::desired(&config, &observed, Strictness::Strict).unwrap();
    let shown: Vec<String> = desired.routes.iter().map(|r| r.to_string()).collect();
    for expected in [
        "default via 198.19.23.254 dev ppp0 src 198.19.23.1 table 2001 proto 77",
        "198.19.23.254/32 dev ppp0 scope link src 198.19.23.1 table 2001 proto 77",
        "default dev wwan0 scope link src 198.19.24.7 table 2002 proto 77",
    ] {
        assert!(
            shown.contains(&expected.to_string()),
            "{expected}: {shown:#?}"
        );
    }
}

#[test]
fn explicit_values_keep_todays_checks_and_a_slash_31_gateway_is_a_host() {
    let slash31 = config(
        "[[uplink]]\nname = \"fibre\"\ninterface = \"wan1\"\nsource = \"198.18.1.0\"\ngateway = \"198.18.1.1\"\n",
    );
    let observed31 = observed(
        vec![link(3, "wan1", true)],
        vec![Address::new(3, "198.18.1.0/31".parse().unwrap())],
        vec![],
    );
    assert!(plan::desired(&slash31, &observed31, Strictness::Strict).is_ok());
    let wrong = config(
        "[[uplink]]\nname = \"cable\"\ninterface = \"wan1\"\nsource = \"198.18.1.2\"\ngateway = \"198.18.7.1\"\n",
    );
    let observed24 = observed(
        vec![link(3, "wan1", true)],
        vec![Address::new(3, "198.18.1.2/24".parse().unwrap())],
        vec![],
    );
    let error = plan::desired(&wrong, &observed24, Strictness::Strict).unwrap_err();
    assert_eq!(error.key, "uplink[0].gateway");
    assert!(
        error.message.contains("not a host in wan1's subnet"),
        "{error}"
    );
}

#[test]
fn an_absent_interface_is_an_error_only_without_hotplug() {
    let plain = config("[[uplink]]\nname = \"lte\"\ninterface = \"wwan0\"\n");
    let none = observed(vec![], vec![], vec![]);
    let error = plan::desired(&plain, &none, Strictness::Strict).unwrap_err();
    assert_eq!(error.key, "uplink[0].interface");
    assert!(error.message.contains("hotplug"), "{error}");
    let hotplug = config("[[uplink]]\nname = \"lte\"\ninterface = \"wwan0\"\nhotplug = true\n");
    let desired = plan::desired(&hotplug, &none, Strictness::Strict).unwrap();
    assert!(
        desired
            .sysctls
            .iter()
            .all(|(key, _)| key.interface().is_none())
    );
    let state = &desired.uplinks[0];
    assert!(!state.stages.present.ok && state.stages.configured.ok);
    assert!(
        state
            .unavailable()
            .unwrap()
            .contains("joins when it appears")
    );
}

#[test]
fn the_health_verdict_takes_an_uplink_out_of_the_rotation_but_keeps_its_routes() {
    let config =
        config("[[uplink]]\nname = \"cable\"\ninterface = \"wan1\"\ngateway = \"198.18.1.1\"\n");
    let observed = observed(
        vec![link(3, "wan1", true)],
        vec![Address::new(3, "198.18.1.2/24".parse().unwrap())],
        vec![],
    );
    let state = &resolve(&config, &observed, &[1])[0];
    assert!(state.routable && !state.usable);
    assert!(!state.stages.health.ok);
    assert_eq!(
        state.unavailable().as_deref(),
        Some("judged down by the health checks")
    );
}
