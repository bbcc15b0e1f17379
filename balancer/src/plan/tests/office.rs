//! Office destinations in the plan: routes through non-uplink interfaces copied into every
//! uplink table and passed by the data plane; an uplink's own routes forced onto it.

use super::*;

fn main_route(destination: &str, interface: (u32, &str), gateway: Option<&str>) -> Route {
    Route {
        table: MAIN_TABLE,
        destination: destination.parse().unwrap(),
        metric: 0,
        kind: RouteKind::Unicast,
        gateway: gateway.map(|g| g.parse().unwrap()),
        interface: Some(Interface {
            index: interface.0,
            name: interface.1.into(),
        }),
        preferred_source: None,
        scope: if gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        },
        protocol: 4,
    }
}

/// A branch office behind `tun0` (connected and static routes in main, a VPN table 220), a
/// DHCP server's host route on wan1 and main's own default route.
fn observed_with_office() -> Observed {
    let mut state = observed();
    state.links.push(link(5, "tun0"));
    state.addresses.push(address(5, "10.99.0.1/30"));
    state.routes.extend([
        main_route("10.99.0.0/30", (5, "tun0"), None),
        main_route("10.20.0.0/16", (5, "tun0"), Some("10.99.0.2")),
        main_route("192.0.2.67/32", (3, "wan1"), Some("198.18.1.1")),
        main_route("0.0.0.0/0", (3, "wan1"), Some("198.18.1.1")),
        Route {
            table: 220,
            ..main_route("10.30.0.0/16", (5, "tun0"), None)
        },
    ]);
    state
}

#[test]
fn office_routes_are_copied_into_every_uplink_table() {
    let text = CONFIG.replace(
        "networks = [\"198.18.0.0/24\"]",
        "networks = [\"198.18.0.0/24\"]\nroute_tables = [220]",
    );
    let config = Config::parse(&text).unwrap();
    let state = observed_with_office();
    let routes = desired(&config, &state, Strictness::Strict).unwrap().routes;
    let table = |id: u32| -> Vec<String> {
        routes
            .iter()
            .filter(|r| r.table == id)
            .map(|r| r.to_string())
            .collect()
    };
    for id in [2001, 2002] {
        let shown = table(id);
        for office in [
            format!("198.18.0.0/24 dev lan0 scope link src 198.18.0.1 table {id} proto 77"),
            format!("10.99.0.0/30 dev tun0 scope link table {id} proto 77"),
            format!("10.20.0.0/16 via 10.99.0.2 dev tun0 table {id} proto 77"),
            format!("10.30.0.0/16 dev tun0 scope link table {id} proto 77"),
        ] {
            assert!(
                shown.contains(&office),
                "table {id} lacks {office}: {shown:#?}"
            );
        }
        assert!(
            !shown
                .iter()
                .any(|r| r.starts_with("default via 198.18.1.1 dev wan1 table")),
            "main's default route is nobody's office: {shown:#?}"
        );
    }
    // The DHCP server's host route through wan1 stays wan1's.
    let host = "192.0.2.67/32 via 198.18.1.1 dev wan1";
    assert!(table(2001).iter().any(|r| r.starts_with(host)));
    assert!(!table(2002).iter().any(|r| r.starts_with(host)));

    let wide = crate::office::too_wide(&config, &state);
    assert!(wide.is_empty(), "{wide:?}");
}

#[test]
fn office_destinations_pass_and_uplink_routes_are_forced() {
    let config = Config::parse(CONFIG).unwrap();
    let mut state = observed_with_office();
    let uplinks = crate::uplink::resolve(&config, &state, &[]);
    let wanted = crate::dataplane::desired::desired(&config, &state, &uplinks);
    let action = |net: &str| {
        let net: Ipv4Net = net.parse().unwrap();
        wanted
            .destinations
            .iter()
            .find(|(n, _)| *n == net)
            .map(|(_, action)| *action)
    };
    let pass = Some(balancer_common::uplink::DESTINATION_PASS);
    assert_eq!(action("10.20.0.0/16"), pass);
    assert_eq!(action("10.99.0.0/30"), pass);
    assert_eq!(action("198.18.0.0/24"), pass);
    assert_eq!(action("192.0.2.67/32"), Some(1), "wan1's host route");
    assert_eq!(action("10.30.0.0/16"), None, "table 220 is not listed");
    assert_eq!(action("0.0.0.0/0"), None);

    // OpenVPN's redirect-gateway halves would make the internet "office": `check` warns.
    state
        .routes
        .push(main_route("0.0.0.0/1", (5, "tun0"), Some("10.99.0.2")));
    let wide = crate::office::too_wide(&config, &state);
    assert_eq!(wide, [("0.0.0.0/1".parse().unwrap(), "tun0".to_string())]);
}
