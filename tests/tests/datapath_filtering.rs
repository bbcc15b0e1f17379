//! Filtering and reserved ports through BPF_PROG_TEST_RUN: under endpoint-independent
//! filtering a remote's datagram to a mapping creates an unsolicited flow in the pending table,
//! translated to the client, that more datagrams from the remote never promote and the client's
//! answer does, and a mapped port serves one endpoint; under the default filtering the same
//! datagram is not translated; a reserved port is never a translated port; an inbound flood
//! toward one mapping gets a bounded number of unsolicited flows. Root only.

mod datapath;

use std::net::Ipv4Addr;

use balancer_common::{
    counters::{COUNTER_UNSOLICITED_ADMITTED, COUNTER_UNSOLICITED_REFUSED},
    flow::{FLOW_FLAG_UNSOLICITED, FlowKey, PROTOCOL_UDP},
    maps::{
        FLOWS, PENDING_FLOWS, PROGRAM_LAN_INGRESS as LAN, PROGRAM_UPLINK_INGRESS as INGRESS,
        UNSOLICITED_FLOWS_PER_SECOND,
    },
    stats::UPLINK_RX_UNSOLICITED,
    uplink::{FILTERING_ENDPOINT_INDEPENDENT, Settings},
};
use datapath::{
    harness::{Datapath, PASS, be, uplink_addr},
    packet::{Packet, view},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 6);
const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const STRANGER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 99);

fn load(filtering: u8) -> anyhow::Result<Datapath> {
    let mut dp = Datapath::load()?;
    dp.set_weights(&[(1, 1)])?;
    dp.set_settings(Settings {
        drop_untranslated: 1,
        filtering,
        ..Settings::default()
    })?;
    Ok(dp)
}

/// The client's flow to the server; returns its translated port.
fn open(dp: &Datapath, client: Ipv4Addr, server: Ipv4Addr) -> anyhow::Result<u16> {
    let request = Packet::udp((client, 62_000), (server, 3478));
    let run = dp.run(LAN, &request.bytes(), 0)?;
    anyhow::ensure!(run.action == PASS && run.mark == 1 << 24, "not steered");
    let key = FlowKey {
        client_addr: be(client),
        remote_addr: be(server),
        client_port: 62_000u16.to_be(),
        remote_port: 3478u16.to_be(),
        protocol: PROTOCOL_UDP,
        _pad: [0; 3],
    };
    let entry = dp.flow(&key)?.ok_or_else(|| anyhow::anyhow!("no flow"))?;
    Ok(u16::from_be(entry.nat_port))
}

fn stranger_key() -> FlowKey {
    FlowKey {
        client_addr: be(CLIENT),
        remote_addr: be(STRANGER),
        client_port: 62_000u16.to_be(),
        remote_port: 5000u16.to_be(),
        protocol: PROTOCOL_UDP,
        _pad: [0; 3],
    }
}

fn in_table(dp: &Datapath, table: &str, key: &FlowKey) -> anyhow::Result<Option<u8>> {
    Ok(dp
        .table_flows(table)?
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, entry)| entry.flags))
}

#[test]
fn endpoint_independent_filtering_admits_a_stranger_as_a_pending_flow_until_the_client_answers()
-> anyhow::Result<()> {
    let dp = load(FILTERING_ENDPOINT_INDEPENDENT)?;
    assert_eq!(open(&dp, CLIENT, SERVER)?, 62_000);
    let unsolicited = Packet::udp((STRANGER, 5000), (uplink_addr(1), 62_000)).bytes();
    for n in 0..4 {
        let run = dp.run(INGRESS, &unsolicited, 0)?;
        assert_eq!(run.action, PASS);
        let seen = view(&run.data);
        assert_eq!(
            (seen.src, seen.dst, seen.dst_port),
            (STRANGER, CLIENT, 62_000),
            "datagram {n} translated to the client"
        );
        assert_eq!(run.mark, 1 << 24);
        // Pending, flagged unsolicited; the remote's datagrams never promote it.
        assert_eq!(
            in_table(&dp, PENDING_FLOWS, &stranger_key())?,
            Some(FLOW_FLAG_UNSOLICITED),
            "datagram {n}"
        );
        assert_eq!(in_table(&dp, FLOWS, &stranger_key())?, None);
    }
    assert_eq!(dp.counter(COUNTER_UNSOLICITED_ADMITTED)?, 1);
    assert_eq!(dp.uplink_counter(1, UPLINK_RX_UNSOLICITED)?, 4);
    // The client answers: the flow is answered now, in the main table, unflagged.
    let answer = Packet::udp((CLIENT, 62_000), (STRANGER, 5000)).bytes();
    let run = dp.run(LAN, &answer, 0)?;
    assert_eq!((run.action, run.mark), (PASS, 1 << 24));
    assert_eq!(in_table(&dp, FLOWS, &stranger_key())?, Some(0));
    assert_eq!(in_table(&dp, PENDING_FLOWS, &stranger_key())?, None);
    // A mapped port serves one endpoint: another client's port 62000 is another port here.
    assert_ne!(
        open(&dp, OTHER_CLIENT, Ipv4Addr::new(203, 0, 113, 2))?,
        62_000
    );
    Ok(())
}

#[test]
fn default_filtering_leaves_a_strangers_datagram_untranslated() -> anyhow::Result<()> {
    let dp = load(0)?;
    assert_eq!(open(&dp, CLIENT, SERVER)?, 62_000);
    let unsolicited = Packet::udp((STRANGER, 5000), (uplink_addr(1), 62_000)).bytes();
    let run = dp.run(INGRESS, &unsolicited, 0)?;
    assert_eq!(run.action, PASS);
    assert_eq!(view(&run.data).dst, uplink_addr(1), "not translated");
    assert_eq!(dp.flow(&stranger_key())?, None);
    assert_eq!(dp.counter(COUNTER_UNSOLICITED_ADMITTED)?, 0);
    assert_eq!(dp.uplink_counter(1, UPLINK_RX_UNSOLICITED)?, 1);
    // Port overlapping: another client keeps 62000 toward another server.
    assert_eq!(
        open(&dp, OTHER_CLIENT, Ipv4Addr::new(203, 0, 113, 2))?,
        62_000
    );
    Ok(())
}

#[test]
fn a_reserved_port_is_never_a_translated_port() -> anyhow::Result<()> {
    let mut dp = load(0)?;
    dp.reserve_port(PROTOCOL_UDP, 62_000)?;
    let port = open(&dp, CLIENT, SERVER)?;
    assert_ne!(port, 62_000, "the client's port is reserved");
    // The reservation is per protocol: TCP 62000 is still the client's own.
    let syn = Packet::tcp((CLIENT, 62_000), (SERVER, 443), datapath::packet::TCP_SYN);
    let run = dp.run(LAN, &syn.bytes(), 0)?;
    assert_eq!(run.action, PASS);
    let tcp = dp
        .flows()?
        .into_iter()
        .find(|(k, _)| k.protocol == 6)
        .map(|(_, e)| u16::from_be(e.nat_port));
    assert_eq!(tcp, Some(62_000));
    Ok(())
}

#[test]
fn an_inbound_flood_toward_one_mapping_gets_a_bounded_share_of_the_pending_table()
-> anyhow::Result<()> {
    let dp = load(FILTERING_ENDPOINT_INDEPENDENT)?;
    assert_eq!(open(&dp, CLIENT, SERVER)?, 62_000);
    // 200 strangers' endpoints, well within two seconds: at most one budget per second.
    for port in 0..200u16 {
        let datagram = Packet::udp((STRANGER, 10_000 + port), (uplink_addr(1), 62_000));
        dp.run(INGRESS, &datagram.bytes(), 0)?;
    }
    let admitted = dp.counter(COUNTER_UNSOLICITED_ADMITTED)?;
    let refused = dp.counter(COUNTER_UNSOLICITED_REFUSED)?;
    let per_second = u64::from(UNSOLICITED_FLOWS_PER_SECOND);
    assert_eq!(admitted + refused, 200);
    assert!(
        (per_second..=2 * per_second).contains(&admitted),
        "admitted {admitted}, refused {refused}"
    );
    let pending_unsolicited = dp
        .table_flows(PENDING_FLOWS)?
        .into_iter()
        .filter(|(_, entry)| entry.flags & FLOW_FLAG_UNSOLICITED != 0)
        .count() as u64;
    assert_eq!(pending_unsolicited, admitted);
    Ok(())
}
