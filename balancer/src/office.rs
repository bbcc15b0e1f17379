//! Office destinations: which routes of the gateway belong to the office and which to an
//! uplink. A destination that the main table (or a table in `[lan] route_tables`) routes
//! through an interface that is no uplink, by anything but a default route, is the office's
//! (the LAN, a branch office over a VPN, a container bridge): it is never balanced or
//! translated, and every uplink table carries its route so replies and bound sockets reach it.
//! A route through an uplink's own interface (its subnet, a PPP peer, a DHCP server's host
//! route) stays that uplink's: it goes only into that uplink's table, and traffic to it leaves
//! by that uplink, translated. Pure: `plan` and `dataplane::desired` both ask it.

use ipnet::Ipv4Net;

use crate::{
    config::Config,
    plan::Observed,
    routing::{Route, RouteKind},
};

pub const MAIN_TABLE: u32 = 254;

/// Office routes shorter than this make `check` warn: OpenVPN's `0.0.0.0/1` + `128.0.0.0/1`
/// would make the whole internet "office".
pub const SHORTEST_QUIET_PREFIX: u8 = 8;

/// The tables whose routes decide where destinations belong: main first, then the config's.
fn source_tables(config: &Config) -> impl Iterator<Item = u32> + '_ {
    std::iter::once(MAIN_TABLE).chain(config.lan.route_tables.iter().copied())
}

/// A specific unicast route through a named interface in one of the source tables.
fn candidates<'a>(config: &'a Config, observed: &'a Observed) -> impl Iterator<Item = &'a Route> {
    source_tables(config).flat_map(move |table| {
        observed.routes.iter().filter(move |route| {
            route.table == table
                && route.kind == RouteKind::Unicast
                && route.destination.prefix_len() > 0
                && route.interface.as_ref().is_some_and(|i| i.name != "lo")
        })
    })
}

fn is_uplink_interface(config: &Config, name: &str) -> bool {
    config.uplinks.iter().any(|u| u.interface == name)
}

/// Every office route, main's first; a destination and metric already seen in an earlier
/// table is not repeated (one uplink table can hold it only once).
pub fn office_routes<'a>(config: &'a Config, observed: &'a Observed) -> Vec<&'a Route> {
    let mut routes: Vec<&Route> = Vec::new();
    for route in candidates(config, observed) {
        let name = route.interface.as_ref().map_or("", |i| i.name.as_str());
        if is_uplink_interface(config, name) {
            continue;
        }
        if !routes
            .iter()
            .any(|r| (r.destination, r.metric) == (route.destination, route.metric))
        {
            routes.push(route);
        }
    }
    routes
}

/// The specific routes through `interface` (an uplink's), from the source tables.
pub fn uplink_routes<'a>(
    config: &'a Config,
    observed: &'a Observed,
    interface: &str,
) -> Vec<&'a Route> {
    let mut routes: Vec<&Route> = Vec::new();
    for route in candidates(config, observed) {
        if route
            .interface
            .as_ref()
            .is_some_and(|i| i.name == interface)
            && !routes
                .iter()
                .any(|r| (r.destination, r.metric) == (route.destination, route.metric))
        {
            routes.push(route);
        }
    }
    routes
}

/// Office destinations so wide that they swallow much of the internet, for `check`.
pub fn too_wide(config: &Config, observed: &Observed) -> Vec<(Ipv4Net, String)> {
    office_routes(config, observed)
        .into_iter()
        .filter(|r| r.destination.prefix_len() < SHORTEST_QUIET_PREFIX)
        .map(|r| {
            (
                r.destination,
                r.interface
                    .as_ref()
                    .map(|i| i.name.clone())
                    .unwrap_or_default(),
            )
        })
        .collect()
}
