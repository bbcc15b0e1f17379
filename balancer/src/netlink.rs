//! The only module that speaks rtnetlink: reads links, addresses, routes, rules and neighbours,
//! and adds, replaces or deletes routes and rules. It converts between the kernel's messages and
//! the plain values in `routing`; it makes no decisions.

use std::net::{IpAddr, Ipv4Addr};

use futures::{StreamExt, TryStreamExt};
use ipnet::Ipv4Net;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_core::{
        NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    },
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressScope},
        link::{LinkAttribute, LinkFlags, LinkLayerType},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
        route::RouteAttribute,
        rule::RuleMessage,
    },
};

mod messages;

use self::messages::{
    route_from_message, route_to_message, rule_from_message, rule_priority, rule_protocol,
    rule_to_message,
};
use crate::{
    ownership,
    routing::{Interface, Route, Rule},
};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket")]
    Connect(#[source] std::io::Error),
    #[error("{action}")]
    Kernel {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{action}")]
    Protocol {
        action: String,
        #[source]
        source: rtnetlink::Error,
    },
}

impl NetlinkError {
    fn from_rtnetlink(action: impl Into<String>, source: rtnetlink::Error) -> Self {
        match source {
            rtnetlink::Error::NetlinkError(message) => NetlinkError::Kernel {
                action: action.into(),
                source: message.to_io(),
            },
            other => NetlinkError::Protocol {
                action: action.into(),
                source: other,
            },
        }
    }

    /// The kernel's errno, when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A network interface with its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub interface: Interface,
    pub up: bool,
    pub carrier: bool,
    /// The interface MTU (0 when the kernel did not say).
    pub mtu: u32,
    /// No Ethernet header on this interface (PPP, raw-IP LTE, TUN, WireGuard): the data plane
    /// attaches its raw-IP program variants here.
    pub raw_ip: bool,
}

/// Link types whose packets start at the IP header, as tc sees them.
fn is_raw_ip(link_type: LinkLayerType) -> bool {
    matches!(
        link_type,
        LinkLayerType::None
            | LinkLayerType::Ppp
            | LinkLayerType::Rawip
            | LinkLayerType::Tunnel
            | LinkLayerType::Ipgre
    )
}

/// An IPv4 address on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub ifindex: u32,
    pub network: Ipv4Net,
    /// The far end of a point-to-point address (`ip addr add A peer B`), as PPPoE and LTE
    /// modems set it.
    pub peer: Option<Ipv4Addr>,
    /// Global scope and not secondary: the address a learned `source` is taken from.
    pub primary: bool,
}

impl Address {
    /// For tests: a primary address without a peer.
    pub fn new(ifindex: u32, network: Ipv4Net) -> Address {
        Address {
            ifindex,
            network,
            peer: None,
            primary: true,
        }
    }
}

/// A connection to the kernel's routing subsystem.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a socket and drives it on the current tokio runtime.
    pub fn connect() -> Result<Netlink, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let messages: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("listing interfaces", e))?;
        Ok(messages
            .into_iter()
            .filter_map(|message| {
                let name = message.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(name) => Some(name.clone()),
                    _ => None,
                })?;
                let mtu = message.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Mtu(mtu) => Some(*mtu),
                    _ => None,
                });
                let flags = message.header.flags;
                Some(Link {
                    interface: Interface {
                        index: message.header.index,
                        name,
                    },
                    up: flags.contains(LinkFlags::Up),
                    carrier: flags.contains(LinkFlags::LowerUp),
                    mtu: mtu.unwrap_or(0),
                    raw_ip: is_raw_ip(message.header.link_layer_type),
                })
            })
            .collect())
    }

    pub async fn ipv4_addresses(&self) -> Result<Vec<Address>, NetlinkError> {
        let messages: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("listing addresses", e))?;
        Ok(messages
            .into_iter()
            .filter(|m| m.header.family == AddressFamily::Inet)
            .filter_map(|message| {
                // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on
                // point-to-point links (PPPoE), so prefer the former.
                let local = message.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(address)) => Some(*address),
                    _ => None,
                });
                let remote = message.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V4(address)) => Some(*address),
                    _ => None,
                });
                let address = local.or(remote)?;
                let network = Ipv4Net::new(address, message.header.prefix_len).ok()?;
                let secondary = message
                    .header
                    .flags
                    .contains(AddressHeaderFlags::Secondary)
                    || message.attributes.iter().any(|a| {
                        matches!(a, AddressAttribute::Flags(flags) if flags.contains(AddressFlags::Secondary))
                    });
                Some(Address {
                    ifindex: message.header.index,
                    network,
                    peer: remote.filter(|peer| *peer != address),
                    primary: message.header.scope == AddressScope::Universe && !secondary,
                })
            })
            .collect())
    }

    /// Every IPv4 unicast and unreachable route in every table, with interface names resolved
    /// from `links`.
    pub async fn routes(&self, links: &[Link]) -> Result<Vec<Route>, NetlinkError> {
        let request = RouteMessageBuilder::<Ipv4Addr>::new().table_id(0).build();
        let mut request = self.handle.route().get(request);
        // A dump of table 0 with no table attribute returns every table.
        request
            .message_mut()
            .attributes
            .retain(|a| !matches!(a, RouteAttribute::Table(_)));
        let messages: Vec<_> = request
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("listing routes", e))?;
        Ok(messages
            .iter()
            .filter_map(|m| route_from_message(m, links))
            .collect())
    }

    /// Every IPv4 rule that looks up a table (the form the balancer writes and reads).
    pub async fn rules(&self) -> Result<Vec<Rule>, NetlinkError> {
        Ok(self
            .rule_messages()
            .await?
            .iter()
            .filter_map(rule_from_message)
            .collect())
    }

    async fn rule_messages(&self) -> Result<Vec<RuleMessage>, NetlinkError> {
        self.handle
            .rule()
            .get(rtnetlink::IpVersion::V4)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("listing rules", e))
    }

    pub async fn add_route(&self, route: &Route) -> Result<(), NetlinkError> {
        let message = route_to_message(route);
        self.send(
            RouteNetlinkMessage::NewRoute(message),
            NLM_F_CREATE | NLM_F_EXCL,
            || format!("ip route add {route}"),
        )
        .await
    }

    /// Changes the route with the same table, destination and metric in place, so traffic never
    /// sees a moment without it.
    pub async fn replace_route(&self, route: &Route) -> Result<(), NetlinkError> {
        let message = route_to_message(route);
        self.send(
            RouteNetlinkMessage::NewRoute(message),
            NLM_F_CREATE | NLM_F_REPLACE,
            || format!("ip route replace {route}"),
        )
        .await
    }

    pub async fn delete_route(&self, route: &Route) -> Result<(), NetlinkError> {
        let message = route_to_message(route);
        self.send(RouteNetlinkMessage::DelRoute(message), 0, || {
            format!("ip route del {route}")
        })
        .await
    }

    pub async fn add_rule(&self, rule: &Rule) -> Result<(), NetlinkError> {
        let message = rule_to_message(rule);
        self.send(
            RouteNetlinkMessage::NewRule(message),
            NLM_F_CREATE | NLM_F_EXCL,
            || format!("ip rule add {rule}"),
        )
        .await
    }

    pub async fn delete_rule(&self, rule: &Rule) -> Result<(), NetlinkError> {
        let message = rule_to_message(rule);
        self.send(RouteNetlinkMessage::DelRule(message), 0, || {
            format!("ip rule del {rule}")
        })
        .await
    }

    /// Deletes every rule and route tagged with the balancer's protocol, in any shape, and
    /// returns how many of each it removed. Keeps going past failures and reports them all.
    pub async fn delete_all_owned(&self, links: &[Link]) -> (usize, usize, Vec<NetlinkError>) {
        let mut errors = Vec::new();
        let mut rules_removed = 0;
        match self.rule_messages().await {
            Ok(messages) => {
                for message in messages.into_iter().filter(|m| {
                    ownership::owns_rule(rule_protocol(m).unwrap_or(0), rule_priority(m))
                }) {
                    let shown = rule_from_message(&message)
                        .map(|rule| rule.to_string())
                        .unwrap_or_else(|| format!("{message:?}"));
                    match self
                        .send(RouteNetlinkMessage::DelRule(message), 0, || {
                            format!("ip rule del {shown}")
                        })
                        .await
                    {
                        Ok(()) => rules_removed += 1,
                        Err(error) if is_gone(&error) => {}
                        Err(error) => errors.push(error),
                    }
                }
            }
            Err(error) => errors.push(error),
        }
        let mut routes_removed = 0;
        match self.routes(links).await {
            Ok(routes) => {
                for route in routes
                    .iter()
                    .filter(|r| ownership::owns_route(r.protocol, r.table))
                {
                    match self.delete_route(route).await {
                        Ok(()) => routes_removed += 1,
                        Err(error) if is_gone(&error) => {}
                        Err(error) => errors.push(error),
                    }
                }
            }
            Err(error) => errors.push(error),
        }
        (rules_removed, routes_removed, errors)
    }

    /// Forgets every learned IPv4 neighbour on an interface, so a modem's MAC learned before the
    /// ARP settings took effect is asked again. Returns how many entries were removed.
    pub async fn flush_neighbours(&self, interface: &Interface) -> Result<usize, NetlinkError> {
        let action = || format!("ip neigh flush dev {}", interface.name);
        let entries: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink(action(), e))?;
        let mut removed = 0;
        for entry in entries {
            let learned = !matches!(
                entry.header.state,
                NeighbourState::Permanent | NeighbourState::Noarp
            );
            let ipv4 = entry.attributes.iter().any(|a| {
                matches!(
                    a,
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(_))
                )
            });
            if entry.header.ifindex != interface.index || !learned || !ipv4 {
                continue;
            }
            match self.handle.neighbours().del(entry).execute().await {
                Ok(()) => removed += 1,
                Err(error) => {
                    let error = NetlinkError::from_rtnetlink(action(), error);
                    if !is_gone(&error) {
                        return Err(error);
                    }
                }
            }
        }
        Ok(removed)
    }

    async fn send(
        &self,
        message: RouteNetlinkMessage,
        flags: u16,
        action: impl Fn() -> String,
    ) -> Result<(), NetlinkError> {
        let mut request = NetlinkMessage::from(message);
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut handle = self.handle.clone();
        let mut responses = handle
            .request(request)
            .map_err(|e| NetlinkError::from_rtnetlink(action(), e))?;
        while let Some(response) = responses.next().await {
            if let rtnetlink::packet_core::NetlinkPayload::Error(error) = response.payload
                && error.code.is_some()
            {
                return Err(NetlinkError::Kernel {
                    action: action(),
                    source: error.to_io(),
                });
            }
        }
        Ok(())
    }
}

/// True when a delete failed because the object is already gone, which is what was wanted.
pub fn is_gone(error: &NetlinkError) -> bool {
    matches!(error.errno(), Some(libc::ENOENT) | Some(libc::ESRCH))
}

/// True when an add failed because an equal object exists.
pub fn is_exists(error: &NetlinkError) -> bool {
    error.errno() == Some(libc::EEXIST)
}
