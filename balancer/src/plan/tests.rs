use super::*;
use crate::config::Config;

mod office;
mod point_to_point;

const CONFIG: &str = r#"
[lan]
interfaces = ["lan0"]
networks = ["198.18.0.0/24"]

[[uplink]]
name = "dsl1"
interface = "wan1"
gateway = "198.18.1.1"
source = "198.18.1.2"
weight = 2

[[uplink]]
name = "dsl2"
interface = "wan2"
gateway = "198.18.1.1"
source = "198.18.1.3"
"#;

fn link(index: u32, name: &str) -> Link {
    Link {
        interface: Interface {
            index,
            name: name.into(),
        },
        up: true,
        carrier: true,
        mtu: 1500,
        raw_ip: false,
    }
}

fn address(ifindex: u32, network: &str) -> Address {
    Address::new(ifindex, network.parse().unwrap())
}

/// Two uplinks whose modems share one subnet and one gateway address: the hard case.
fn observed() -> Observed {
    let lan_route = Route {
        table: MAIN_TABLE,
        destination: "198.18.0.0/24".parse().unwrap(),
        metric: 0,
        kind: RouteKind::Unicast,
        gateway: None,
        interface: Some(Interface {
            index: 2,
            name: "lan0".into(),
        }),
        preferred_source: Some("198.18.0.1".parse().unwrap()),
        scope: RouteScope::Link,
        protocol: 2,
    };
    Observed {
        links: vec![
            link(1, "lo"),
            link(2, "lan0"),
            link(3, "wan1"),
            link(4, "wan2"),
        ],
        addresses: vec![
            address(2, "198.18.0.1/24"),
            address(3, "198.18.1.2/24"),
            address(4, "198.18.1.3/24"),
        ],
        routes: vec![lan_route],
        rules: vec![],
        sysctls: BTreeMap::new(),
        local_port_range: Some((32768, 60999)),
        down: Vec::new(),
    }
}

/// The observed state after `operations` were applied.
fn applied(mut observed: Observed, operations: &[Operation]) -> Observed {
    for operation in operations {
        match operation {
            Operation::SetSysctl { key, to, .. } => {
                observed.sysctls.insert(key.clone(), to.clone());
            }
            Operation::AddRoute(route) => observed.routes.push(route.clone()),
            Operation::ReplaceRoute { old, new } => {
                observed.routes.retain(|r| r != old);
                observed.routes.push(new.clone());
            }
            Operation::DeleteRoute(route) => observed.routes.retain(|r| r != route),
            Operation::AddRule(rule) => observed.rules.push(rule.clone()),
            Operation::DeleteRule(rule) => observed.rules.retain(|r| r != rule),
            Operation::FlushNeighbours(_) => {}
        }
    }
    observed
}

#[test]
fn each_uplink_table_has_its_default_its_subnet_the_lan_and_a_terminal_route() {
    let config = Config::parse(CONFIG).unwrap();
    let desired = desired(&config, &observed(), Strictness::Strict).unwrap();
    let table_2002: Vec<String> = desired
        .routes
        .iter()
        .filter(|r| r.table == 2002)
        .map(|r| r.to_string())
        .collect();
    assert_eq!(
        table_2002,
        [
            "default via 198.18.1.1 dev wan2 src 198.18.1.3 table 2002 proto 77",
            "198.18.1.0/24 dev wan2 scope link src 198.18.1.3 table 2002 proto 77",
            "198.18.0.0/24 dev lan0 scope link src 198.18.0.1 table 2002 proto 77",
            "unreachable default metric 4294967295 table 2002 proto 77",
        ]
    );
    let egress: Vec<String> = desired
        .routes
        .iter()
        .filter(|r| r.table == 2000)
        .map(|r| r.to_string())
        .collect();
    assert_eq!(
        egress,
        ["default via 198.18.1.1 dev wan1 src 198.18.1.2 table 2000 proto 77"],
        "heaviest uplink"
    );
}

#[test]
fn rules_put_lan_destinations_first_and_the_fallback_last() {
    let config = Config::parse(CONFIG).unwrap();
    let mut rules = desired(&config, &observed(), Strictness::Strict)
        .unwrap()
        .rules;
    rules.sort_by_key(|r| r.priority);
    let shown: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        shown,
        [
            "priority 10000 to 198.18.0.0/24 lookup main proto 77",
            "priority 10301 from 198.18.1.2/32 lookup 2001 proto 77",
            "priority 10302 from 198.18.1.3/32 lookup 2002 proto 77",
            "priority 10601 fwmark 0x1000000/0xff000000 lookup 2001 proto 77",
            "priority 10602 fwmark 0x2000000/0xff000000 lookup 2002 proto 77",
            "priority 10900 iif lo lookup main suppress_prefixlength 0 proto 77",
            "priority 10910 iif lo lookup 2000 proto 77",
        ]
    );
    assert!(
        rules
            .iter()
            .all(|r| ownership::PRIORITY_BAND.contains(&r.priority))
    );
}

#[test]
fn applying_the_plan_converges_and_a_second_plan_is_empty() {
    let config = Config::parse(CONFIG).unwrap();
    let first = plan(&config, &observed(), Strictness::Strict).unwrap();
    assert!(!first.is_empty());
    let after = applied(observed(), &first);
    assert_eq!(
        plan(&config, &after, Strictness::Strict).unwrap(),
        vec![],
        "adoption must not duplicate anything"
    );
}

#[test]
fn operations_come_in_a_safe_order() {
    let config = Config::parse(CONFIG).unwrap();
    let operations = plan(&config, &observed(), Strictness::Strict).unwrap();
    let rank = |op: &Operation| match op {
        Operation::SetSysctl { .. } => 0,
        Operation::AddRoute(_) | Operation::ReplaceRoute { .. } => 1,
        Operation::AddRule(_) => 2,
        Operation::DeleteRule(_) => 3,
        Operation::DeleteRoute(_) => 4,
        Operation::FlushNeighbours(_) => 5,
    };
    let ranks: Vec<u8> = operations.iter().map(rank).collect();
    let mut sorted = ranks.clone();
    sorted.sort();
    assert_eq!(ranks, sorted);
    let flushed: Vec<String> = operations
        .iter()
        .filter_map(|op| match op {
            Operation::FlushNeighbours(i) => Some(i.name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(flushed, ["wan1", "wan2"]);
}

#[test]
fn a_removed_uplink_is_cleaned_up_without_touching_foreign_routes() {
    let config = Config::parse(CONFIG).unwrap();
    let mut state = applied(
        observed(),
        &plan(&config, &observed(), Strictness::Strict).unwrap(),
    );
    let foreign = Route {
        table: 100,
        protocol: 4,
        ..state.routes[0].clone()
    };
    state.routes.push(foreign.clone());
    let one_uplink = CONFIG.split("[[uplink]]\nname = \"dsl2\"").next().unwrap();
    let smaller = Config::parse(one_uplink).unwrap();
    let operations = plan(&smaller, &state, Strictness::Strict).unwrap();
    assert!(
        operations
            .iter()
            .all(|op| !matches!(op, Operation::AddRoute(_) | Operation::AddRule(_)))
    );
    let deleted_tables: Vec<u32> = operations
        .iter()
        .filter_map(|op| match op {
            Operation::DeleteRoute(route) => Some(route.table),
            _ => None,
        })
        .collect();
    assert_eq!(deleted_tables, [2002; 4]);
    let after = applied(state, &operations);
    assert!(after.routes.contains(&foreign));
    assert_eq!(plan(&smaller, &after, Strictness::Strict).unwrap(), vec![]);
}

#[test]
fn a_changed_gateway_is_replaced_in_place() {
    let config = Config::parse(CONFIG).unwrap();
    let state = applied(
        observed(),
        &plan(&config, &observed(), Strictness::Strict).unwrap(),
    );
    let moved = Config::parse(&CONFIG.replacen(
        "gateway = \"198.18.1.1\"",
        "gateway = \"198.18.1.254\"",
        1,
    ))
    .unwrap();
    let operations = plan(&moved, &state, Strictness::Strict).unwrap();
    assert_eq!(operations.len(), 2, "{operations:#?}");
    assert!(
        operations
            .iter()
            .all(|op| matches!(op, Operation::ReplaceRoute { .. }))
    );
}

#[test]
fn kernel_checks_name_the_key_and_line() {
    let cases = [
        (
            "interface = \"wan2\"",
            "interface = \"wan9\"",
            "uplink[1].interface",
            15,
            "no interface wan9",
        ),
        (
            "source = \"198.18.1.3\"",
            "source = \"198.18.1.9\"",
            "uplink[1].source",
            17,
            "not an address of wan2",
        ),
        (
            "gateway = \"198.18.1.1\"\nsource = \"198.18.1.3\"",
            "gateway = \"198.18.7.1\"\nsource = \"198.18.1.3\"",
            "uplink[1].gateway",
            16,
            "not a host in",
        ),
        (
            "interfaces = [\"lan0\"]",
            "interfaces = [\"lan9\"]",
            "lan.interfaces[0]",
            3,
            "no interface lan9",
        ),
    ];
    for (from, to, key, line, message) in cases {
        let config = Config::parse(&CONFIG.replacen(from, to, 1)).unwrap();
        let error = desired(&config, &observed(), Strictness::Strict).unwrap_err();
        assert_eq!(
            (error.key.as_str(), error.line),
            (key, Some(line)),
            "{error}"
        );
        assert!(error.message.contains(message), "{error}");
    }
}

#[test]
fn rollback_inverses_undo_each_operation() {
    let config = Config::parse(CONFIG).unwrap();
    let operations = plan(&config, &observed(), Strictness::Strict).unwrap();
    let forward = applied(observed(), &operations);
    let inverses: Vec<Operation> = operations
        .iter()
        .rev()
        .filter_map(Operation::inverse)
        .collect();
    let back = applied(forward, &inverses);
    let mut routes = back.routes.clone();
    routes.sort();
    assert_eq!(routes, observed().routes);
    assert!(back.rules.is_empty());
    assert!(back.sysctls.values().all(String::is_empty));
}

#[test]
fn an_uplink_that_is_down_keeps_only_its_terminal_route_and_the_others_carry_on() {
    let config = Config::parse(CONFIG).unwrap();
    let mut state = observed();
    state.links[2].up = false; // wan1, the heaviest
    for strictness in [Strictness::Strict, Strictness::Tolerant] {
        let desired = desired(&config, &state, strictness).unwrap();
        let table_2001: Vec<String> = desired
            .routes
            .iter()
            .filter(|r| r.table == 2001)
            .map(|r| r.to_string())
            .collect();
        assert_eq!(
            table_2001,
            ["unreachable default metric 4294967295 table 2001 proto 77"]
        );
        assert_eq!(
            desired.unavailable,
            [("dsl1".to_string(), "wan1 is down".to_string())]
        );
        let egress: Vec<String> = desired
            .routes
            .iter()
            .filter(|r| r.table == 2000)
            .map(|r| r.to_string())
            .collect();
        assert_eq!(
            egress,
            ["default via 198.18.1.1 dev wan2 src 198.18.1.3 table 2000 proto 77"]
        );
        assert_eq!(
            desired.rules.len(),
            7,
            "rules stay, so wan1's traffic is refused, not leaked"
        );
    }
}

#[test]
fn the_gateways_own_traffic_prefers_an_uplink_with_carrier() {
    let config = Config::parse(CONFIG).unwrap();
    let mut state = observed();
    state.links[2].carrier = false;
    let desired = desired(&config, &state, Strictness::Tolerant).unwrap();
    let egress: Vec<String> = desired
        .routes
        .iter()
        .filter(|r| r.table == 2000)
        .map(|r| r.to_string())
        .collect();
    assert_eq!(
        egress,
        ["default via 198.18.1.1 dev wan2 src 198.18.1.3 table 2000 proto 77"]
    );
    assert!(
        desired.unavailable.is_empty(),
        "no carrier is not unavailable: its routes stay"
    );
}

#[test]
fn a_vanished_interface_is_an_error_at_start_but_only_unavailable_while_running() {
    let config = Config::parse(CONFIG).unwrap();
    let mut state = observed();
    state.links.retain(|l| l.interface.name != "wan2");
    assert_eq!(
        desired(&config, &state, Strictness::Strict)
            .unwrap_err()
            .key,
        "uplink[1].interface"
    );
    let running = desired(&config, &state, Strictness::Tolerant).unwrap();
    assert_eq!(running.unavailable.len(), 1);
    assert!(
        running
            .routes
            .iter()
            .any(|r| r.table == 2001 && r.gateway.is_some())
    );
}

#[test]
fn ownership_needs_both_the_protocol_and_the_range() {
    let config = Config::parse(CONFIG).unwrap();
    let mut state = applied(
        observed(),
        &plan(&config, &observed(), Strictness::Strict).unwrap(),
    );
    // Someone else's route that happens to carry protocol 77 outside the balancer's tables.
    let stranger = Route {
        table: 100,
        protocol: ownership::PROTOCOL,
        ..state.routes[0].clone()
    };
    let stranger_rule = Rule {
        iif: None,
        priority: 500,
        protocol: ownership::PROTOCOL,
        ..state.rules[0].clone()
    };
    state.routes.push(stranger.clone());
    state.rules.push(stranger_rule);
    assert_eq!(plan(&config, &state, Strictness::Strict).unwrap(), vec![]);
}

#[test]
fn the_local_port_range_moves_below_the_nat_ports_or_check_refuses() {
    let sysctl_of = |desired: &Desired| -> Option<String> {
        desired
            .sysctls
            .iter()
            .find(|(key, _)| key.0 == "net/ipv4/ip_local_port_range")
            .map(|(_, value)| value.clone())
    };
    // Linux's default range overlaps the default NAT range (32768-65535): accepted, and moved.
    let config = Config::parse(CONFIG).unwrap();
    let mut state = observed();
    state.local_port_range = Some((32768, 60999));
    let moved = desired(&config, &state, Strictness::Strict).unwrap();
    assert_eq!(sysctl_of(&moved).as_deref(), Some("16384\t32767"));
    // An administrator's lower start is kept.
    state.local_port_range = Some((10000, 40000));
    let moved = desired(&config, &state, Strictness::Strict).unwrap();
    assert_eq!(sysctl_of(&moved).as_deref(), Some("10000\t32767"));
    // Once moved, nothing more to do.
    state.local_port_range = Some((16384, 32767));
    assert_eq!(
        sysctl_of(&desired(&config, &state, Strictness::Strict).unwrap()),
        None
    );

    // NAT ports starting so low that too little room is left below them: refused.
    let low = Config::parse(&format!("{CONFIG}\n[dataplane]\nnat_port_min = 2000\n")).unwrap();
    state.local_port_range = Some((32768, 60999));
    let error = desired(&low, &state, Strictness::Strict).unwrap_err();
    assert_eq!(error.key, "dataplane.nat_port_min");
    assert!(error.message.contains("2000-65535"), "{error}");
    assert!(
        desired(&low, &state, Strictness::Tolerant).is_ok(),
        "a running daemon keeps going"
    );
    let without = Config::parse(&format!("{CONFIG}\n[dataplane]\nenabled = false\n")).unwrap();
    let plain = desired(&without, &state, Strictness::Strict).unwrap();
    assert_eq!(sysctl_of(&plain), None, "no data plane, no NAT ports");
}

#[test]
fn the_gateways_own_traffic_avoids_an_uplink_the_probes_judge_down() {
    let config = Config::parse(CONFIG).unwrap();
    let mut state = observed();
    state.down = vec![1];
    let desired = desired(&config, &state, Strictness::Tolerant).unwrap();
    let egress: Vec<String> = desired
        .routes
        .iter()
        .filter(|r| r.table == 2000)
        .map(|r| r.to_string())
        .collect();
    assert_eq!(
        egress,
        ["default via 198.18.1.1 dev wan2 src 198.18.1.3 table 2000 proto 77"]
    );
    assert!(
        desired
            .routes
            .iter()
            .any(|r| r.table == 2001 && r.gateway.is_some()),
        "its own table stays for bound sockets and probes"
    );
}

#[test]
fn the_proxy_listens_only_on_a_lan_interface_address() {
    let with_listen = |listen: &str| {
        Config::parse(&format!("{CONFIG}\n[proxy]\nlisten = \"{listen}\"\n")).unwrap()
    };
    assert!(
        desired(
            &with_listen("198.18.0.1:3128"),
            &observed(),
            Strictness::Strict
        )
        .is_ok()
    );
    // An uplink's address: the internet could reach the proxy there.
    let error = desired(
        &with_listen("198.18.1.2:3128"),
        &observed(),
        Strictness::Strict,
    )
    .unwrap_err();
    assert_eq!(
        (error.key.as_str(), error.line),
        ("proxy.listen", Some(20)),
        "{error}"
    );
    assert!(
        error.message.contains("not an address of a LAN interface"),
        "{error}"
    );
    // Not the gateway's at all.
    let error = desired(
        &with_listen("198.18.0.9:3128"),
        &observed(),
        Strictness::Strict,
    )
    .unwrap_err();
    assert_eq!(error.key, "proxy.listen");
}

#[test]
fn every_operation_of_an_uplink_is_attributed_to_it_and_the_shared_ones_to_none() {
    let config = Config::parse(CONFIG).unwrap();
    let observed = observed();
    let operations = plan(&config, &observed, Strictness::Strict).unwrap();
    let of = |id: Option<u32>| -> Vec<String> {
        operations
            .iter()
            .filter(|op| owner(op, &config) == id)
            .map(|op| op.to_string())
            .collect()
    };
    let shared = of(None);
    assert!(
        shared.iter().all(|op| op.contains("ip_forward")
            || op.contains("ip_local_port_range")
            || op.contains("priority 10000")
            || op.contains("priority 109")),
        "{shared:#?}"
    );
    let second = of(Some(2));
    assert!(
        second
            .iter()
            .all(|op| op.contains("wan2") || op.contains("2002")),
        "{second:#?}"
    );
    assert!(
        second.iter().any(|op| op.contains("priority 10302")),
        "{second:#?}"
    );
    assert_eq!(
        shared.len() + of(Some(1)).len() + second.len(),
        operations.len()
    );
}
