//! One model of an uplink: for every configured uplink, what the kernel and the health checks
//! say about it now, stage by stage (configured, present, addressed, carrier, health, usable),
//! each with its reason. Routing (`plan`), the data plane's desired state, the proxy and
//! `status` all read this one state, so they never disagree about whether an uplink is usable.
//!
//! It is also where learned addressing is decided: a `source` left out of the config is the
//! interface's primary global IPv4 address; a `gateway` left out is the peer of a
//! point-to-point address, else the gateway of a default route through the interface in the
//! main table (what DHCP clients install), else none on a link without an Ethernet header
//! (routes then use `dev` only). An Ethernet uplink without one waits.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, ConfigError, Uplink},
    netlink::{Address, Link},
    plan::Observed,
    routing::{Interface, RouteKind},
};

const MAIN_TABLE: u32 = 254;

/// One stage of an uplink's way to carrying traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    pub ok: bool,
    /// What was found, or why the stage is not reached.
    pub reason: String,
}

impl Stage {
    fn pass(reason: impl Into<String>) -> Stage {
        Stage {
            ok: true,
            reason: reason.into(),
        }
    }

    fn fail(reason: impl Into<String>) -> Stage {
        Stage {
            ok: false,
            reason: reason.into(),
        }
    }
}

/// Every stage, in the order an uplink passes them. `status` shows them all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stages {
    pub configured: Stage,
    pub present: Stage,
    pub addressed: Stage,
    pub carrier: Stage,
    pub health: Stage,
    pub usable: Stage,
}

impl Stages {
    /// The stages as (name, stage) pairs, in order.
    pub fn list(&self) -> [(&'static str, &Stage); 6] {
        [
            ("configured", &self.configured),
            ("present", &self.present),
            ("addressed", &self.addressed),
            ("carrier", &self.carrier),
            ("health", &self.health),
            ("usable", &self.usable),
        ]
    }
}

/// What is known about one uplink now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkState {
    pub id: u32,
    pub name: String,
    /// The interface, when it exists.
    pub interface: Option<Interface>,
    pub ethernet: bool,
    pub mtu: u32,
    pub carrier: bool,
    /// The address traffic leaves with: configured, or learned from the interface.
    pub source: Option<Ipv4Addr>,
    /// The route to the uplink's own link: its subnet, or the peer of a point-to-point address.
    pub connected: Option<Ipv4Net>,
    /// The next hop of the default route; None on a link that needs none (`dev` only).
    pub gateway: Option<Ipv4Addr>,
    /// The kernel can carry the uplink's routes: present, up, addressed, gateway known.
    pub routable: bool,
    /// Takes new flows and proxy connections: routable, with carrier, not judged down.
    pub usable: bool,
    pub stages: Stages,
}

impl UplinkState {
    /// Why the uplink is not usable: the first stage it has not reached.
    pub fn unavailable(&self) -> Option<String> {
        self.stages
            .list()
            .into_iter()
            .find(|(_, stage)| !stage.ok)
            .map(|(_, stage)| stage.reason.clone())
    }
}

/// The state of every configured uplink, in config order. `down` lists the uplinks the health
/// checks judge down (left empty by the daemon when every uplink is down).
pub fn resolve(config: &Config, observed: &Observed, down: &[u32]) -> Vec<UplinkState> {
    config
        .uplinks
        .iter()
        .map(|uplink| resolve_one(uplink, observed, down))
        .collect()
}

fn resolve_one(uplink: &Uplink, observed: &Observed, down: &[u32]) -> UplinkState {
    let mut state = UplinkState {
        id: uplink.id,
        name: uplink.name.clone(),
        interface: None,
        ethernet: true,
        mtu: 0,
        carrier: false,
        source: uplink.source,
        connected: None,
        gateway: uplink.gateway,
        routable: false,
        usable: false,
        stages: Stages {
            configured: Stage::pass(format!(
                "id {} table {} mark {:#x} weight {}",
                uplink.id, uplink.table, uplink.mark, uplink.weight
            )),
            ..Stages::default()
        },
    };
    let not_reached = |stages: &mut Stages, from: usize| {
        let waiting = Stage::fail("waiting for the stage before");
        let all = [
            &mut stages.addressed,
            &mut stages.carrier,
            &mut stages.health,
            &mut stages.usable,
        ];
        for stage in all.into_iter().skip(from) {
            *stage = waiting.clone();
        }
    };
    let Some(link) = observed
        .links
        .iter()
        .find(|l| l.interface.name == uplink.interface)
    else {
        state.stages.present = Stage::fail(format!(
            "there is no interface {}{}",
            uplink.interface,
            if uplink.hotplug {
                " (hotplug: it joins when it appears)"
            } else {
                ""
            }
        ));
        not_reached(&mut state.stages, 0);
        return state;
    };
    state.interface = Some(link.interface.clone());
    state.ethernet = !link.raw_ip;
    state.mtu = link.mtu;
    state.carrier = link.carrier;
    state.stages.present = Stage::pass(format!(
        "{} (ifindex {}, {})",
        link.interface.name,
        link.interface.index,
        if !link.raw_ip {
            "Ethernet"
        } else {
            "no link-layer header"
        }
    ));

    match addressing(uplink, link, observed) {
        Ok((source, connected, gateway)) => {
            state.source = Some(source);
            state.connected = connected;
            state.gateway = gateway;
            let how = |configured: bool| if configured { "" } else { ", learned" };
            let via = match gateway {
                Some(gateway) => format!("via {gateway}{}", how(uplink.gateway.is_some())),
                None => format!("dev {}", link.interface.name),
            };
            state.stages.addressed = Stage::pass(format!(
                "src {source}{} {via}",
                how(uplink.source.is_some())
            ));
        }
        Err(missing) => {
            state.stages.addressed = Stage::fail(missing.reason());
            not_reached(&mut state.stages, 1);
            return state;
        }
    }

    // The kernel removes the routes of an interface that is set down and refuses new ones, so
    // such an uplink waits.
    if !link.up {
        state.stages.carrier = Stage::fail(format!("{} is down", uplink.interface));
        not_reached(&mut state.stages, 2);
        return state;
    }
    state.routable = true;
    state.stages.carrier = if link.carrier {
        Stage::pass("carrier")
    } else {
        Stage::fail(format!("{} has no carrier", uplink.interface))
    };
    state.stages.health = if down.contains(&uplink.id) {
        Stage::fail("judged down by the health checks")
    } else {
        Stage::pass("not judged down")
    };
    state.usable = state.stages.carrier.ok && state.stages.health.ok;
    state.stages.usable = if state.usable {
        Stage::pass("takes new flows")
    } else {
        Stage::fail("out of the rotation")
    };
    state
}

/// Why an uplink's addressing is not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Missing {
    /// The configured source is not on the interface.
    Source(String),
    /// The configured gateway cannot be a next hop there.
    Gateway(String),
    /// A learned value is not there yet: the uplink waits, no error.
    Waiting(String),
}

impl Missing {
    fn reason(self) -> String {
        match self {
            Missing::Source(reason) | Missing::Gateway(reason) | Missing::Waiting(reason) => reason,
        }
    }
}

/// The uplink's source, connected route and gateway on `link`, configured or learned; or why
/// they are not known yet.
#[allow(clippy::type_complexity)]
fn addressing(
    uplink: &Uplink,
    link: &Link,
    observed: &Observed,
) -> Result<(Ipv4Addr, Option<Ipv4Net>, Option<Ipv4Addr>), Missing> {
    let on_interface: Vec<&Address> = observed
        .addresses
        .iter()
        .filter(|a| a.ifindex == link.interface.index)
        .collect();
    let address = match uplink.source {
        Some(source) => on_interface
            .iter()
            .find(|a| a.network.addr() == source)
            .ok_or_else(|| {
                Missing::Source(format!(
                    "{source} is not an address of {} (it has {})",
                    uplink.interface,
                    shown(&on_interface)
                ))
            })?,
        None => on_interface.iter().find(|a| a.primary).ok_or_else(|| {
            Missing::Waiting(format!(
                "{} has no global IPv4 address yet",
                uplink.interface
            ))
        })?,
    };
    let source = address.network.addr();
    let connected = match address.peer {
        Some(peer) => Some(Ipv4Net::from(peer)),
        None if address.network.prefix_len() < 32 => Some(address.network.trunc()),
        None => None,
    };
    let gateway = match uplink.gateway {
        Some(gateway) => {
            if !reachable(address, gateway) {
                return Err(Missing::Gateway(match (address.peer, connected) {
                    (Some(peer), _) => format!(
                        "{gateway} is not the peer {peer} of {}'s point-to-point address",
                        uplink.interface
                    ),
                    (None, Some(subnet)) => format!(
                        "{gateway} is not a host in {}'s subnet {subnet}",
                        uplink.interface
                    ),
                    (None, None) => format!(
                        "{gateway} is not reachable on {}: its address {} has no subnet",
                        uplink.interface, address.network
                    ),
                }));
            }
            Some(gateway)
        }
        None => match address.peer {
            Some(peer) => Some(peer),
            None => match learned_gateway(link, observed) {
                Some(gateway) => Some(gateway),
                None if link.raw_ip => None,
                None => {
                    return Err(Missing::Waiting(format!(
                        "src {source}; waiting for a gateway: no default route through {} in the main table",
                        uplink.interface
                    )));
                }
            },
        },
    };
    Ok((source, connected, gateway))
}

/// Whether `gateway` is a next hop on `address`'s link: its peer, or a host of its subnet (a
/// /31 has no network or broadcast address, RFC 3021).
fn reachable(address: &Address, gateway: Ipv4Addr) -> bool {
    if let Some(peer) = address.peer {
        return gateway == peer;
    }
    let subnet = address.network.trunc();
    if gateway == address.network.addr() || !subnet.contains(&gateway) {
        return false;
    }
    subnet.prefix_len() >= 31 || (gateway != subnet.network() && gateway != subnet.broadcast())
}

/// The gateway of the best default route through `link` in the main table, whatever its
/// metric (DHCP clients give each interface its own).
fn learned_gateway(link: &Link, observed: &Observed) -> Option<Ipv4Addr> {
    observed
        .routes
        .iter()
        .filter(|r| {
            r.table == MAIN_TABLE
                && r.kind == RouteKind::Unicast
                && r.destination.prefix_len() == 0
                && r.interface.as_ref().map(|i| i.index) == Some(link.interface.index)
        })
        .filter_map(|r| r.gateway.map(|gateway| (r.metric, gateway)))
        .min()
        .map(|(_, gateway)| gateway)
}

fn shown(addresses: &[&Address]) -> String {
    if addresses.is_empty() {
        return "none".into();
    }
    addresses
        .iter()
        .map(|a| match a.peer {
            Some(peer) => format!("{} peer {peer}", a.network),
            None => a.network.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The checks `check`, `plan` and the daemon's start make against the live kernel: an unknown
/// interface without `hotplug` (a typo), and explicit values that contradict the interface.
/// A learned address or gateway that is not there yet is no error: the uplink waits for it.
pub fn check(config: &Config, observed: &Observed) -> Result<(), ConfigError> {
    for (position, uplink) in config.uplinks.iter().enumerate() {
        let key = |field: &str| format!("uplink[{position}].{field}");
        let Some(link) = observed
            .links
            .iter()
            .find(|l| l.interface.name == uplink.interface)
        else {
            if uplink.hotplug {
                continue;
            }
            return Err(config.error(
                &key("interface"),
                format!(
                    "there is no interface {} (set hotplug = true if it comes and goes)",
                    uplink.interface
                ),
            ));
        };
        if uplink.source.is_none() && uplink.gateway.is_none() {
            continue;
        }
        // Explicit values are checked as they always were; waiting for a learned value is no
        // error.
        match addressing(uplink, link, observed) {
            Err(Missing::Source(reason)) => return Err(config.error(&key("source"), reason)),
            Err(Missing::Gateway(reason)) => return Err(config.error(&key("gateway"), reason)),
            Err(Missing::Waiting(_)) | Ok(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
