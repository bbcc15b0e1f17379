//! Living beside the rest of the gateway, through BPF_PROG_TEST_RUN: LAN traffic the data plane
//! cannot translate is dropped by reason when it heads for the internet and passed when it
//! goes to the office (or when the config passes untranslated traffic); non-unicast traffic
//! gets no flow; connections that arrive on an uplink are recorded at uplink ingress, and the
//! LAN host's replies are marked for that uplink without a flow or a NAT port. Root only.

mod datapath;

use std::net::Ipv4Addr;

use balancer_common::{
    flow::{InboundKey, PROTOCOL_TCP, PROTOCOL_UDP},
    maps::{PROGRAM_LAN_INGRESS as LAN, PROGRAM_UPLINK_INGRESS as INGRESS},
    policy::steered_mark,
    stats::{
        DROP_NO_UPLINK, DROP_OTHER_PROTOCOL, DROP_TCP_WITHOUT_FLOW, DROP_UNROUTABLE_SOURCE,
        DROP_UNTRANSLATED, PASS_FRAGMENT, PASS_ICMP_OTHER, PASS_INBOUND_REPLY,
        PASS_LOCAL_DESTINATION, PASS_MALFORMED, PASS_NON_UNICAST, PASS_NOT_TRANSLATED,
        PASS_OTHER_PROTOCOL, PASS_TCP_WITHOUT_FLOW, PASS_UNROUTABLE_SOURCE,
    },
    uplink::{DESTINATION_PASS, Settings},
};
use datapath::{
    check::FOREIGN_MARK,
    harness::{DROP, Datapath, PASS, be, uplink_addr},
    packet::{Packet, TCP_ACK, TCP_SYN},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// A host behind another interface of the gateway (a branch office): a pass destination.
const OFFICE: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 7);

fn later_fragment(dst: Ipv4Addr) -> Packet {
    let mut fragment = Packet::udp((CLIENT, 40_000), (dst, 53));
    fragment.frag_off = 0x2000 | 185; // MF, offset 1480
    fragment
}

/// LAN frames that cannot be translated, toward `dst`, with the reason each is passed with
/// when passing is safe and the drop that replaces it otherwise.
fn untranslatable(dst: Ipv4Addr) -> Vec<(&'static str, Vec<u8>, u32, u32)> {
    let mut malformed = Packet::tcp((CLIENT, 40_000), (dst, 443), TCP_SYN).bytes();
    malformed[14 + 20 + 12] = 0x40; // TCP data offset 4: shorter than a TCP header
    vec![
        (
            "gre",
            Packet::other(CLIENT, dst, 47).bytes(),
            PASS_OTHER_PROTOCOL,
            DROP_OTHER_PROTOCOL,
        ),
        (
            "esp",
            Packet::other(CLIENT, dst, 50).bytes(),
            PASS_OTHER_PROTOCOL,
            DROP_OTHER_PROTOCOL,
        ),
        (
            "tcp without flow",
            Packet::tcp((CLIENT, 40_000), (dst, 443), TCP_ACK).bytes(),
            PASS_TCP_WITHOUT_FLOW,
            DROP_TCP_WITHOUT_FLOW,
        ),
        (
            "later fragment of no flow",
            later_fragment(dst).bytes(),
            PASS_FRAGMENT,
            DROP_UNTRANSLATED,
        ),
        (
            "icmp timestamp",
            Packet::icmp_echo(CLIENT, dst, 13, 1).bytes(),
            PASS_ICMP_OTHER,
            DROP_UNTRANSLATED,
        ),
        (
            "malformed tcp header",
            malformed,
            PASS_MALFORMED,
            DROP_UNTRANSLATED,
        ),
        (
            "from 0.0.0.0",
            Packet::udp((Ipv4Addr::UNSPECIFIED, 68), (dst, 67)).bytes(),
            PASS_UNROUTABLE_SOURCE,
            DROP_UNROUTABLE_SOURCE,
        ),
        (
            "from link-local",
            Packet::tcp((Ipv4Addr::new(169, 254, 3, 4), 40_000), (dst, 443), TCP_SYN).bytes(),
            PASS_UNROUTABLE_SOURCE,
            DROP_UNROUTABLE_SOURCE,
        ),
    ]
}

#[test]
fn untranslatable_lan_traffic_to_the_internet_is_dropped_by_reason() -> anyhow::Result<()> {
    let dp = Datapath::load()?;
    for (name, frame, _, drop) in untranslatable(SERVER) {
        let before = dp.reason(drop)?;
        let run = dp.run(LAN, &frame, FOREIGN_MARK)?;
        assert_eq!(
            run.action, DROP,
            "{name}: must not leave with its private source"
        );
        assert_eq!(
            dp.reason(drop)? - before,
            1,
            "{name}: drop {drop} not counted"
        );
    }
    assert!(dp.flows()?.is_empty(), "a drop created a flow");
    assert!(dp.reverse()?.is_empty());
    Ok(())
}

#[test]
fn untranslatable_lan_traffic_to_the_office_passes_untouched() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    dp.add_destination(Ipv4Addr::new(10, 20, 0, 0), 16, DESTINATION_PASS)?;
    for (name, frame, pass, _) in untranslatable(OFFICE) {
        let before = dp.reason(pass)? + dp.reason(PASS_LOCAL_DESTINATION)?;
        let run = dp.run(LAN, &frame, FOREIGN_MARK)?;
        assert_eq!(run.action, PASS, "{name}");
        assert_eq!(run.data, frame, "{name}: bytes changed");
        assert_eq!(run.mark, FOREIGN_MARK, "{name}: mark changed");
        // TCP and UDP meet the destination check first, which then names why they pass.
        let after = dp.reason(pass)? + dp.reason(PASS_LOCAL_DESTINATION)?;
        assert_eq!(after - before, 1, "{name}: not counted");
    }
    assert_eq!(dp.reason(PASS_OTHER_PROTOCOL)?, 2);
    assert_eq!(dp.reason(PASS_UNROUTABLE_SOURCE)?, 2);
    // New flows to the office are not balanced either.
    let syn = Packet::tcp((CLIENT, 40_001), (OFFICE, 22), TCP_SYN).bytes();
    let run = dp.run(LAN, &syn, 0)?;
    assert_eq!((run.action, run.mark, run.data == syn), (PASS, 0, true));
    assert!(dp.reason(PASS_LOCAL_DESTINATION)? >= 1);
    assert!(dp.flows()?.is_empty(), "an office destination got a flow");
    for drop in [
        DROP_OTHER_PROTOCOL,
        DROP_TCP_WITHOUT_FLOW,
        DROP_UNTRANSLATED,
        DROP_UNROUTABLE_SOURCE,
    ] {
        assert_eq!(dp.reason(drop)?, 0, "drop {drop} at an office destination");
    }
    Ok(())
}

#[test]
fn pass_untranslated_lets_a_public_lan_through() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    dp.set_settings(Settings {
        drop_untranslated: 0,
        ..Settings::default()
    })?;
    for (name, frame, pass, _) in untranslatable(SERVER) {
        let before = dp.reason(pass)?;
        let run = dp.run(LAN, &frame, FOREIGN_MARK)?;
        assert_eq!(run.action, PASS, "{name}");
        assert_eq!(run.data, frame, "{name}: bytes changed");
        assert_eq!(dp.reason(pass)? - before, 1, "{name}: {pass} not counted");
    }
    Ok(())
}

#[test]
fn no_usable_uplink_drops_new_flows_to_the_internet() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    dp.set_weights(&[])?;
    let syn = Packet::tcp((CLIENT, 40_000), (SERVER, 443), TCP_SYN).bytes();
    assert_eq!(dp.run(LAN, &syn, 0)?.action, DROP);
    assert_eq!(dp.reason(DROP_NO_UPLINK)?, 1);
    assert!(dp.flows()?.is_empty());
    Ok(())
}

#[test]
fn non_unicast_gets_no_flow_and_passes_untouched() -> anyhow::Result<()> {
    let dp = Datapath::load()?;
    let cases = [
        (
            "dhcp discover",
            Packet::udp((Ipv4Addr::UNSPECIFIED, 68), (Ipv4Addr::BROADCAST, 67)),
        ),
        (
            "mdns",
            Packet::udp((CLIENT, 5353), (Ipv4Addr::new(224, 0, 0, 251), 5353)),
        ),
        (
            "ssdp",
            Packet::udp((CLIENT, 40_000), (Ipv4Addr::new(239, 255, 255, 250), 1900)),
        ),
        (
            "igmp",
            Packet::other(CLIENT, Ipv4Addr::new(224, 0, 0, 22), 2),
        ),
        (
            "to link-local",
            Packet::tcp(
                (CLIENT, 40_000),
                (Ipv4Addr::new(169, 254, 169, 254), 80),
                TCP_SYN,
            ),
        ),
        (
            "limited broadcast",
            Packet::udp((CLIENT, 40_000), (Ipv4Addr::BROADCAST, 9)),
        ),
    ];
    for (name, packet) in &cases {
        let frame = packet.bytes();
        let run = dp.run(LAN, &frame, FOREIGN_MARK)?;
        assert_eq!(run.action, PASS, "{name}");
        assert_eq!(run.data, frame, "{name}: bytes changed");
        assert_eq!(run.mark, FOREIGN_MARK, "{name}: mark changed");
    }
    assert_eq!(dp.reason(PASS_NON_UNICAST)?, cases.len() as u64);
    assert!(dp.flows()?.is_empty(), "non-unicast got a flow");
    assert!(dp.reverse()?.is_empty(), "non-unicast got a NAT port");
    Ok(())
}

/// A port forward through uplink 2: the internet host's SYN and datagram are recorded at
/// uplink ingress, and the LAN server's answers are marked for uplink 2, untranslated, with no
/// flow or NAT port; the LAN host's own new connection to the same address stays balanced.
#[test]
fn inbound_connections_answer_by_the_uplink_they_came_in_on() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    dp.act_for_uplink(2)?;
    dp.set_settings(Settings {
        local_port_min: 32_768,
        local_port_max: 60_999,
        drop_untranslated: 1,
        ..Settings::default()
    })?;
    let remote = (SERVER, 50_123);
    let uplink_mark = 2 << 24;

    // TCP: the SYN to uplink 2's address is marked there and recorded.
    let syn = Packet::tcp(remote, (uplink_addr(2), 8080), TCP_SYN).bytes();
    let run = dp.run(INGRESS, &syn, FOREIGN_MARK)?;
    assert_eq!((run.action, run.data == syn), (PASS, true));
    assert_eq!(run.mark, steered_mark(FOREIGN_MARK, uplink_mark));
    assert_eq!(dp.reason(PASS_NOT_TRANSLATED)?, 1);
    // The LAN server's SYN-ACK after conntrack's DNAT (its own address and port 80).
    let syn_ack = Packet::tcp((CLIENT, 80), remote, TCP_SYN | TCP_ACK).bytes();
    let run = dp.run(LAN, &syn_ack, FOREIGN_MARK)?;
    assert_eq!(run.action, PASS);
    assert_eq!(
        run.data, syn_ack,
        "conntrack translates it, not the data plane"
    );
    assert_eq!(run.mark, steered_mark(FOREIGN_MARK, uplink_mark));
    let ack = Packet::tcp((CLIENT, 80), remote, TCP_ACK).bytes();
    assert_eq!(dp.run(LAN, &ack, 0)?.mark, uplink_mark);
    assert_eq!(dp.reason(PASS_INBOUND_REPLY)?, 2);

    // UDP to a port the host forwards is recorded too; the reply goes back the same way.
    dp.forward_udp_port(5060)?;
    let datagram = Packet::udp((SERVER, 5060), (uplink_addr(2), 5060)).bytes();
    dp.run(INGRESS, &datagram, 0)?;
    let reply = Packet::udp((CLIENT, 5060), (SERVER, 5060)).bytes();
    let run = dp.run(LAN, &reply, 0)?;
    assert_eq!(
        (run.action, run.mark, run.data == reply),
        (PASS, uplink_mark, true)
    );

    // Neither got a flow or a port: their room is not the outbound flows'.
    assert!(dp.flows()?.is_empty(), "{:?}", dp.flows()?);
    assert!(dp.reverse()?.is_empty());
    let mut recorded: Vec<(u8, u16, u8)> = dp
        .inbound()?
        .iter()
        .map(|(key, entry)| (key.protocol, u16::from_be(key.remote_port), entry.uplink_id))
        .collect();
    recorded.sort();
    assert_eq!(
        recorded,
        [(PROTOCOL_TCP, 50_123, 2), (PROTOCOL_UDP, 5060, 2)]
    );

    // Not recorded: a SYN-ACK (an answer to the gateway's own connect), UDP to an ephemeral
    // port (a reply to the gateway's own socket), to a port not forwarded (unsolicited, maybe
    // spoofed) or to another address.
    let inbound_before = dp.inbound()?.len();
    for (name, packet) in [
        (
            "syn-ack",
            Packet::tcp((SERVER, 443), (uplink_addr(2), 40_000), TCP_SYN | TCP_ACK),
        ),
        (
            "udp to an ephemeral port",
            Packet::udp((SERVER, 53), (uplink_addr(2), 40_000)),
        ),
        (
            "udp to a port not forwarded",
            Packet::udp((SERVER, 53), (uplink_addr(2), 5061)),
        ),
        (
            "udp to another address",
            Packet::udp((SERVER, 53), (Ipv4Addr::new(198, 18, 2, 99), 53)),
        ),
    ] {
        let run = dp.run(INGRESS, &packet.bytes(), 0)?;
        assert_eq!(run.action, PASS, "{name}");
        assert_eq!(dp.inbound()?.len(), inbound_before, "{name} was recorded");
    }
    // The gateway's resolver got an answer from SERVER:53: a LAN client's own query to
    // SERVER:53 is still an ordinary balanced flow.
    let query = Packet::udp((CLIENT, 40_000), (SERVER, 53)).bytes();
    let run = dp.run(LAN, &query, 0)?;
    assert_ne!(run.mark, 0);
    assert_eq!(dp.flows()?.len(), 1);

    // A LAN host's own SYN to the inbound remote end is a new connection, not an answer.
    let own = Packet::tcp((CLIENT, 40_001), remote, TCP_SYN).bytes();
    dp.run(LAN, &own, 0)?;
    assert_eq!(dp.flows()?.len(), 2, "the LAN host's own SYN got a flow");
    let key = InboundKey {
        remote_addr: be(SERVER),
        remote_port: 50_123u16.to_be(),
        protocol: PROTOCOL_TCP,
        _pad: 0,
    };
    assert!(dp.inbound()?.iter().any(|(k, _)| *k == key));
    Ok(())
}

/// An inbound entry older than its timeout no longer steers replies: they are TCP without a
/// flow, dropped.
#[test]
fn an_expired_inbound_connection_steers_nothing() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    dp.act_for_uplink(2)?;
    dp.set_settings(Settings {
        tcp_established_timeout_ns: 1,
        drop_untranslated: 1,
        ..Settings::default()
    })?;
    let remote = (SERVER, 50_123);
    dp.run(
        INGRESS,
        &Packet::tcp(remote, (uplink_addr(2), 8080), TCP_SYN).bytes(),
        0,
    )?;
    // The programs read the coarse clock: let it tick past the entry.
    std::thread::sleep(std::time::Duration::from_millis(25));
    let ack = Packet::tcp((CLIENT, 80), remote, TCP_ACK).bytes();
    let run = dp.run(LAN, &ack, 0)?;
    assert_eq!((run.action, run.mark), (DROP, 0));
    assert_eq!(dp.reason(DROP_TCP_WITHOUT_FLOW)?, 1);
    Ok(())
}
