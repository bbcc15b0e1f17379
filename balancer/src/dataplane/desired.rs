//! What the data plane's maps and attachments should hold, worked out from the config and the
//! observed kernel state. Pure, like `plan`: the aya side only writes what this decides.

use std::net::Ipv4Addr;

use balancer_common::{
    maps::{
        PROGRAM_LAN_INGRESS, PROGRAM_UPLINK_EGRESS, PROGRAM_UPLINK_EGRESS_RAW_IP,
        PROGRAM_UPLINK_INGRESS, PROGRAM_UPLINK_INGRESS_RAW_IP,
    },
    policy::smooth_weighted_schedule,
    uplink::{
        DESTINATION_ENTRIES, DESTINATION_PASS, DESTINATION_UPLINK_ADDRESS, SCHEDULE_SLOTS, Settings,
    },
};
use ipnet::Ipv4Net;

use crate::{config::Config, office, plan::Observed, routing::Interface, uplink::UplinkState};

/// One uplink as the programs see it (the generation is kept by the map, see `Dataplane`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkSlot {
    pub id: u32,
    pub source: Ipv4Addr,
    pub mark: u32,
    pub ifindex: u32,
    /// Takes new flows: interface up, address present, carrier, and not judged down by probes.
    pub enabled: bool,
    /// Largest MSS a SYN leaving by this uplink may announce: the interface MTU minus 40 (IPv4
    /// and TCP headers without options); 0 (no clamping) when the MTU is unknown.
    pub mss_max: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// One program on one interface hook.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    pub program: &'static str,
    pub interface: Interface,
    pub direction: Direction,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataplaneDesired {
    pub uplinks: Vec<UplinkSlot>,
    /// Uplink ids in smooth weighted round-robin order; empty when no uplink is enabled.
    pub schedule: Vec<u32>,
    /// Destination prefix -> `DESTINATION_PASS` or the uplink id that owns that subnet.
    pub destinations: Vec<(Ipv4Net, u32)>,
    pub settings: Settings,
    pub attachments: Vec<Attachment>,
}

/// The MSS that fits an IPv4 MTU: MTU - 20 (IPv4) - 20 (TCP). 0 (no clamping) for an unknown
/// MTU or one below IPv4's minimum of 68.
pub fn mss_for_mtu(mtu: u32) -> u16 {
    if mtu < 68 {
        0
    } else {
        u16::try_from(mtu - 40).unwrap_or(u16::MAX)
    }
}

/// Works out the data plane's desired state from the uplinks' states (`uplink::resolve`): every
/// configured uplink has a slot; one whose interface is absent has no hooks and takes no flows.
pub fn desired(config: &Config, observed: &Observed, states: &[UplinkState]) -> DataplaneDesired {
    let link = |name: &str| observed.links.iter().find(|l| l.interface.name == name);
    let mut uplinks = Vec::new();
    let mut attachments = Vec::new();
    let mut destinations: Vec<(Ipv4Net, u32)> = Vec::new();
    for (uplink, state) in config.uplinks.iter().zip(states) {
        uplinks.push(UplinkSlot {
            id: uplink.id,
            source: state.source.unwrap_or(Ipv4Addr::UNSPECIFIED),
            mark: uplink.mark,
            ifindex: state.interface.as_ref().map_or(0, |i| i.index),
            enabled: state.usable,
            mss_max: mss_for_mtu(state.mtu),
        });
        let Some(interface) = &state.interface else {
            continue;
        };
        // The link type decides the program variant once, at attach time: an Ethernet uplink's
        // programs never look for a raw-IP packet.
        let (egress, ingress) = if state.ethernet {
            (PROGRAM_UPLINK_EGRESS, PROGRAM_UPLINK_INGRESS)
        } else {
            (PROGRAM_UPLINK_EGRESS_RAW_IP, PROGRAM_UPLINK_INGRESS_RAW_IP)
        };
        for (program, direction) in [(egress, Direction::Egress), (ingress, Direction::Ingress)] {
            attachments.push(Attachment {
                program,
                interface: interface.clone(),
                direction,
            });
        }
        // Its own address: passed to the gateway like its other addresses, but a LAN client's
        // UDP to another's mapping there is hairpinned (the /32 wins over the subnet below).
        if let Some(source) = state.source {
            destinations.push((
                Ipv4Net::from(source),
                DESTINATION_UPLINK_ADDRESS | uplink.id,
            ));
        }
        // A modem's admin page sits in the uplink's own subnet (or is its peer): traffic there
        // must use that uplink. Two uplinks sharing a subnet cannot both own it; the first does.
        if let Some(connected) = state.connected
            && connected.prefix_len() > 0
            && state.source.is_some()
            && !destinations.iter().any(|(net, _)| *net == connected)
        {
            destinations.push((connected, uplink.id));
        }
        // Its other specific routes (a PPP peer, a DHCP server's host route) are its too.
        for route in office::uplink_routes(config, observed, &uplink.interface) {
            let net = route.destination.trunc();
            if !destinations.iter().any(|(existing, _)| *existing == net) {
                destinations.push((net, uplink.id));
            }
        }
    }
    for name in &config.lan.interfaces {
        if let Some(link) = link(name) {
            attachments.push(Attachment {
                program: PROGRAM_LAN_INGRESS,
                interface: link.interface.clone(),
                direction: Direction::Ingress,
            });
        }
    }
    // LAN networks, office destinations, loopback and every address of the gateway itself pass
    // untouched. These are
    // more specific than (or disjoint from) the uplink subnets, so longest-prefix match keeps
    // the gateway's own uplink addresses local.
    let mut pass: Vec<Ipv4Net> = config.lan.networks.clone();
    pass.extend(
        office::office_routes(config, observed)
            .into_iter()
            .map(|route| route.destination.trunc()),
    );
    pass.push(Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8).unwrap_or_default());
    pass.extend(
        observed
            .addresses
            .iter()
            .map(|a| Ipv4Net::from(a.network.addr())),
    );
    for net in pass {
        if !destinations.iter().any(|(existing, _)| *existing == net) {
            destinations.push((net, DESTINATION_PASS));
        }
    }

    let weights: Vec<(u32, u32)> = config
        .uplinks
        .iter()
        .filter(|u| uplinks.iter().any(|slot| slot.id == u.id && slot.enabled))
        .map(|u| (u.id, u.weight))
        .collect();
    let data = &config.dataplane;
    // The range the gateway's own sockets use once the pass applied its settings.
    let local_ports = crate::plan::local_port_range_move(config, observed.local_port_range)
        .or(observed.local_port_range);
    let seconds = |s: u32| u64::from(s) * 1_000_000_000;
    let settings = Settings {
        nat_port_min: data.nat_port_min,
        nat_port_max: data.nat_port_max,
        local_port_min: local_ports.map_or(0, |(low, _)| low),
        local_port_max: local_ports.map_or(0, |(_, high)| high),
        tcp_syn_timeout_ns: seconds(data.tcp_syn_timeout),
        tcp_established_timeout_ns: seconds(data.tcp_established_timeout),
        tcp_closing_timeout_ns: seconds(data.tcp_closing_timeout),
        udp_timeout_ns: seconds(data.udp_timeout),
        icmp_timeout_ns: seconds(data.icmp_timeout),
        drop_untranslated: u8::from(!config.lan.pass_untranslated),
        filtering: data.filtering.setting(),
        _pad: [0; 6],
    };
    attachments.sort();
    // The trie's capacity; the first entries (uplink subnets, LAN, office routes) matter most.
    destinations.truncate(DESTINATION_ENTRIES as usize);
    DataplaneDesired {
        uplinks,
        schedule: schedule(&weights),
        destinations,
        settings,
        attachments,
    }
}

/// Smooth weighted round robin (as nginx does it) over `(id, weight)`, one full cycle: each id
/// appears `weight` times (reduced by the common divisor, scaled down to fit the map), spread
/// out rather than in runs. The algorithm lives in `balancer_common::policy`, shared with the
/// kernel-side tests.
pub fn schedule(weights: &[(u32, u32)]) -> Vec<u32> {
    let mut slots = vec![0u32; SCHEDULE_SLOTS as usize];
    let used = smooth_weighted_schedule(weights, &mut slots);
    slots.truncate(used);
    slots
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn mss_follows_the_mtu() {
        assert_eq!(mss_for_mtu(1500), 1460);
        assert_eq!(mss_for_mtu(1492), 1452);
        assert_eq!(mss_for_mtu(1280), 1240);
        assert_eq!(mss_for_mtu(0), 0, "unknown MTU: no clamping");
        assert_eq!(mss_for_mtu(65_536), 65_496);
        assert_eq!(mss_for_mtu(1_000_000), u16::MAX);
    }

    #[test]
    fn an_uplink_without_an_ethernet_header_gets_the_raw_ip_programs() {
        use crate::netlink::{Address, Link};
        let config = Config::parse(
            "[lan]\ninterfaces = [\"lan0\"]\nnetworks = [\"198.18.0.0/24\"]\n\
             [[uplink]]\nname = \"cable\"\ninterface = \"wan1\"\ngateway = \"198.18.1.1\"\n\
             [[uplink]]\nname = \"lte\"\ninterface = \"wwan0\"\nhotplug = true\n",
        )
        .unwrap();
        let link = |index, name: &str, ethernet: bool| Link {
            interface: Interface {
                index,
                name: name.into(),
            },
            up: true,
            carrier: true,
            mtu: 1500,
            raw_ip: !ethernet,
        };
        let observed = Observed {
            links: vec![
                link(2, "lan0", true),
                link(3, "wan1", true),
                link(4, "wwan0", false),
            ],
            addresses: vec![
                Address::new(3, "198.18.1.2/24".parse().unwrap()),
                Address::new(4, "198.19.24.7/32".parse().unwrap()),
            ],
            ..Observed::default()
        };
        let states = crate::uplink::resolve(&config, &observed, &[]);
        assert!(states.iter().all(|s| s.usable), "{states:#?}");
        let wanted = desired(&config, &observed, &states);
        let enabled: Vec<(u32, bool)> = wanted.uplinks.iter().map(|s| (s.id, s.enabled)).collect();
        assert_eq!(enabled, [(1, true), (2, true)]);
        assert_eq!(wanted.schedule, [1, 2]);
        let programs = |interface: &str| -> Vec<&str> {
            wanted
                .attachments
                .iter()
                .filter(|a| a.interface.name == interface)
                .map(|a| a.program)
                .collect()
        };
        assert_eq!(
            programs("wan1"),
            [PROGRAM_UPLINK_EGRESS, PROGRAM_UPLINK_INGRESS]
        );
        assert_eq!(
            programs("wwan0"),
            [PROGRAM_UPLINK_EGRESS_RAW_IP, PROGRAM_UPLINK_INGRESS_RAW_IP]
        );
        assert_eq!(programs("lan0"), [PROGRAM_LAN_INGRESS]);
    }

    #[test]
    fn schedule_is_exact_and_spread() {
        assert_eq!(schedule(&[(1, 2), (2, 2), (3, 1)]), [1, 2, 3, 1, 2]);
        assert_eq!(
            schedule(&[(1, 20), (2, 20), (3, 10)]),
            [1, 2, 3, 1, 2],
            "weights are reduced"
        );
        assert_eq!(schedule(&[(7, 1)]), [7]);
        assert!(schedule(&[]).is_empty());
        let heavy = schedule(&[(1, 5), (2, 1)]);
        assert_eq!(
            heavy,
            [1, 1, 1, 2, 1, 1],
            "the light uplink is not starved to the end"
        );
    }

    #[test]
    fn schedule_fits_the_map_and_keeps_proportions() {
        let weights: Vec<(u32, u32)> = (1..=8).map(|id| (id, 997 - id)).collect();
        let order = schedule(&weights);
        assert!(order.len() <= SCHEDULE_SLOTS as usize);
        let total: u32 = weights.iter().map(|w| w.1).sum();
        for (id, weight) in weights {
            let share = order.iter().filter(|&&x| x == id).count() as f64 / order.len() as f64;
            let expected = f64::from(weight) / f64::from(total);
            assert!(
                (share - expected).abs() < 0.01,
                "uplink {id}: {share} vs {expected}"
            );
        }
    }
}
