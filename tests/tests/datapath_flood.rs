//! The flow table under pressure, through BPF_PROG_TEST_RUN: unanswered flows wait in a
//! pending table of their own and move to the main one on their first answer, so a flood of
//! new flows never evicts an answered one; halves left alone by the pending LRU are removed
//! and their ports taken; a full main table refuses a promotion without breaking the flow.
//! Root only (loading programs); nothing is attached.

mod datapath;

use std::{collections::HashSet, net::Ipv4Addr};

use balancer_common::{
    counters::{COUNTER_HALVES_REMOVED, COUNTER_PORT_TAKEOVERS, COUNTER_PROMOTIONS_REFUSED},
    flow::ReverseKey,
    maps::{
        FLOWS, NAT_REVERSE, PENDING_FLOWS, PENDING_REVERSE, PROGRAM_LAN_INGRESS as LAN,
        PROGRAM_UPLINK_EGRESS as EGRESS, PROGRAM_UPLINK_INGRESS as INGRESS,
    },
    uplink::Settings,
};
use datapath::{
    check::{flow_key, reply_to},
    harness::{DROP, Datapath, PASS, be, uplink_addr},
    packet::{Packet, TCP_SYN, view},
};

const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// Sends `request` from the LAN out of uplink 1; returns the translated source port.
fn open(dp: &Datapath, request: &Packet) -> anyhow::Result<u16> {
    let lan = dp.run(LAN, &request.bytes(), 0)?;
    anyhow::ensure!(
        lan.action == PASS && lan.mark == 1 << 24,
        "lan_ingress {} mark {:#x}",
        lan.action,
        lan.mark
    );
    let out = dp.run(EGRESS, &request.bytes(), lan.mark)?;
    let v = view(&out.data);
    anyhow::ensure!(v.src == uplink_addr(1), "left untranslated from {}", v.src);
    Ok(v.src_port)
}

/// The remote answers `request` (translated to `port`); returns whether the answer reached the
/// client, translated back.
fn answer(dp: &Datapath, request: &Packet, port: u16) -> anyhow::Result<bool> {
    let reply = reply_to(request, uplink_addr(1), port);
    let back = dp.run(INGRESS, &reply.bytes(), 0)?;
    let v = view(&back.data);
    Ok(v.dst == request.src && back.mark == 1 << 24)
}

/// Every flow on uplink 1.
fn one_uplink(entries: u32) -> anyhow::Result<Datapath> {
    let mut dp = Datapath::load_with_entries(entries)?;
    dp.set_weights(&[(1, 1)])?;
    Ok(dp)
}

#[test]
fn a_new_flow_waits_in_the_pending_table_until_its_first_answer() -> anyhow::Result<()> {
    let dp = one_uplink(1024)?;
    let request = Packet::udp((Ipv4Addr::new(10, 0, 0, 5), 5353), (SERVER, 53));
    let port = open(&dp, &request)?;
    assert_eq!(dp.table_flows(PENDING_FLOWS)?.len(), 1);
    assert_eq!(dp.table_reverse(PENDING_REVERSE)?.len(), 1);
    assert!(dp.table_flows(FLOWS)?.is_empty());
    assert!(
        answer(&dp, &request, port)?,
        "the first answer is translated"
    );
    // Promoted: both halves moved, none left behind.
    let main = dp.table_flows(FLOWS)?;
    assert_eq!(main.len(), 1);
    assert_eq!(main[0].0, flow_key(&request));
    assert_eq!(u16::from_be(main[0].1.nat_port), port);
    assert_eq!(dp.table_reverse(NAT_REVERSE)?.len(), 1);
    assert!(dp.table_flows(PENDING_FLOWS)?.is_empty());
    assert!(dp.table_reverse(PENDING_REVERSE)?.is_empty());
    // Both directions go on with the same translation.
    assert_eq!(open(&dp, &request)?, port);
    assert!(answer(&dp, &request, port)?);
    Ok(())
}

#[test]
fn a_flood_of_unanswered_flows_evicts_no_answered_flow() -> anyhow::Result<()> {
    const ENTRIES: u32 = 1024;
    let dp = one_uplink(ENTRIES)?;
    // Eight established connections of one host: SYN out, SYN-ACK back.
    let established: Vec<Packet> = (0..8)
        .map(|n| {
            Packet::tcp(
                (Ipv4Addr::new(10, 0, 0, 5), 40_000 + n),
                (SERVER, 443),
                TCP_SYN,
            )
        })
        .collect();
    let mut ports = Vec::new();
    for syn in &established {
        let port = open(&dp, syn)?;
        assert!(answer(&dp, syn, port)?);
        ports.push(port);
    }
    // Another host opens 20 times the table's size of UDP flows nobody answers.
    let flooder = Ipv4Addr::new(10, 0, 0, 66);
    for n in 0..(20 * ENTRIES) {
        let remote = Ipv4Addr::new(198, 51, 100, (n % 200) as u8 + 1);
        let flood = Packet::udp((flooder, 1024 + (n / 200) as u16), (remote, 9));
        let lan = dp.run(LAN, &flood.bytes(), 0)?;
        assert_eq!(lan.action, PASS, "flood flow {n}");
        dp.run(EGRESS, &flood.bytes(), lan.mark)?;
    }
    // Every established connection is still there, both ways, with its port.
    assert_eq!(dp.table_flows(FLOWS)?.len(), 8);
    assert_eq!(dp.table_reverse(NAT_REVERSE)?.len(), 8);
    for (syn, port) in established.iter().zip(&ports) {
        let data = Packet::tcp(
            (syn.src, u16::from_be(flow_key(syn).client_port)),
            (SERVER, 443),
            0x18,
        );
        assert_eq!(open(&dp, &data)?, *port);
        assert!(answer(&dp, syn, *port)?);
    }
    // The flood stayed within its own table.
    assert!(dp.table_flows(PENDING_FLOWS)?.len() <= ENTRIES as usize);
    // A new connection from a third host works right after the flood.
    let newcomer = Packet::tcp((Ipv4Addr::new(10, 0, 0, 7), 50_000), (SERVER, 443), TCP_SYN);
    let port = open(&dp, &newcomer)?;
    assert!(answer(&dp, &newcomer, port)?);
    assert_eq!(dp.table_flows(FLOWS)?.len(), 9);
    // No translated tuple is held by two flows, in either table.
    let mut seen = HashSet::new();
    for (key, entry) in dp.flows()? {
        let reverse = ReverseKey {
            uplink_addr: entry.uplink_addr,
            remote_addr: key.remote_addr,
            nat_port: entry.nat_port,
            remote_port: key.remote_port,
            protocol: key.protocol,
            _pad: [0; 3],
        };
        assert!(seen.insert(reverse), "two flows hold {reverse:?}");
    }
    let mut reverse_seen = HashSet::new();
    for (key, _) in dp.reverse_entries()? {
        assert!(reverse_seen.insert(key), "{key:?} in both reverse tables");
    }
    Ok(())
}

#[test]
fn a_pending_flow_whose_reverse_half_was_evicted_is_made_again() -> anyhow::Result<()> {
    let mut dp = one_uplink(1024)?;
    let request = Packet::udp((Ipv4Addr::new(10, 0, 0, 5), 62_000), (SERVER, 53));
    let port = open(&dp, &request)?;
    assert_eq!(port, 62_000);
    let (reverse, _) = dp.table_reverse(PENDING_REVERSE)?[0];
    dp.remove_reverse(PENDING_REVERSE, &reverse)?;
    // Its next packet finds the forward half alone: replaced, with a reverse half again.
    let again = open(&dp, &request)?;
    assert_eq!(again, port, "the client's port, free again, is kept");
    assert_eq!(dp.counter(COUNTER_HALVES_REMOVED)?, 1);
    assert_eq!(dp.table_flows(PENDING_FLOWS)?.len(), 1);
    assert_eq!(dp.table_reverse(PENDING_REVERSE)?.len(), 1);
    assert!(answer(&dp, &request, port)?);
    Ok(())
}

#[test]
fn a_reply_to_a_pending_flow_that_was_evicted_removes_the_half_left() -> anyhow::Result<()> {
    let mut dp = one_uplink(1024)?;
    let request = Packet::udp((Ipv4Addr::new(10, 0, 0, 5), 5353), (SERVER, 53));
    let port = open(&dp, &request)?;
    dp.remove_flow(PENDING_FLOWS, &flow_key(&request))?;
    assert!(!answer(&dp, &request, port)?, "no flow, no translation");
    assert!(dp.table_reverse(PENDING_REVERSE)?.is_empty());
    assert_eq!(dp.counter(COUNTER_HALVES_REMOVED)?, 1);
    Ok(())
}

#[test]
fn a_port_held_by_a_half_left_alone_is_taken_after_a_grace() -> anyhow::Result<()> {
    let mut dp = one_uplink(1024)?;
    dp.set_settings(Settings {
        nat_port_min: 61_000,
        nat_port_max: 61_000,
        ..Settings::default()
    })?;
    let first = Packet::udp((Ipv4Addr::new(10, 0, 0, 5), 5353), (SERVER, 53));
    let second = Packet::udp((Ipv4Addr::new(10, 0, 0, 6), 5353), (SERVER, 53));
    assert_eq!(open(&dp, &first)?, 61_000);
    dp.remove_flow(PENDING_FLOWS, &flow_key(&first))?;
    // A reverse half this young may be a flow being created on another CPU: kept.
    assert_eq!(dp.run(LAN, &second.bytes(), 0)?.action, DROP);
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert_eq!(open(&dp, &second)?, 61_000);
    assert_eq!(dp.counter(COUNTER_PORT_TAKEOVERS)?, 1);
    let owners: Vec<u32> = dp
        .reverse()?
        .iter()
        .map(|(_, flow)| flow.client_addr)
        .collect();
    assert_eq!(owners, [be(Ipv4Addr::new(10, 0, 0, 6))]);
    assert!(answer(&dp, &second, 61_000)?);
    Ok(())
}

#[test]
fn a_full_main_table_refuses_the_promotion_and_the_flow_goes_on() -> anyhow::Result<()> {
    const ENTRIES: u32 = 32;
    let dp = one_uplink(ENTRIES)?;
    let request = |n: u32| Packet::udp((Ipv4Addr::new(10, 0, 1, n as u8), 5353), (SERVER, 53));
    for n in 0..ENTRIES {
        let port = open(&dp, &request(n))?;
        assert!(answer(&dp, &request(n), port)?);
    }
    assert_eq!(dp.table_flows(FLOWS)?.len(), ENTRIES as usize);
    let late = request(200);
    let port = open(&dp, &late)?;
    assert!(answer(&dp, &late, port)?, "answered though not promoted");
    assert_eq!(dp.counter(COUNTER_PROMOTIONS_REFUSED)?, 1);
    assert_eq!(dp.table_flows(PENDING_FLOWS)?.len(), 1);
    assert!(answer(&dp, &late, port)?);
    assert_eq!(open(&dp, &late)?, port);
    // Refused once, not retried on every reply.
    assert_eq!(dp.counter(COUNTER_PROMOTIONS_REFUSED)?, 1);
    Ok(())
}
