//! The routing objects the balancer reasons about (routes, rules, sysctl settings), as plain
//! values that `netlink` reads from and writes to the kernel and `plan` compares. Each prints
//! itself as the `ip` command that would make it, which is what `balancer plan` shows.

use std::{fmt, net::Ipv4Addr};

use ipnet::Ipv4Net;
use serde::Serialize;

/// A network interface as the kernel names and numbers it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Interface {
    pub index: u32,
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum RouteKind {
    Unicast,
    Unreachable,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum RouteScope {
    Universe,
    Link,
    Host,
}

/// An IPv4 route in one table.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Route {
    pub table: u32,
    pub destination: Ipv4Net,
    pub metric: u32,
    pub kind: RouteKind,
    pub gateway: Option<Ipv4Addr>,
    pub interface: Option<Interface>,
    pub preferred_source: Option<Ipv4Addr>,
    pub scope: RouteScope,
    pub protocol: u8,
}

impl Route {
    /// What the kernel treats as the route's identity in a table: a second route with the same
    /// key is a replacement, not an addition.
    pub fn key(&self) -> (u32, Ipv4Net, u32) {
        (self.table, self.destination, self.metric)
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == RouteKind::Unreachable {
            write!(f, "unreachable ")?;
        }
        if self.destination.prefix_len() == 0 {
            write!(f, "default")?;
        } else {
            write!(f, "{}", self.destination)?;
        }
        if let Some(gateway) = self.gateway {
            write!(f, " via {gateway}")?;
        }
        if let Some(interface) = &self.interface {
            write!(f, " dev {}", interface.name)?;
        }
        match self.scope {
            RouteScope::Link if self.gateway.is_none() && self.kind == RouteKind::Unicast => {
                write!(f, " scope link")?
            }
            RouteScope::Host => write!(f, " scope host")?,
            _ => {}
        }
        if let Some(source) = self.preferred_source {
            write!(f, " src {source}")?;
        }
        if self.metric != 0 {
            write!(f, " metric {}", self.metric)?;
        }
        write!(f, " table {} proto {}", self.table, self.protocol)
    }
}

/// What a rule does when it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Lookup {
    pub table: u32,
    /// Ignore routes with a prefix this short or shorter (`suppress_prefixlength`).
    pub suppress_prefix_length: Option<u32>,
}

/// An IPv4 policy-routing rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Rule {
    pub priority: u32,
    /// Incoming interface; `lo` matches only the gateway's own traffic.
    pub iif: Option<String>,
    pub from: Option<Ipv4Net>,
    pub to: Option<Ipv4Net>,
    /// Mark and mask.
    pub fwmark: Option<(u32, u32)>,
    pub lookup: Lookup,
    pub protocol: u8,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "priority {}", self.priority)?;
        if let Some(iif) = &self.iif {
            write!(f, " iif {iif}")?;
        }
        if let Some(from) = self.from {
            write!(f, " from {from}")?;
        }
        if let Some(to) = self.to {
            write!(f, " to {to}")?;
        }
        if let Some((mark, mask)) = self.fwmark {
            write!(f, " fwmark {mark:#x}/{mask:#x}")?;
        }
        match self.lookup.table {
            254 => write!(f, " lookup main")?,
            table => write!(f, " lookup {table}")?,
        }
        if let Some(length) = self.lookup.suppress_prefix_length {
            write!(f, " suppress_prefixlength {length}")?;
        }
        write!(f, " proto {}", self.protocol)
    }
}

/// One kernel setting under /proc/sys, by its path below /proc/sys (so interface names with dots
/// stay unambiguous).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct SysctlKey(pub String);

impl SysctlKey {
    pub fn global(path: &str) -> Self {
        SysctlKey(path.to_string())
    }

    pub fn ipv4_conf(interface: &str, setting: &str) -> Self {
        SysctlKey(format!("net/ipv4/conf/{interface}/{setting}"))
    }

    /// The interface a per-interface setting is about.
    pub fn interface(&self) -> Option<&str> {
        self.0.strip_prefix("net/ipv4/conf/")?.split('/').next()
    }

    /// The name `sysctl` prints: dots between levels, slashes inside an interface name.
    pub fn dotted(&self) -> String {
        self.0
            .split('/')
            .map(|part| part.replace('.', "/"))
            .collect::<Vec<_>>()
            .join(".")
    }
}

impl fmt::Display for SysctlKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.dotted())
    }
}
