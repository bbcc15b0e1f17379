//! Conversions between rtnetlink's route and rule messages and the plain values in `routing`:
//! what `netlink` sends and how it reads a dump back.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        route::{
            RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope as KernelScope,
            RouteType,
        },
        rule::{RuleAction, RuleAttribute, RuleMessage},
    },
};

use super::Link;
use crate::routing::{Interface, Lookup, Route, RouteKind, RouteScope, Rule};

pub(super) fn route_to_message(route: &Route) -> RouteMessage {
    let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(route.destination.addr(), route.destination.prefix_len())
        .table_id(route.table)
        .protocol(RouteProtocol::from(route.protocol))
        .scope(match route.scope {
            RouteScope::Universe => KernelScope::Universe,
            RouteScope::Link => KernelScope::Link,
            RouteScope::Host => KernelScope::Host,
        })
        .kind(match route.kind {
            RouteKind::Unicast => RouteType::Unicast,
            RouteKind::Unreachable => RouteType::Unreachable,
        });
    if let Some(gateway) = route.gateway {
        builder = builder.gateway(gateway);
    }
    if let Some(interface) = &route.interface {
        builder = builder.output_interface(interface.index);
    }
    if let Some(source) = route.preferred_source {
        builder = builder.pref_source(source);
    }
    if route.metric != 0 {
        builder = builder.priority(route.metric);
    }
    builder.build()
}

pub(super) fn route_from_message(message: &RouteMessage, links: &[Link]) -> Option<Route> {
    if message.header.address_family != AddressFamily::Inet {
        return None;
    }
    let kind = match message.header.kind {
        RouteType::Unicast => RouteKind::Unicast,
        RouteType::Unreachable => RouteKind::Unreachable,
        _ => return None,
    };
    let mut table = u32::from(message.header.table);
    let mut destination = Ipv4Addr::UNSPECIFIED;
    let (mut gateway, mut preferred_source, mut ifindex, mut metric) = (None, None, None, 0);
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(id) => table = *id,
            RouteAttribute::Destination(RouteAddress::Inet(address)) => destination = *address,
            RouteAttribute::Gateway(RouteAddress::Inet(address)) => gateway = Some(*address),
            RouteAttribute::PrefSource(RouteAddress::Inet(address)) => {
                preferred_source = Some(*address)
            }
            RouteAttribute::Oif(index) => ifindex = Some(*index),
            RouteAttribute::Priority(value) => metric = *value,
            // Multipath routes are not the balancer's; leave them out rather than misread them.
            RouteAttribute::MultiPath(_) => return None,
            _ => {}
        }
    }
    let interface = ifindex.map(|index| {
        links
            .iter()
            .find(|l| l.interface.index == index)
            .map(|l| l.interface.clone())
            .unwrap_or(Interface {
                index,
                name: format!("if{index}"),
            })
    });
    Some(Route {
        table,
        destination: Ipv4Net::new(destination, message.header.destination_prefix_length).ok()?,
        metric,
        kind,
        gateway,
        interface,
        preferred_source,
        scope: match message.header.scope {
            KernelScope::Link => RouteScope::Link,
            KernelScope::Host => RouteScope::Host,
            _ => RouteScope::Universe,
        },
        protocol: u8::from(message.header.protocol),
    })
}

pub(super) fn rule_to_message(rule: &Rule) -> RuleMessage {
    let mut message = RuleMessage::default();
    message.header.family = AddressFamily::Inet;
    message.header.action = RuleAction::ToTable;
    if rule.lookup.table <= 255 {
        message.header.table = rule.lookup.table as u8;
    } else {
        message.header.table = 0;
        message
            .attributes
            .push(RuleAttribute::Table(rule.lookup.table));
    }
    message
        .attributes
        .push(RuleAttribute::Priority(rule.priority));
    if let Some(iif) = &rule.iif {
        message.attributes.push(RuleAttribute::Iifname(iif.clone()));
    }
    if let Some(from) = rule.from {
        message.header.src_len = from.prefix_len();
        message
            .attributes
            .push(RuleAttribute::Source(IpAddr::V4(from.addr())));
    }
    if let Some(to) = rule.to {
        message.header.dst_len = to.prefix_len();
        message
            .attributes
            .push(RuleAttribute::Destination(IpAddr::V4(to.addr())));
    }
    if let Some((mark, mask)) = rule.fwmark {
        message.attributes.push(RuleAttribute::FwMark(mark));
        message.attributes.push(RuleAttribute::FwMask(mask));
    }
    if let Some(length) = rule.lookup.suppress_prefix_length {
        message
            .attributes
            .push(RuleAttribute::SuppressPrefixLen(length));
    }
    message
        .attributes
        .push(RuleAttribute::Protocol(RouteProtocol::from(rule.protocol)));
    message
}

pub(super) fn rule_protocol(message: &RuleMessage) -> Option<u8> {
    message.attributes.iter().find_map(|a| match a {
        RuleAttribute::Protocol(protocol) => Some(u8::from(*protocol)),
        _ => None,
    })
}

pub(super) fn rule_priority(message: &RuleMessage) -> u32 {
    message
        .attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Priority(priority) => Some(*priority),
            _ => None,
        })
        .unwrap_or(0)
}

pub(super) fn rule_from_message(message: &RuleMessage) -> Option<Rule> {
    if message.header.family != AddressFamily::Inet || message.header.action != RuleAction::ToTable
    {
        return None;
    }
    let mut table = u32::from(message.header.table);
    let (mut priority, mut from, mut to, mut mark, mut mask, mut suppress) =
        (0, None, None, None, None, None);
    let mut iif = None;
    for attribute in &message.attributes {
        match attribute {
            RuleAttribute::Table(id) => table = *id,
            RuleAttribute::Priority(value) => priority = *value,
            RuleAttribute::Source(IpAddr::V4(address)) => {
                from = Ipv4Net::new(*address, message.header.src_len).ok()
            }
            RuleAttribute::Destination(IpAddr::V4(address)) => {
                to = Ipv4Net::new(*address, message.header.dst_len).ok()
            }
            RuleAttribute::FwMark(value) => mark = Some(*value),
            RuleAttribute::FwMask(value) => mask = Some(*value),
            // The kernel reports "unset" as -1.
            RuleAttribute::SuppressPrefixLen(value) if *value != u32::MAX => {
                suppress = Some(*value)
            }
            // Selectors the balancer never writes: such a rule is not one of its shapes.
            RuleAttribute::Iifname(name) => iif = Some(name.clone()),
            RuleAttribute::Oifname(_) | RuleAttribute::UidRange(_) => {
                return None;
            }
            _ => {}
        }
    }
    // A mark with no mask attribute matches all bits.
    let fwmark = mark
        .filter(|&m| m != 0 || mask.is_some())
        .map(|m| (m, mask.unwrap_or(u32::MAX)));
    Some(Rule {
        priority,
        iif,
        from,
        to,
        fwmark,
        lookup: Lookup {
            table,
            suppress_prefix_length: suppress,
        },
        protocol: rule_protocol(message).unwrap_or(0),
    })
}
