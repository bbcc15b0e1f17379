//! The three classifiers run through BPF_PROG_TEST_RUN on crafted packets: verdicts, every
//! rewritten field, checksums recomputed from scratch, untouched bytes, marks, map state and
//! counters. Root only (loading programs); nothing is attached and no interface is created.
//!
//! `cargo test -p balancer-tests --test datapath_programs -- --nocapture` also prints the
//! per-packet costs of the four hot paths.

mod datapath;

use std::net::Ipv4Addr;

use anyhow::ensure;
use balancer_common::{
    flow::{
        FLOW_FLAG_CLIENT_FIN, FLOW_FLAG_FORCED, FLOW_STATE_CLOSING, FLOW_STATE_NEW, FlowEntry,
        FlowKey, REVERSE_FLAG_ANSWERED, ReverseEntry, ReverseKey,
    },
    maps::{
        PROGRAM_LAN_INGRESS as LAN, PROGRAM_UPLINK_EGRESS as EGRESS,
        PROGRAM_UPLINK_INGRESS as INGRESS,
    },
    policy::steered_mark,
    stats::{
        PASS_FRAGMENT, PASS_ICMP_ERROR_MALFORMED, PASS_ICMP_OTHER, PASS_LOCAL_DESTINATION,
        PASS_MALFORMED, PASS_NOT_IPV4, PASS_NOT_TRANSLATED, PASS_OTHER_PROTOCOL, PASS_WRONG_UPLINK,
        REASONS_LEN, UPLINK_NEW_FLOWS, UPLINK_RX_PACKETS, UPLINK_TX_PACKETS,
    },
    uplink::{DESTINATION_PASS, Settings},
};
use datapath::{
    check::{FOREIGN_MARK, flow_key, reply_to, round_trip},
    harness::{Datapath, PASS, PROGRAMS, be, uplink_addr},
    packet::{L4, Packet, TCP_ACK, TCP_FIN, TCP_SYN, icmp_error, verify_checksums, view},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// A host behind another interface of the gateway (a branch office).
const OFFICE: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 7);
/// An IPv4 option (NOP, NOP, NOP, EOL) so the L4 header is not at the usual offset.
const OPTIONS: [u8; 4] = [1, 1, 1, 0];

#[test]
fn flows_round_trip_with_correct_checksums() -> anyhow::Result<()> {
    let mut zero_udp = Packet::udp((CLIENT, 40_001), (SERVER, 53));
    zero_udp.l4 = L4::Udp {
        src_port: 40_001,
        dst_port: 53,
        zero_checksum: true,
    };
    let cases = [
        (
            "tcp syn",
            Packet::tcp((CLIENT, 40_000), (SERVER, 443), TCP_SYN),
        ),
        (
            "tcp syn, ip options",
            Packet::tcp((CLIENT, 40_002), (SERVER, 443), TCP_SYN).with_options(&OPTIONS),
        ),
        ("udp", Packet::udp((CLIENT, 40_000), (SERVER, 53))),
        (
            "udp, ip options",
            Packet::udp((CLIENT, 40_003), (SERVER, 53)).with_options(&OPTIONS),
        ),
        ("udp without checksum", zero_udp),
        ("icmp echo", Packet::icmp_echo(CLIENT, SERVER, 8, 0x4242)),
    ];
    let mut dp = Datapath::load()?;
    let mut used = Vec::new();
    for (name, packet) in cases {
        let (id, _) = round_trip(&mut dp, &packet).map_err(|error| error.context(name))?;
        used.push(id);
    }
    // Six new flows walk the 2:2:1 schedule [1, 2, 3, 1, 2] and start over.
    assert_eq!(used, [1, 2, 3, 1, 2, 1]);
    Ok(())
}

/// What the programs leave alone. LAN packets here go to an office destination (a pass entry
/// of `DESTINATIONS`); the same packets headed for the internet are dropped
/// (`datapath_office`).
#[test]
fn untranslated_traffic_passes_untouched_and_is_counted() -> anyhow::Result<()> {
    let mut ipv6 = Packet::tcp((CLIENT, 40_000), (SERVER, 443), TCP_SYN);
    ipv6.ether_type = 0x86dd;
    let mut fragment = Packet::udp((CLIENT, 40_000), (OFFICE, 53));
    fragment.frag_off = 0x2000 | 185; // MF, offset 1480
    let mut fragment_at_egress = Packet::udp((CLIENT, 40_000), (SERVER, 53));
    fragment_at_egress.frag_off = fragment.frag_off;
    let cases = [
        (
            "tcp without flow to the office",
            LAN,
            Packet::tcp((CLIENT, 40_000), (OFFICE, 443), TCP_ACK),
            PASS_LOCAL_DESTINATION,
        ),
        (
            "lan destination",
            LAN,
            Packet::tcp(
                (CLIENT, 40_000),
                (Ipv4Addr::new(198, 18, 0, 9), 22),
                TCP_SYN,
            ),
            PASS_LOCAL_DESTINATION,
        ),
        ("ipv6 at lan", LAN, ipv6.clone(), PASS_NOT_IPV4),
        ("ipv6 at egress", EGRESS, ipv6.clone(), PASS_NOT_IPV4),
        ("ipv6 at ingress", INGRESS, ipv6, PASS_NOT_IPV4),
        (
            "gre",
            LAN,
            Packet::other(CLIENT, OFFICE, 47),
            PASS_OTHER_PROTOCOL,
        ),
        ("later fragment", LAN, fragment.clone(), PASS_FRAGMENT),
        (
            "later fragment at egress",
            EGRESS,
            fragment_at_egress,
            PASS_FRAGMENT,
        ),
        (
            "icmp unreachable quoting no packet",
            LAN,
            Packet::icmp_echo(CLIENT, OFFICE, 3, 1),
            PASS_ICMP_ERROR_MALFORMED,
        ),
        (
            "icmp redirect",
            LAN,
            Packet::icmp_echo(CLIENT, OFFICE, 5, 1),
            PASS_ICMP_OTHER,
        ),
        (
            "gateway's own at egress",
            EGRESS,
            Packet::udp((uplink_addr(1), 40_000), (SERVER, 53)),
            PASS_NOT_TRANSLATED,
        ),
        (
            "reply to the gateway",
            INGRESS,
            Packet::udp((SERVER, 53), (uplink_addr(1), 40_000)),
            PASS_NOT_TRANSLATED,
        ),
        (
            "echo request to the gateway",
            INGRESS,
            Packet::icmp_echo(SERVER, uplink_addr(1), 8, 9),
            PASS_ICMP_OTHER,
        ),
    ];
    let mut dp = Datapath::load()?;
    dp.add_destination(OFFICE, 16, DESTINATION_PASS)?;
    for (name, program, packet, reason) in cases {
        let frame = packet.bytes();
        let before = dp.reason(reason)?;
        let run = dp.run(program, &frame, FOREIGN_MARK)?;
        assert_eq!(run.action, PASS, "{name}");
        assert_eq!(run.data, frame, "{name}: bytes changed");
        // What arrives on an uplink untranslated is marked for that uplink (`inbound`), so
        // rp_filter and the rules agree with the way it came; the other mark bits stay.
        let mark = if program == INGRESS && reason == PASS_NOT_TRANSLATED {
            steered_mark(FOREIGN_MARK, 1 << 24)
        } else {
            FOREIGN_MARK
        };
        assert_eq!(run.mark, mark, "{name}: mark");
        assert_eq!(
            dp.reason(reason)? - before,
            1,
            "{name}: reason {reason} not counted"
        );
    }
    assert!(dp.flows()?.is_empty(), "a pass created a flow");
    assert!(dp.reverse()?.is_empty());
    // The uplink programs count every packet of their uplink, translated or not.
    assert_eq!(dp.uplink_counter(1, UPLINK_TX_PACKETS)?, 3);
    assert_eq!(dp.uplink_counter(1, UPLINK_RX_PACKETS)?, 3);
    Ok(())
}

#[test]
fn a_flow_of_another_uplink_is_not_translated() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    let syn = Packet::tcp((CLIENT, 40_000), (SERVER, 443), TCP_SYN).bytes();
    assert_eq!(dp.run(LAN, &syn, 0)?.mark, 1 << 24);
    dp.act_for_uplink(2)?;
    let run = dp.run(EGRESS, &syn, 0)?;
    assert_eq!((run.action, run.data == syn), (PASS, true));
    assert_eq!(dp.reason(PASS_WRONG_UPLINK)?, 1);
    Ok(())
}

#[test]
fn forced_destinations_use_their_uplink_even_when_disabled() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    dp.set_weights(&[(3, 1)])?;
    let mut uplink = dp.uplink(1)?;
    uplink.enabled = 0;
    dp.set_uplink(1, uplink)?;
    let modem = Packet::tcp(
        (CLIENT, 40_000),
        (Ipv4Addr::new(198, 18, 1, 1), 80),
        TCP_SYN,
    );
    let run = dp.run(LAN, &modem.bytes(), 0)?;
    assert_eq!(run.mark, 1 << 24);
    let entry = dp
        .flow(&flow_key(&modem))?
        .ok_or_else(|| anyhow::anyhow!("no flow"))?;
    assert_ne!(entry.flags & FLOW_FLAG_FORCED, 0);
    // Still live on the next packet although uplink 1 takes no balanced flows.
    let ack = Packet::tcp(
        (CLIENT, 40_000),
        (Ipv4Addr::new(198, 18, 1, 1), 80),
        TCP_ACK,
    );
    assert_eq!(dp.run(LAN, &ack.bytes(), 0)?.mark, 1 << 24);
    // Balanced traffic goes to uplink 3 meanwhile.
    let other = Packet::tcp((CLIENT, 40_001), (SERVER, 443), TCP_SYN);
    assert_eq!(dp.run(LAN, &other.bytes(), 0)?.mark, 3 << 24);
    Ok(())
}

#[test]
fn tcp_state_and_stale_flows() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    let syn = Packet::tcp((CLIENT, 40_000), (SERVER, 443), TCP_SYN);
    let key = flow_key(&syn);
    let (id, port) = round_trip(&mut dp, &syn)?;
    assert_eq!(id, 1);
    let entry = dp.flow(&key)?.ok_or_else(|| anyhow::anyhow!("no flow"))?;
    // What the client expects next from the server (for a reset on its behalf) is what it
    // acknowledges: nothing yet, then its ACK's acknowledgment number (0x2000_0000 in every
    // test packet); the server's packets do not move it.
    assert_eq!(entry.remote_seq_next, 0);
    let ack = Packet::tcp((CLIENT, 40_000), (SERVER, 443), TCP_ACK);
    assert_eq!(dp.run(LAN, &ack.bytes(), 0)?.mark, 1 << 24);
    let translated = Ipv4Addr::from(entry.uplink_addr.to_ne_bytes());
    let data = Packet::tcp(
        (SERVER, 443),
        (translated, u16::from_be(entry.nat_port)),
        TCP_ACK,
    );
    assert_eq!(dp.run(INGRESS, &data.bytes(), 0)?.mark, 1 << 24);
    let entry = dp.flow(&key)?.ok_or_else(|| anyhow::anyhow!("no flow"))?;
    assert_eq!(entry.remote_seq_next, 0x2000_0000);
    let mut fin = Packet::tcp((CLIENT, 40_000), (SERVER, 443), TCP_FIN | TCP_ACK);
    fin.payload = vec![7; 10];
    let run = dp.run(LAN, &fin.bytes(), 0)?;
    assert_eq!(run.mark, 1 << 24);
    let entry = dp.flow(&key)?.ok_or_else(|| anyhow::anyhow!("no flow"))?;
    assert_eq!(entry.state, FLOW_STATE_CLOSING);
    assert_ne!(entry.flags & FLOW_FLAG_CLIENT_FIN, 0);
    assert_eq!(entry.client_seq_next, 0x1000_0000 + 10 + 1);

    // Uplink 1 was disabled and re-enabled (generation bumped): the flow is stale. Mid-stream
    // packets pass unmarked; a new SYN replaces it, and the old reverse entry goes with it.
    let mut uplink = dp.uplink(1)?;
    uplink.generation += 1;
    dp.set_uplink(1, uplink)?;
    let ack = Packet::tcp((CLIENT, 40_000), (SERVER, 443), TCP_ACK);
    assert_eq!(dp.run(LAN, &ack.bytes(), 0)?.mark, 0);
    let run = dp.run(LAN, &syn.bytes(), 0)?;
    let entry = dp.flow(&key)?.ok_or_else(|| anyhow::anyhow!("no flow"))?;
    assert_eq!(run.mark, u32::from(entry.uplink_id) << 24);
    assert_eq!(entry.uplink_id, 2, "the schedule moved on to uplink 2");
    assert_eq!(entry.state, FLOW_STATE_NEW);
    let reverse = dp.reverse()?;
    assert_eq!(reverse.len(), 1, "{reverse:?}");
    assert!(
        reverse[0].0.nat_port != port.to_be() || reverse[0].0.uplink_addr == be(uplink_addr(2))
    );

    // An expired flow is replaced the same way: TCP SYN timeout of 1 ns. Its endpoint keeps
    // its mapping (endpoint-independent mapping): uplink 2 again, not the schedule's next.
    dp.set_settings(Settings {
        tcp_syn_timeout_ns: 1,
        ..Settings::default()
    })?;
    // The programs read the coarse clock: let it tick past the flow's last packet.
    std::thread::sleep(std::time::Duration::from_millis(25));
    let run = dp.run(LAN, &syn.bytes(), 0)?;
    assert_eq!(run.mark, 2 << 24);
    assert_eq!(dp.reverse()?.len(), 1);
    assert_eq!(dp.flows()?.len(), 1);
    Ok(())
}

/// Every truncation of a TCP packet, bad IHLs, lying lengths: passed byte-identical by all
/// three programs and counted as malformed. Addressed to the LAN: toward the internet, a
/// malformed L4 header behind a valid IPv4 header is dropped at LAN ingress instead
/// (`datapath_office`).
#[test]
fn malformed_packets_pass_byte_identical() -> anyhow::Result<()> {
    let good = Packet::tcp(
        (CLIENT, 40_000),
        (Ipv4Addr::new(198, 18, 0, 9), 443),
        TCP_SYN,
    )
    .with_options(&OPTIONS)
    .bytes();
    let mut cases: Vec<(String, Vec<u8>)> = (14..good.len())
        .map(|len| (format!("truncated to {len}"), good[..len].to_vec()))
        .collect();
    let patched = |name: &str, at: usize, bytes: &[u8]| {
        let mut frame = good.clone();
        frame[at..at + bytes.len()].copy_from_slice(bytes);
        (name.to_owned(), frame)
    };
    for ihl in 0..5u8 {
        cases.push(patched(&format!("ihl {ihl}"), 14, &[0x40 | ihl]));
    }
    let tot_len = good.len() - 14;
    cases.extend([
        patched("ihl 15 beyond tot_len", 14, &[0x4f]),
        patched("version 6 in an IPv4 frame", 14, &[0x66]),
        patched(
            "tot_len beyond the frame",
            16,
            &((tot_len + 1) as u16).to_be_bytes(),
        ),
        patched("tot_len shorter than the header", 16, &19u16.to_be_bytes()),
        patched("tot_len cuts the tcp header", 16, &30u16.to_be_bytes()),
        patched("tcp data offset 4", 14 + 24 + 12, &[0x40]),
        patched("tcp data offset beyond tot_len", 14 + 24 + 12, &[0xf0]),
    ]);
    let dp = Datapath::load()?;
    let mut expected = 0;
    let mut refused = 0;
    for program in PROGRAMS {
        for (name, frame) in &cases {
            let run = match dp.run(program, frame, FOREIGN_MARK) {
                Ok(run) => run,
                // Kernel 6.18's BPF_PROG_TEST_RUN itself refuses (EINVAL) an IPv4 frame shorter
                // than Ethernet + 20 bytes, so those lengths never reach the program here.
                Err(error)
                    if frame.len() < 34 && format!("{error:#}").contains("Invalid argument") =>
                {
                    refused += 1;
                    continue;
                }
                Err(error) => return Err(error.context(format!("{program}: {name}"))),
            };
            assert_eq!(run.action, PASS, "{program}: {name}");
            assert_eq!(&run.data, frame, "{program}: {name}: bytes changed");
            assert_eq!(run.mark, FOREIGN_MARK, "{program}: {name}: mark changed");
            expected += 1;
            assert_eq!(
                dp.reason(PASS_MALFORMED)?,
                expected,
                "{program}: {name}: not counted as malformed"
            );
        }
    }
    assert!(dp.flows()?.is_empty());
    println!("malformed: {expected} runs passed untouched, {refused} refused by test_run");
    Ok(())
}

#[test]
fn ten_thousand_flows_split_two_two_one() -> anyhow::Result<()> {
    const FLOWS: u16 = 10_000;
    let mut dp = Datapath::load()?;
    dp.set_settings(Settings {
        nat_port_min: 1024,
        nat_port_max: 65_535,
        ..Settings::default()
    })?;
    let mut total = std::time::Duration::ZERO;
    for port in 0..FLOWS {
        let syn = Packet::tcp((CLIENT, 20_000 + port), (SERVER, 443), TCP_SYN).bytes();
        let run = dp.run(LAN, &syn, 0)?;
        assert_ne!(run.mark, 0, "flow {port} not steered");
        total += run.duration;
    }
    let counts: Vec<u64> = (1..=3)
        .map(|id| dp.uplink_counter(id, UPLINK_NEW_FLOWS))
        .collect::<Result<_, _>>()?;
    println!("new flows per uplink: {counts:?}");
    for (count, share) in counts.iter().zip([0.4, 0.4, 0.2]) {
        let got = *count as f64 / f64::from(FLOWS);
        assert!(
            (got - share).abs() <= 0.01,
            "share {got} instead of {share}: {counts:?}"
        );
    }
    println!(
        "cost lan_ingress new flow (mean of {FLOWS} single runs, each a distinct flow): {} ns",
        total.as_nanos() / u128::from(FLOWS)
    );
    Ok(())
}

/// Per-packet costs with `repeat`; printed, not asserted. Each repeated pass must take the
/// path it claims to measure, which the REASONS counters and the output parity confirm.
#[test]
fn per_packet_costs() -> anyhow::Result<()> {
    const REPEAT: u32 = 1_000_001;
    let mut dp = Datapath::load()?;
    dp.set_weights(&[(1, 1)])?;
    let no_passes = |dp: &Datapath| -> anyhow::Result<u64> {
        (0..REASONS_LEN)
            .map(|reason| dp.reason(reason))
            .sum::<anyhow::Result<u64>>()
    };

    // New flow: the programs read the coarse clock, which stands still across the passes of
    // one `repeat` run, so each new flow is a single pass (a new destination port each); the
    // time includes the kernel's timer reads.
    let mut samples = Vec::new();
    for port in 1..=10_000u16 {
        let udp = Packet::udp((CLIENT, 62_000), (SERVER, port)).bytes();
        samples.push(dp.run_repeat(LAN, &udp, 0, 1)?.duration.as_nanos());
    }
    assert_eq!(dp.uplink_counter(1, UPLINK_NEW_FLOWS)?, 10_000);
    samples.sort_unstable();
    println!(
        "cost lan_ingress new flow (single passes, timer included): {} ns",
        samples[samples.len() / 2]
    );

    // Established: a TCP ACK of a live flow.
    let syn = Packet::tcp((CLIENT, 40_000), (SERVER, 443), TCP_SYN);
    round_trip(&mut dp, &syn)?;
    let ack = Packet::tcp((CLIENT, 40_000), (SERVER, 443), TCP_ACK).bytes();
    let before = no_passes(&dp)?;
    let run = dp.run_repeat(LAN, &ack, 0, REPEAT)?;
    ensure!(run.mark == 1 << 24 && no_passes(&dp)? == before);
    println!(
        "cost lan_ingress established: {} ns",
        run.duration.as_nanos()
    );

    // SNAT: `repeat` rewrites one buffer in place, so a mirror flow keyed by the translated
    // tuple translates it back on the next pass: every pass is a full SNAT.
    let key = flow_key(&syn);
    let entry = dp.flow(&key)?.ok_or_else(|| anyhow::anyhow!("no flow"))?;
    let mirror_key = FlowKey {
        client_addr: entry.uplink_addr,
        client_port: entry.nat_port,
        ..key
    };
    let mirror = FlowEntry {
        uplink_addr: key.client_addr,
        nat_port: key.client_port,
        ..entry
    };
    dp.insert_flow(mirror_key, mirror)?;
    let frame = Packet::tcp((CLIENT, 40_000), (SERVER, 443), TCP_ACK).bytes();
    let before = no_passes(&dp)?;
    let run = dp.run_repeat(EGRESS, &frame, 0, REPEAT)?;
    ensure!(no_passes(&dp)? == before, "a pass did not translate");
    ensure!(
        view(&run.data).src == uplink_addr(1),
        "odd number of passes ends translated"
    );
    verify_checksums(&run.data).map_err(|what| anyhow::anyhow!("bench egress: {what}"))?;
    println!("cost uplink_egress SNAT: {} ns", run.duration.as_nanos());

    // Reverse NAT: the same trick, a mirror reverse entry for the restored tuple.
    let reverse = ReverseKey {
        uplink_addr: key.client_addr,
        remote_addr: key.remote_addr,
        nat_port: key.client_port,
        remote_port: key.remote_port,
        protocol: key.protocol,
        _pad: [0; 3],
    };
    dp.insert_reverse(
        reverse,
        ReverseEntry {
            flow: mirror_key,
            mark: entry.mark,
            uplink_id: entry.uplink_id,
            flags: REVERSE_FLAG_ANSWERED,
            ..ReverseEntry::default()
        },
    )?;
    let reply = reply_to(
        &Packet::tcp((CLIENT, 40_000), (SERVER, 443), TCP_ACK),
        uplink_addr(1),
        u16::from_be(entry.nat_port),
    );
    let mut reply = reply;
    reply.l4 = match reply.l4 {
        L4::Tcp {
            src_port,
            dst_port,
            seq,
            ..
        } => L4::Tcp {
            src_port,
            dst_port,
            seq,
            flags: TCP_ACK,
        },
        other => other,
    };
    let before = no_passes(&dp)?;
    let run = dp.run_repeat(INGRESS, &reply.bytes(), 0, REPEAT)?;
    ensure!(no_passes(&dp)? == before, "a pass did not translate");
    ensure!(view(&run.data).dst == CLIENT && run.mark == 1 << 24);
    verify_checksums(&run.data).map_err(|what| anyhow::anyhow!("bench ingress: {what}"))?;
    println!(
        "cost uplink_ingress reverse NAT: {} ns",
        run.duration.as_nanos()
    );

    // ICMP error: a router's "fragmentation needed" quoting the flow's translated SYN. The
    // mirror entries above make each pass's output (outer destination and quoted source the
    // client's) an error about the mirror flow, so every pass translates.
    let sent = Packet::tcp(
        (uplink_addr(1), u16::from_be(entry.nat_port)),
        (SERVER, 443),
        TCP_SYN,
    )
    .bytes();
    let router = Ipv4Addr::new(192, 0, 2, 1);
    let error = icmp_error(router, uplink_addr(1), 3, 4, 1280, &sent[14..]);
    let before = no_passes(&dp)?;
    let run = dp.run_repeat(INGRESS, &error, 0, REPEAT)?;
    ensure!(no_passes(&dp)? == before, "a pass did not translate");
    ensure!(view(&run.data).dst == CLIENT && run.mark == 1 << 24);
    verify_checksums(&run.data).map_err(|what| anyhow::anyhow!("bench icmp error: {what}"))?;
    println!(
        "cost uplink_ingress ICMP error: {} ns",
        run.duration.as_nanos()
    );
    Ok(())
}
