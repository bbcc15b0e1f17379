//! The pure heart of the control plane: from a [`Config`] and the observed kernel state it works
//! out the desired routes, rules and settings, and the list of [`Operation`]s that gets the
//! kernel there. Nothing here touches the kernel, so every decision is unit-tested.
//!
//! Per uplink it builds one table: the default route via the uplink's gateway, the uplink's
//! connected subnet and its other specific routes, the office routes (`office`) copied from the
//! main table and `[lan] route_tables`, and a final `unreachable default`
//! so a lookup never falls through to another uplink. Rules send LAN destinations to the main
//! table first, then `from <source>` and `fwmark` traffic to the uplink's table, and the
//! gateway's own unbound traffic to a table of its own.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use ipnet::Ipv4Net;

use crate::{
    config::{Config, ConfigError},
    netlink::{Address, Link},
    ownership,
    routing::{Interface, Lookup, Route, RouteKind, RouteScope, Rule, SysctlKey},
    uplink::{self, UplinkState},
};

use crate::office::{self, MAIN_TABLE};

/// The interface the kernel gives the gateway's own packets in policy-routing lookups.
const LOOPBACK: &str = "lo";

/// What the kernel holds now, as far as the plan cares.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub links: Vec<Link>,
    pub addresses: Vec<Address>,
    pub routes: Vec<Route>,
    pub rules: Vec<Rule>,
    /// Current values of the settings in [`desired_sysctls`].
    pub sysctls: BTreeMap<SysctlKey, String>,
    /// The gateway's `ip_local_port_range`, which the NAT port range must stay out of.
    pub local_port_range: Option<(u16, u16)>,
    /// Uplinks the health probes judge down (empty when every uplink is: then those with
    /// carrier keep working rather than the office losing everything).
    pub down: Vec<u32>,
}

impl Observed {
    fn interface(&self, name: &str) -> Option<&Interface> {
        self.links
            .iter()
            .map(|l| &l.interface)
            .find(|i| i.name == name)
    }
}

/// The state the balancer wants in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub routes: Vec<Route>,
    pub rules: Vec<Rule>,
    pub sysctls: Vec<(SysctlKey, String)>,
    /// Uplinks the kernel cannot carry now, by name, with the reason.
    pub unavailable: Vec<(String, String)>,
    /// The state of every configured uplink this plan was made from.
    pub uplinks: Vec<UplinkState>,
}

/// One change to the kernel. Each prints as the command an administrator would type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    SetSysctl {
        key: SysctlKey,
        from: String,
        to: String,
    },
    AddRoute(Route),
    ReplaceRoute {
        old: Route,
        new: Route,
    },
    AddRule(Rule),
    DeleteRule(Rule),
    DeleteRoute(Route),
    FlushNeighbours(Interface),
}

impl Operation {
    /// The operation that undoes this one, used to roll back a failed apply.
    pub fn inverse(&self) -> Option<Operation> {
        Some(match self {
            Operation::SetSysctl { key, from, to } => Operation::SetSysctl {
                key: key.clone(),
                from: to.clone(),
                to: from.clone(),
            },
            Operation::AddRoute(route) => Operation::DeleteRoute(route.clone()),
            Operation::DeleteRoute(route) => Operation::AddRoute(route.clone()),
            Operation::ReplaceRoute { old, new } => Operation::ReplaceRoute {
                old: new.clone(),
                new: old.clone(),
            },
            Operation::AddRule(rule) => Operation::DeleteRule(rule.clone()),
            Operation::DeleteRule(rule) => Operation::AddRule(rule.clone()),
            Operation::FlushNeighbours(_) => return None,
        })
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operation::SetSysctl { key, from, to } => {
                write!(f, "sysctl -w {key}={to}    # was {from}")
            }
            Operation::AddRoute(route) => write!(f, "ip route add {route}"),
            Operation::ReplaceRoute { new, .. } => write!(f, "ip route replace {new}"),
            Operation::DeleteRoute(route) => write!(f, "ip route del {route}"),
            Operation::AddRule(rule) => write!(f, "ip rule add {rule}"),
            Operation::DeleteRule(rule) => write!(f, "ip rule del {rule}"),
            Operation::FlushNeighbours(interface) => {
                write!(f, "ip neigh flush dev {}", interface.name)
            }
        }
    }
}

/// The settings the balancer manages, with the values it wants.
///
/// `arp_filter` answers ARP on an uplink only for addresses routed out of it (no ARP flux when
/// two uplinks share a subnet); `arp_announce=2` makes ARP requests carry the outgoing
/// interface's own address; `src_valid_mark` lets reverse-path filtering see the mark the data
/// plane puts on replies, so strict rp_filter keeps working. rp_filter itself is never touched.
///
/// `ip_local_port_range` is moved below the NAT range when the one the gateway has
/// (`local_port_range`) overlaps it ([`local_port_range_move`]).
pub fn desired_sysctls(
    config: &Config,
    local_port_range: Option<(u16, u16)>,
) -> Vec<(SysctlKey, String)> {
    let mut settings = vec![(SysctlKey::global("net/ipv4/ip_forward"), "1".to_string())];
    if let Some((low, high)) = local_port_range_move(config, local_port_range) {
        settings.push((
            SysctlKey::global(LOCAL_PORT_RANGE),
            format!("{low}\t{high}"),
        ));
    }
    for uplink in &config.uplinks {
        for (setting, value) in [
            ("arp_filter", "1"),
            ("arp_announce", "2"),
            ("src_valid_mark", "1"),
        ] {
            settings.push((
                SysctlKey::ipv4_conf(&uplink.interface, setting),
                value.to_string(),
            ));
        }
    }
    settings
}

/// The gateway's own ephemeral ports (`net.ipv4.ip_local_port_range`).
pub const LOCAL_PORT_RANGE: &str = "net/ipv4/ip_local_port_range";
/// How many ephemeral ports a moved `ip_local_port_range` gets at most, and at least (below
/// that the NAT range is too low to move the gateway's own ports under it).
const MOVED_LOCAL_PORTS: u16 = 16_384;
const MOVED_LOCAL_PORTS_MIN: u16 = 1_024;
/// The lowest port a moved `ip_local_port_range` may start at: below are services' ports.
const MOVED_LOCAL_PORT_FLOOR: u16 = 1_024;

/// The `ip_local_port_range` the gateway must get when its current one (`current`) overlaps
/// the NAT range: the ports just below `nat_port_min`, keeping the current low end when that
/// leaves enough. Translated ports and the gateway's (and the proxy's) own sockets on an
/// uplink address must never meet. `None` when nothing needs to move, or when nothing can
/// (the NAT range starts too low; `check` reports that).
pub fn local_port_range_move(config: &Config, current: Option<(u16, u16)>) -> Option<(u16, u16)> {
    let (low, high) = current?;
    let (min, max) = (config.dataplane.nat_port_min, config.dataplane.nat_port_max);
    if !config.dataplane.enabled || min > high || low > max {
        return None;
    }
    let new_high = min.checked_sub(1)?;
    let wanted_low = new_high
        .saturating_sub(MOVED_LOCAL_PORTS - 1)
        .max(MOVED_LOCAL_PORT_FLOOR);
    // An administrator's lower start is kept when it still leaves room below the NAT range.
    let new_low = if low < wanted_low {
        low.max(MOVED_LOCAL_PORT_FLOOR)
    } else {
        wanted_low
    };
    (new_high >= new_low && new_high - new_low + 1 >= MOVED_LOCAL_PORTS_MIN)
        .then_some((new_low, new_high))
}

/// How strictly `desired` treats an uplink the kernel cannot use right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// `check`, `plan` and the daemon's start: an unknown interface without `hotplug`, or an
    /// explicit source or gateway that contradicts its interface, is a config error.
    Strict,
    /// The running daemon: an uplink the kernel cannot carry now only waits, so the other
    /// uplinks keep being maintained.
    Tolerant,
}

/// The addresses on the LAN interfaces, where the forward proxy may listen.
pub fn lan_addresses(config: &Config, observed: &Observed) -> Vec<std::net::Ipv4Addr> {
    let indexes: Vec<u32> = config
        .lan
        .interfaces
        .iter()
        .filter_map(|name| observed.interface(name).map(|i| i.index))
        .collect();
    observed
        .addresses
        .iter()
        .filter(|a| indexes.contains(&a.ifindex))
        .map(|a| a.network.addr())
        .collect()
}

/// Works out the desired state, checking the config against the live interfaces and addresses.
pub fn desired(
    config: &Config,
    observed: &Observed,
    strictness: Strictness,
) -> Result<Desired, ConfigError> {
    if strictness == Strictness::Strict {
        check(config, observed)?;
    }
    let states = uplink::resolve(config, observed, &observed.down);
    Ok(desired_from(config, observed, states))
}

/// The checks against the kernel that `check` reports as config errors.
fn check(config: &Config, observed: &Observed) -> Result<(), ConfigError> {
    for (index, name) in config.lan.interfaces.iter().enumerate() {
        if observed.interface(name).is_none() {
            return Err(config.error(
                &format!("lan.interfaces[{index}]"),
                format!("there is no interface {name}"),
            ));
        }
    }
    if let Some(proxy) = &config.proxy {
        let lan_addresses: Vec<std::net::Ipv4Addr> = lan_addresses(config, observed);
        if let Some(problem) = crate::config::proxy::listen_problem(proxy.listen, &lan_addresses) {
            return Err(config.error("proxy.listen", problem));
        }
    }
    if config.dataplane.enabled
        && let Some((low, high)) = observed.local_port_range
    {
        let (min, max) = (config.dataplane.nat_port_min, config.dataplane.nat_port_max);
        // An overlap `run` removes by moving the gateway's range below the NAT range is fine.
        if min <= high
            && low <= max
            && local_port_range_move(config, observed.local_port_range).is_none()
        {
            return Err(config.error(
                "dataplane.nat_port_min",
                format!(
                    "the NAT ports {min}-{max} overlap the gateway's ip_local_port_range {low}-{high}, \
                     and leave too little room below them to move it there (at least \
                     {MOVED_LOCAL_PORTS_MIN} ports from {MOVED_LOCAL_PORT_FLOOR}): its own sockets \
                     would be shadowed; raise nat_port_min"
                ),
            ));
        }
    }
    uplink::check(config, observed)
}

/// The desired routes, rules and settings for uplinks in `states` (from [`uplink::resolve`]).
pub fn desired_from(config: &Config, observed: &Observed, states: Vec<UplinkState>) -> Desired {
    let office_routes = office::office_routes(config, observed);

    let mut routes = Vec::new();
    let mut rules = Vec::new();
    let mut unavailable = Vec::new();
    for (index, network) in config.lan.networks.iter().enumerate() {
        rules.push(owned_rule(
            ownership::PRIORITY_LAN + index as u32,
            None,
            Some(*network),
            None,
            MAIN_TABLE,
        ));
    }
    for (uplink, state) in config.uplinks.iter().zip(&states) {
        let table = uplink.table;
        match (&state.interface, state.source, state.routable) {
            (Some(interface), Some(source), true) => {
                routes.push(uplink_route(
                    source,
                    table,
                    interface,
                    Ipv4Net::default(),
                    state.gateway,
                ));
                if let Some(connected) = state.connected {
                    routes.push(uplink_route(source, table, interface, connected, None));
                }
                // The uplink's own specific routes (a PPP peer, a DHCP server's host route),
                // then every office route, so that a lookup in this table reaches the office.
                let own = office::uplink_routes(config, observed, &interface.name);
                for copied in own.into_iter().chain(office_routes.iter().copied()) {
                    let copy = Route {
                        table,
                        protocol: ownership::PROTOCOL,
                        ..copied.clone()
                    };
                    if !routes.iter().any(|r: &Route| r.key() == copy.key()) {
                        routes.push(copy);
                    }
                }
            }
            _ => unavailable.push((uplink.name.clone(), state.unavailable().unwrap_or_default())),
        }
        routes.push(Route {
            table,
            destination: Ipv4Net::default(),
            metric: ownership::TERMINAL_METRIC,
            kind: RouteKind::Unreachable,
            gateway: None,
            interface: None,
            preferred_source: None,
            scope: RouteScope::Universe,
            protocol: ownership::PROTOCOL,
        });
        // Sockets bound to the uplink's address leave by it; an address not known yet has none.
        if let Some(source) = state.source {
            rules.push(owned_rule(
                ownership::PRIORITY_FROM_SOURCE + uplink.id,
                Some(Ipv4Net::from(source)),
                None,
                None,
                table,
            ));
        }
        rules.push(owned_rule(
            ownership::PRIORITY_FWMARK + uplink.id,
            None,
            None,
            Some((uplink.mark, ownership::MARK_MASK)),
            table,
        ));
    }

    // The gateway's own unbound traffic: the heaviest usable uplink, else the heaviest with
    // carrier, else the heaviest routable one.
    let heaviest = |fits: &dyn Fn(&UplinkState) -> bool| {
        config
            .uplinks
            .iter()
            .zip(&states)
            .filter(|(_, state)| state.routable && fits(state))
            .max_by(|(a, _), (b, _)| a.weight.cmp(&b.weight).then(b.id.cmp(&a.id)))
            .map(|(_, state)| state)
    };
    if let Some(state) = heaviest(&|s| s.usable)
        .or_else(|| heaviest(&|s| s.carrier))
        .or_else(|| heaviest(&|_| true))
        && let (Some(interface), Some(source)) = (&state.interface, state.source)
    {
        routes.push(uplink_route(
            source,
            ownership::LOCAL_EGRESS_TABLE,
            interface,
            Ipv4Net::default(),
            state.gateway,
        ));
    }
    let mut main_specific = owned_rule(
        ownership::PRIORITY_MAIN_SPECIFIC,
        None,
        None,
        None,
        MAIN_TABLE,
    );
    main_specific.lookup.suppress_prefix_length = Some(0);
    // `iif lo`: only the gateway's own traffic. Forwarded LAN traffic that the data plane did
    // not mark must never take an uplink's default route with its private source.
    main_specific.iif = Some(LOOPBACK.to_string());
    rules.push(main_specific);
    let mut local_egress = owned_rule(
        ownership::PRIORITY_LOCAL_EGRESS,
        None,
        None,
        None,
        ownership::LOCAL_EGRESS_TABLE,
    );
    local_egress.iif = Some(LOOPBACK.to_string());
    rules.push(local_egress);

    // Settings only for interfaces that exist: a missing one has no /proc/sys entry, and a
    // re-created one starts from the defaults again, so they are written then.
    let present: Vec<&str> = states
        .iter()
        .filter_map(|s| s.interface.as_ref().map(|i| i.name.as_str()))
        .collect();
    let sysctls = desired_sysctls(config, observed.local_port_range)
        .into_iter()
        .filter(|(key, _)| match key.interface() {
            Some(name) => present.contains(&name),
            None => true,
        })
        .collect();
    Desired {
        routes,
        rules,
        sysctls,
        unavailable,
        uplinks: states,
    }
}

/// A default or connected route of an uplink: `via` its gateway, or `dev` only (scope link)
/// where there is none (point-to-point links without a link-layer header, connected routes).
fn uplink_route(
    source: Ipv4Addr,
    table: u32,
    interface: &Interface,
    destination: Ipv4Net,
    gateway: Option<Ipv4Addr>,
) -> Route {
    Route {
        table,
        destination,
        metric: 0,
        kind: RouteKind::Unicast,
        gateway,
        interface: Some(interface.clone()),
        preferred_source: Some(source),
        scope: if gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        },
        protocol: ownership::PROTOCOL,
    }
}

fn owned_rule(
    priority: u32,
    from: Option<Ipv4Net>,
    to: Option<Ipv4Net>,
    fwmark: Option<(u32, u32)>,
    table: u32,
) -> Rule {
    Rule {
        priority,
        iif: None,
        from,
        to,
        fwmark,
        lookup: Lookup {
            table,
            suppress_prefix_length: None,
        },
        protocol: ownership::PROTOCOL,
    }
}

/// The operations that take the kernel from `observed` to `desired`, in a safe order: settings
/// first (ARP behaviour before any route uses an uplink), then routes so no rule ever points at
/// an empty table, then rules, then removal of what the balancer owns but no longer wants, and
/// last the neighbour flush on uplinks whose ARP settings changed.
pub fn diff(desired: &Desired, observed: &Observed) -> Vec<Operation> {
    let mut operations = Vec::new();
    let mut arp_changed: Vec<String> = Vec::new();
    for (key, value) in &desired.sysctls {
        let current = observed.sysctls.get(key).cloned().unwrap_or_default();
        if &current != value {
            if key.0.ends_with("/arp_filter") || key.0.ends_with("/arp_announce") {
                arp_changed.extend(key.0.split('/').nth(3).map(str::to_string));
            }
            operations.push(Operation::SetSysctl {
                key: key.clone(),
                from: current,
                to: value.clone(),
            });
        }
    }

    let owned = |route: &&Route| ownership::owns_route(route.protocol, route.table);
    for route in &desired.routes {
        if observed.routes.iter().filter(owned).any(|r| r == route) {
            continue;
        }
        match observed.routes.iter().find(|r| r.key() == route.key()) {
            Some(old) => operations.push(Operation::ReplaceRoute {
                old: old.clone(),
                new: route.clone(),
            }),
            None => operations.push(Operation::AddRoute(route.clone())),
        }
    }
    for rule in &desired.rules {
        if !observed.rules.contains(rule) {
            operations.push(Operation::AddRule(rule.clone()));
        }
    }
    for rule in observed
        .rules
        .iter()
        .filter(|r| ownership::owns_rule(r.protocol, r.priority))
    {
        if !desired.rules.contains(rule) {
            operations.push(Operation::DeleteRule(rule.clone()));
        }
    }
    for route in observed.routes.iter().filter(owned) {
        if !desired.routes.iter().any(|r| r.key() == route.key()) {
            operations.push(Operation::DeleteRoute(route.clone()));
        }
    }
    arp_changed.sort();
    arp_changed.dedup();
    for name in arp_changed {
        if let Some(interface) = observed.interface(&name) {
            operations.push(Operation::FlushNeighbours(interface.clone()));
        }
    }
    operations
}

/// The uplink an operation belongs to (by table, interface or rule priority), or None for what
/// no uplink owns (ip_forward, the LAN and fallback rules). Failures are shown per uplink, and
/// only the unowned part of the first apply is all or nothing.
pub fn owner(operation: &Operation, config: &Config) -> Option<u32> {
    let by_table = |table: u32| {
        config
            .uplinks
            .iter()
            .find(|u| u.table == table)
            .map(|u| u.id)
    };
    let by_interface = |name: &str| {
        config
            .uplinks
            .iter()
            .find(|u| u.interface == name)
            .map(|u| u.id)
    };
    let by_route = |route: &Route| {
        by_table(route.table)
            .or_else(|| route.interface.as_ref().and_then(|i| by_interface(&i.name)))
    };
    match operation {
        Operation::SetSysctl { key, .. } => key.interface().and_then(by_interface),
        Operation::AddRoute(route) | Operation::DeleteRoute(route) => by_route(route),
        Operation::ReplaceRoute { new, .. } => by_route(new),
        Operation::AddRule(rule) | Operation::DeleteRule(rule) => {
            let priority = rule.priority;
            config
                .uplinks
                .iter()
                .find(|u| {
                    priority == ownership::PRIORITY_FROM_SOURCE + u.id
                        || priority == ownership::PRIORITY_FWMARK + u.id
                })
                .map(|u| u.id)
        }
        Operation::FlushNeighbours(interface) => by_interface(&interface.name),
    }
}

/// Desired state and the operations to reach it, in one step.
pub fn plan(
    config: &Config,
    observed: &Observed,
    strictness: Strictness,
) -> Result<Vec<Operation>, ConfigError> {
    Ok(diff(&desired(config, observed, strictness)?, observed))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
