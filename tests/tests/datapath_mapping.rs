//! Endpoint-independent mapping through BPF_PROG_TEST_RUN: every flow of one LAN endpoint
//! (address, port, protocol) leaves by one uplink with one translated port, whatever its
//! destination, though new flows are otherwise spread over the uplinks; a flow whose 5-tuple
//! would collide gets another port, counted, and the endpoint keeps its mapping; a mapping
//! whose uplink leaves the rotation is replaced. Root only (loading programs).

mod datapath;

use std::net::Ipv4Addr;

use balancer_common::{
    counters::COUNTER_MAPPING_COLLISIONS,
    maps::{PROGRAM_LAN_INGRESS as LAN, PROGRAM_UPLINK_EGRESS as EGRESS},
};
use datapath::{
    check::flow_key,
    harness::{Datapath, PASS},
    packet::{Packet, TCP_SYN},
};

/// Creates `request`'s flow; returns its uplink and translated port.
fn open(dp: &mut Datapath, request: &Packet) -> anyhow::Result<(u8, u16)> {
    let lan = dp.run(LAN, &request.bytes(), 0)?;
    anyhow::ensure!(lan.action == PASS && lan.mark != 0, "not steered");
    let entry = dp
        .flow(&flow_key(request))?
        .ok_or_else(|| anyhow::anyhow!("no flow"))?;
    Ok((entry.uplink_id, u16::from_be(entry.nat_port)))
}

fn server(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, n)
}

#[test]
fn one_endpoint_keeps_one_uplink_and_port_for_every_destination() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    let client = Ipv4Addr::new(10, 0, 0, 5);
    for protocol in ["udp", "tcp"] {
        let request = |n: u8, port: u16| match protocol {
            "udp" => Packet::udp((client, 62_000), (server(n), port)),
            _ => Packet::tcp((client, 62_000), (server(n), port), TCP_SYN),
        };
        let first = open(&mut dp, &request(1, 3478))?;
        assert_eq!(first.1, 62_000, "{protocol}: the client's port is kept");
        for n in 2..=12 {
            assert_eq!(
                open(&mut dp, &request(n, 3479))?,
                first,
                "{protocol}: destination {n}"
            );
        }
    }
    // Other endpoints are still spread by weight (2:2:1 over uplinks 1, 2, 3).
    let mut uplinks = std::collections::BTreeSet::new();
    for port in 0..10 {
        let other = Packet::udp((client, 50_000 + port), (server(1), 3478));
        uplinks.insert(open(&mut dp, &other)?.0);
    }
    assert_eq!(uplinks.len(), 3, "{uplinks:?}");
    Ok(())
}

#[test]
fn a_colliding_flow_gets_another_port_and_the_mapping_stays() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    dp.set_weights(&[(1, 1)])?;
    let a = Ipv4Addr::new(10, 0, 0, 5);
    let b = Ipv4Addr::new(10, 0, 0, 6);
    // A holds 62000 toward server 1; B has 62000 toward server 2 (port overlapping).
    assert_eq!(
        open(&mut dp, &Packet::udp((a, 62_000), (server(1), 53)))?.1,
        62_000
    );
    assert_eq!(
        open(&mut dp, &Packet::udp((b, 62_000), (server(2), 53)))?.1,
        62_000
    );
    // B toward server 1 would collide with A's flow: another port, counted.
    let collided = open(&mut dp, &Packet::udp((b, 62_000), (server(1), 53)))?.1;
    assert_ne!(collided, 62_000);
    assert_eq!(dp.counter(COUNTER_MAPPING_COLLISIONS)?, 1);
    // B keeps its mapping for every other destination.
    assert_eq!(
        open(&mut dp, &Packet::udp((b, 62_000), (server(3), 53)))?.1,
        62_000
    );
    // Both flows to server 1 still leave with their own ports.
    let out = dp.run(
        EGRESS,
        &Packet::udp((a, 62_000), (server(1), 53)).bytes(),
        1 << 24,
    )?;
    assert_eq!(datapath::packet::view(&out.data).src_port, 62_000);
    let out = dp.run(
        EGRESS,
        &Packet::udp((b, 62_000), (server(1), 53)).bytes(),
        1 << 24,
    )?;
    assert_eq!(datapath::packet::view(&out.data).src_port, collided);
    Ok(())
}

#[test]
fn a_mapping_whose_uplink_left_the_rotation_is_replaced() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    let client = Ipv4Addr::new(10, 0, 0, 5);
    let (id, _) = open(&mut dp, &Packet::udp((client, 62_000), (server(1), 53)))?;
    let mut uplink = dp.uplink(id)?;
    uplink.enabled = 0;
    dp.set_uplink(id, uplink)?;
    let remaining: Vec<(u32, u32)> = (1..=3u32)
        .filter(|other| *other != u32::from(id))
        .map(|other| (other, 1))
        .collect();
    dp.set_weights(&remaining)?;
    let (moved, port) = open(&mut dp, &Packet::udp((client, 62_000), (server(2), 53)))?;
    assert_ne!(moved, id);
    assert_eq!(port, 62_000);
    // The new mapping holds for the next destination.
    assert_eq!(
        open(&mut dp, &Packet::udp((client, 62_000), (server(3), 53)))?,
        (moved, 62_000)
    );
    Ok(())
}
