//! NAT ports and flow lifetime through BPF_PROG_TEST_RUN: how translated ports are chosen,
//! what happens when a range is full (drops counted, or the port of a TCP flow that is over
//! taken), and what keeps a flow alive. Root only (loading programs); nothing is attached.

mod datapath;

use std::net::Ipv4Addr;

use balancer_common::{
    maps::{
        PROGRAM_LAN_INGRESS as LAN, PROGRAM_UPLINK_EGRESS as EGRESS,
        PROGRAM_UPLINK_INGRESS as INGRESS,
    },
    stats::{DROP_NAT_EXHAUSTED, UPLINK_NAT_EXHAUSTED, UPLINK_NEW_FLOWS},
    uplink::Settings,
};
use datapath::{
    check::{flow_key, reply_to, round_trip},
    harness::{DROP, Datapath, PASS, be, uplink_addr},
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, view},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// Every new flow on uplink 1, with two translated ports (61000 and 61001) per destination.
fn two_port_range() -> anyhow::Result<Datapath> {
    let mut dp = Datapath::load()?;
    dp.set_weights(&[(1, 1)])?;
    dp.set_settings(Settings {
        nat_port_min: 61_000,
        nat_port_max: 61_001,
        ..Settings::default()
    })?;
    Ok(dp)
}

#[test]
fn same_client_port_from_two_clients_gets_two_nat_ports() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    dp.set_weights(&[(2, 1)])?;
    let first = Packet::tcp((CLIENT, 62_000), (SERVER, 443), TCP_SYN);
    let second = Packet::tcp((Ipv4Addr::new(10, 0, 0, 6), 62_000), (SERVER, 443), TCP_SYN);
    let (id1, port1) = round_trip(&mut dp, &first)?;
    let (id2, port2) = round_trip(&mut dp, &second)?;
    assert_eq!((id1, id2), (2, 2));
    // An in-range client port is kept; the second client cannot have it too.
    assert_eq!(port1, 62_000);
    assert_ne!(port2, port1);
    // Both flows still translate after the other was created.
    let again = dp.run(EGRESS, &first.bytes(), 0)?;
    assert_eq!(view(&again.data).src_port, port1);
    assert_eq!(dp.flows()?.len(), 2);
    assert_eq!(dp.reverse()?.len(), 2);
    Ok(())
}

/// Packets each program must leave alone, with the reason it counts.
#[test]
fn nat_port_exhaustion_drops_and_counts() -> anyhow::Result<()> {
    let dp = two_port_range()?;
    let mut actions = Vec::new();
    for client in 5..8 {
        let syn = Packet::tcp(
            (Ipv4Addr::new(10, 0, 0, client), 40_000),
            (SERVER, 443),
            TCP_SYN,
        );
        actions.push(dp.run(LAN, &syn.bytes(), 0)?.action);
    }
    assert_eq!(actions, [PASS, PASS, DROP]);
    assert_eq!(dp.reason(DROP_NAT_EXHAUSTED)?, 1);
    assert_eq!(dp.uplink_counter(1, UPLINK_NAT_EXHAUSTED)?, 1);
    assert_eq!(dp.uplink_counter(1, UPLINK_NEW_FLOWS)?, 2);
    // No half flow: two complete pairs, on the two ports of the range.
    let flows = dp.flows()?;
    let mut ports: Vec<u16> = flows
        .iter()
        .map(|(_, entry)| u16::from_be(entry.nat_port))
        .collect();
    ports.sort_unstable();
    assert_eq!(ports, [61_000, 61_001]);
    assert_eq!(dp.reverse()?.len(), 2);
    Ok(())
}

#[test]
fn a_full_range_takes_the_port_of_a_tcp_flow_that_is_over() -> anyhow::Result<()> {
    let dp = two_port_range()?;
    let client = |n: u8| Ipv4Addr::new(10, 0, 0, n);
    let packet = |n: u8, flags| Packet::tcp((client(n), 40_000), (SERVER, 443), flags).bytes();
    for n in [5, 6] {
        assert_eq!(dp.run(LAN, &packet(n, TCP_SYN), 0)?.action, PASS);
    }
    // Client 5 resets its connection (with the sequence number it sends next, as a stack
    // does); client 6 only half-closes its own.
    let next = dp
        .flows()?
        .iter()
        .find(|(key, _)| key.client_addr == be(client(5)))
        .map(|(_, entry)| entry.client_seq_next)
        .ok_or_else(|| anyhow::anyhow!("no flow 5"))?;
    let rst = Packet::tcp((client(5), 40_000), (SERVER, 443), TCP_RST | TCP_ACK).with_seq(next);
    assert_eq!(dp.run(LAN, &rst.bytes(), 0)?.mark, 1 << 24);
    assert_eq!(dp.run(LAN, &packet(6, TCP_FIN | TCP_ACK), 0)?.mark, 1 << 24);
    let port_of = |dp: &Datapath, n: u8| -> anyhow::Result<Option<u16>> {
        Ok(dp
            .flows()?
            .iter()
            .find(|(key, _)| key.client_addr == be(client(n)))
            .map(|(_, entry)| u16::from_be(entry.nat_port)))
    };
    let reset_port = port_of(&dp, 5)?.ok_or_else(|| anyhow::anyhow!("no flow 5"))?;

    // Right after the reset the port is still held (late packets of the old connection).
    assert_eq!(dp.run(LAN, &packet(7, TCP_SYN), 0)?.action, DROP);
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert_eq!(dp.run(LAN, &packet(7, TCP_SYN), 0)?.action, PASS);
    assert_eq!(port_of(&dp, 7)?, Some(reset_port), "the reset flow's port");
    assert_eq!(
        port_of(&dp, 5)?,
        None,
        "the reset flow is gone, both halves"
    );
    assert!(port_of(&dp, 6)?.is_some());
    let mut owners: Vec<u32> = dp
        .reverse()?
        .iter()
        .map(|(_, key)| key.client_addr)
        .collect();
    owners.sort_unstable();
    assert_eq!(owners, [be(client(6)), be(client(7))]);
    // A late packet of the old connection is not translated onto the new one.
    assert_eq!(dp.run(LAN, &packet(5, TCP_ACK), 0)?.mark, 0);
    // A half-closed flow keeps its port; closed by both ends, and quiet for the grace, not.
    assert_eq!(dp.run(LAN, &packet(8, TCP_SYN), 0)?.action, DROP);
    let half_closed = port_of(&dp, 6)?.ok_or_else(|| anyhow::anyhow!("no flow 6"))?;
    let remote_fin = Packet::tcp(
        (SERVER, 443),
        (uplink_addr(1), half_closed),
        TCP_FIN | TCP_ACK,
    );
    assert_eq!(dp.run(INGRESS, &remote_fin.bytes(), 0)?.mark, 1 << 24);
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert_eq!(dp.run(LAN, &packet(8, TCP_SYN), 0)?.action, PASS);
    assert_eq!(port_of(&dp, 8)?, Some(half_closed));
    Ok(())
}

#[test]
fn replies_alone_keep_a_flow_alive() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    dp.set_weights(&[(1, 1)])?;
    dp.set_settings(Settings {
        udp_timeout_ns: 300_000_000,
        ..Settings::default()
    })?;
    let request = Packet::udp((CLIENT, 40_000), (SERVER, 5004));
    let (id, port) = round_trip(&mut dp, &request)?;
    let reply = reply_to(&request, uplink_addr(id), port).bytes();
    // The remote keeps sending for longer than the timeout while the client stays silent.
    for _ in 0..4 {
        std::thread::sleep(std::time::Duration::from_millis(120));
        let run = dp.run(INGRESS, &reply, 0)?;
        assert_eq!(view(&run.data).dst, CLIENT, "reply translated");
    }
    let entry = dp
        .flow(&flow_key(&request))?
        .ok_or_else(|| anyhow::anyhow!("no flow"))?;
    let (_, reverse) = dp
        .reverse_entries()?
        .into_iter()
        .find(|(_, value)| value.flow == flow_key(&request))
        .ok_or_else(|| anyhow::anyhow!("no reverse entry"))?;
    assert!(
        reverse.last_reply_ns > entry.last_seen_ns + 300_000_000,
        "ordinary replies refresh the reverse half only: {reverse:?} {entry:?}"
    );
    // The client speaks again: the same flow, not a new translation.
    let run = dp.run(LAN, &request.bytes(), 0)?;
    assert_eq!(run.mark, u32::from(id) << 24);
    assert_eq!(dp.uplink_counter(u32::from(id), UPLINK_NEW_FLOWS)?, 1);
    Ok(())
}
