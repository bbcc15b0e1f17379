//! ICMP errors, fragments and MSS clamping through BPF_PROG_TEST_RUN: each translation checked
//! field by field (every byte outside the allowed fields unchanged, the quoted packet restored
//! exactly, checksums recomputed from scratch), and every refusal passed untouched and counted.
//! Root only (loading programs); nothing is attached.

mod datapath;

use std::net::Ipv4Addr;

use anyhow::{Context, ensure};
use balancer_common::{
    maps::{
        PROGRAM_LAN_INGRESS as LAN, PROGRAM_UPLINK_EGRESS as EGRESS,
        PROGRAM_UPLINK_INGRESS as INGRESS,
    },
    stats::{
        DROP_UNTRANSLATED, PASS_FRAGMENT, PASS_ICMP_ERROR_MALFORMED, PASS_ICMP_ERROR_UNMATCHED,
        PASS_WRONG_UPLINK,
    },
};
use datapath::{
    check::{FOREIGN_MARK, only_changed, reply_to, round_trip, translated_ranges},
    harness::{DROP, Datapath, MSS_MAX, PASS, uplink_addr},
    packet::{ETH_LEN, L4, Packet, TCP_ACK, TCP_SYN, checksum, icmp_error, verify_checksums, view},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// A router on the path that reports errors about packets passing through it.
const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const OPTIONS: [u8; 4] = [1, 1, 1, 0];

/// The IPv4 packet in `frame` cut to its header and `l4` bytes of L4 (all of it if shorter).
fn quote(frame: &[u8], l4: usize) -> Vec<u8> {
    let ip = &frame[ETH_LEN..];
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    ip[..(header_len + l4).min(ip.len())].to_vec()
}

/// Checks a translated ICMP error field by field: Ethernet, the outer header but for its
/// checksum and the translated address, the ICMP type, code and second word unchanged; the
/// outer and ICMP checksums right; the quoted packet exactly `want_quoted`.
fn check_error(
    input: &[u8],
    out: &[u8],
    destination: bool,
    addr: Ipv4Addr,
    want_quoted: &[u8],
) -> anyhow::Result<()> {
    let addr_range = if destination { 30..34 } else { 26..30 };
    ensure!(out.len() == input.len(), "length changed");
    only_changed(&input[..34], &out[..34], &[24..26, addr_range.clone()])?;
    ensure!(
        out[addr_range] == addr.octets(),
        "outer address {:?}",
        view(out)
    );
    ensure!(checksum(&[&out[ETH_LEN..34]]) == 0, "outer IPv4 checksum");
    let icmp = &out[34..];
    ensure!(
        icmp[0..2] == input[34..36] && icmp[4..8] == input[38..42],
        "ICMP header"
    );
    ensure!(checksum(&[icmp]) == 0, "ICMP checksum");
    ensure!(
        &icmp[8..] == want_quoted,
        "quoted packet\n got  {:02x?}\n want {want_quoted:02x?}",
        &icmp[8..]
    );
    Ok(())
}

fn zero_checksum_udp(port: u16) -> Packet {
    let mut packet = Packet::udp((CLIENT, port), (SERVER, 53));
    packet.l4 = L4::Udp {
        src_port: port,
        dst_port: 53,
        zero_checksum: true,
    };
    packet
}

/// The flows whose errors are translated: TCP, UDP (with and without checksum), echo; IP
/// options in the quoted header for some.
fn requests() -> Vec<(&'static str, Packet)> {
    vec![
        (
            "tcp",
            Packet::tcp((CLIENT, 40_000), (SERVER, 443), TCP_SYN).with_options(&OPTIONS),
        ),
        ("udp", Packet::udp((CLIENT, 40_001), (SERVER, 53))),
        (
            "udp options",
            Packet::udp((CLIENT, 40_002), (SERVER, 53)).with_options(&OPTIONS),
        ),
        ("udp no checksum", zero_checksum_udp(40_003)),
        ("echo", Packet::icmp_echo(CLIENT, SERVER, 8, 0x4242)),
    ]
}

/// Errors from a router or the server about a flow's translated packets reach the client:
/// outer destination, quoted source and port (echo id) restored with every checksum, for
/// minimal (8 bytes of L4) and long quotes, marked like replies.
#[test]
fn errors_from_the_internet_reach_the_client() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    let errors = [(3, 4, 1280u32), (3, 3, 0), (11, 0, 0), (12, 0, 0x0800_0000)];
    for (name, request) in requests() {
        let (id, _) = round_trip(&mut dp, &request).context(name)?;
        dp.act_for_uplink(u32::from(id))?;
        let frame = request.bytes();
        let sent = dp.run(EGRESS, &frame, 0)?.data;
        for (n, (kind, code, rest)) in errors.into_iter().enumerate() {
            for carried in [8, 1000] {
                let case = format!("{name}, type {kind}/{code}, {carried} bytes quoted");
                let from = if n == 1 { SERVER } else { ROUTER };
                let error = icmp_error(
                    from,
                    uplink_addr(id),
                    kind,
                    code,
                    rest,
                    &quote(&sent, carried),
                );
                let run = dp.run(INGRESS, &error, 0)?;
                ensure!(run.action == PASS, "{case}: action {}", run.action);
                ensure!(
                    run.mark == u32::from(id) << 24,
                    "{case}: mark {:#x}",
                    run.mark
                );
                check_error(&error, &run.data, true, CLIENT, &quote(&frame, carried))
                    .context(case)?;
            }
        }
    }
    Ok(())
}

/// A client's error about a reply it got (port unreachable, say) is marked for the flow's
/// uplink at LAN ingress and leaves translated: outer source and quoted destination back to
/// the uplink address and NAT port, the quote restored to the reply as it arrived.
#[test]
fn errors_from_clients_reach_the_remote() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    for (name, request) in requests() {
        let (id, port) = round_trip(&mut dp, &request).context(name)?;
        dp.act_for_uplink(u32::from(id))?;
        let mut reply = reply_to(&request, uplink_addr(id), port);
        if let L4::Tcp {
            src_port,
            dst_port,
            seq,
            ..
        } = reply.l4
        {
            reply.l4 = L4::Tcp {
                src_port,
                dst_port,
                seq,
                flags: TCP_ACK,
            };
        }
        let arrived = reply.bytes();
        let delivered = dp.run(INGRESS, &arrived, 0)?.data;
        for carried in [8, 1000] {
            let case = format!("{name}, {carried} bytes quoted");
            let error = icmp_error(CLIENT, SERVER, 3, 3, 0, &quote(&delivered, carried));
            let lan = dp.run(LAN, &error, FOREIGN_MARK)?;
            ensure!(
                lan.action == PASS && lan.data == error,
                "{case}: lan_ingress changed it"
            );
            ensure!(
                lan.mark == u32::from(id) << 24 | FOREIGN_MARK,
                "{case}: mark {:#x}",
                lan.mark
            );
            let run = dp.run(EGRESS, &error, lan.mark)?;
            ensure!(run.action == PASS, "{case}: action {}", run.action);
            check_error(
                &error,
                &run.data,
                false,
                uplink_addr(id),
                &quote(&arrived, carried),
            )
            .context(case)?;
        }
        // Leaving by another uplink, it is not translated.
        let error = icmp_error(CLIENT, SERVER, 3, 3, 0, &quote(&delivered, 8));
        dp.act_for_uplink(u32::from(id % 3 + 1))?;
        let before = dp.reason(PASS_WRONG_UPLINK)?;
        let run = dp.run(EGRESS, &error, 0)?;
        ensure!(
            run.data == error && dp.reason(PASS_WRONG_UPLINK)? == before + 1,
            "{name}"
        );
    }
    Ok(())
}

/// Errors that name no flow, or whose quote cannot be real, pass byte-identical and counted.
#[test]
fn errors_that_name_no_flow_pass_untouched() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    let request = Packet::udp((CLIENT, 40_000), (SERVER, 53));
    let (id, _) = round_trip(&mut dp, &request)?;
    dp.act_for_uplink(u32::from(id))?;
    let sent = dp.run(EGRESS, &request.bytes(), 0)?.data;
    let good = quote(&sent, 8);
    let patched = |at: usize, bytes: &[u8]| {
        let mut quoted = good.clone();
        quoted[at..at + bytes.len()].copy_from_slice(bytes);
        quoted
    };
    // The gateway's own socket: a port of its (moved) ip_local_port_range, below the NAT range.
    let own = Packet::udp((uplink_addr(id), 20_000), (SERVER, 53)).bytes();
    let to = uplink_addr(id);
    let unmatched = [
        (
            "about the gateway's own traffic",
            icmp_error(ROUTER, to, 3, 3, 0, &quote(&own, 8)),
        ),
        (
            "to another address than the quoted source",
            icmp_error(ROUTER, CLIENT, 3, 3, 0, &good),
        ),
        (
            "quoting a later fragment",
            icmp_error(ROUTER, to, 3, 3, 0, &patched(6, &[0x00, 0x10])),
        ),
        (
            "quoting another protocol",
            icmp_error(ROUTER, to, 3, 3, 0, &patched(9, &[47])),
        ),
    ];
    let malformed = [
        (
            "quote cut to 27 bytes",
            icmp_error(ROUTER, to, 3, 3, 0, &good[..27]),
        ),
        (
            "quoted ihl 4",
            icmp_error(ROUTER, to, 3, 3, 0, &patched(0, &[0x44])),
        ),
        (
            "quoted ihl 15",
            icmp_error(ROUTER, to, 3, 3, 0, &patched(0, &[0x4f])),
        ),
        (
            "quoted version 6",
            icmp_error(ROUTER, to, 3, 3, 0, &patched(0, &[0x65])),
        ),
        (
            "quoted tot_len 27",
            icmp_error(ROUTER, to, 3, 3, 0, &patched(2, &[0, 27])),
        ),
        ("nothing quoted", icmp_error(ROUTER, to, 3, 3, 0, &[])),
    ];
    let cases = unmatched
        .into_iter()
        .map(|(name, frame)| (name, frame, PASS_ICMP_ERROR_UNMATCHED))
        .chain(
            malformed
                .into_iter()
                .map(|(n, f)| (n, f, PASS_ICMP_ERROR_MALFORMED)),
        );
    for (name, frame, reason) in cases {
        for program in [INGRESS, LAN, EGRESS] {
            // From the LAN toward the internet, an error that names no flow would leave with
            // its private source: dropped instead (`datapath_office`).
            let (action, reason) = if program == LAN {
                (DROP, DROP_UNTRANSLATED)
            } else {
                (PASS, reason)
            };
            let before = dp.reason(reason)?;
            let run = dp.run(program, &frame, FOREIGN_MARK)?;
            ensure!(run.action == action, "{program}: {name}: action");
            ensure!(run.data == frame, "{program}: {name}: bytes changed");
            ensure!(run.mark == FOREIGN_MARK, "{program}: {name}: mark changed");
            let counted = dp.reason(reason)? - before;
            ensure!(counted == 1, "{program}: {name}: counted {counted} times");
        }
    }
    Ok(())
}

/// Splits the IPv4 packet in `frame` after `at` bytes of L4 (a multiple of 8) into a first
/// fragment (MF set) and a last one, both with IP id `id` and correct header checksums.
fn fragment(frame: &[u8], at: usize, id: u16) -> (Vec<u8>, Vec<u8>) {
    let header_len = usize::from(frame[ETH_LEN] & 0x0f) * 4;
    let l4 = &frame[ETH_LEN + header_len..];
    let make = |data: &[u8], frag_off: u16| {
        let mut f = frame[..ETH_LEN + header_len].to_vec();
        f[16..18].copy_from_slice(&((header_len + data.len()) as u16).to_be_bytes());
        f[18..20].copy_from_slice(&id.to_be_bytes());
        f[20..22].copy_from_slice(&frag_off.to_be_bytes());
        f[24..26].fill(0);
        let sum = checksum(&[&f[ETH_LEN..]]);
        f[24..26].copy_from_slice(&sum.to_be_bytes());
        f.extend_from_slice(data);
        f
    };
    (make(&l4[..at], 0x2000), make(&l4[at..], (at / 8) as u16))
}

/// The datagram two fragments came from, for checking the L4 checksum over all of it.
fn reassemble(first: &[u8], last: &[u8]) -> Vec<u8> {
    let header_len = usize::from(first[ETH_LEN] & 0x0f) * 4;
    let mut frame = first.to_vec();
    frame.extend_from_slice(&last[ETH_LEN + header_len..]);
    let tot_len = (frame.len() - ETH_LEN) as u16;
    frame[16..18].copy_from_slice(&tot_len.to_be_bytes());
    frame[20..22].fill(0);
    frame[24..26].fill(0);
    let sum = checksum(&[&frame[ETH_LEN..ETH_LEN + header_len]]);
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
    frame
}

/// The gateway fragments a datagram itself (the uplink's MTU is below the LAN's, DF clear):
/// LAN ingress saw it whole, so only uplink egress sees fragments. Every one of them leaves
/// translated, and the reassembled datagram has a right UDP checksum.
#[test]
fn fragments_the_gateway_made_are_all_translated() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    let mut request = Packet::udp((CLIENT, 40_010), (SERVER, 53));
    request.payload = (0..64u8).collect();
    let whole = request.bytes();
    let lan = dp.run(LAN, &whole, 0)?;
    let id = (lan.mark >> 24) as u8;
    ensure!(lan.action == PASS && id != 0, "datagram not steered");
    let entry = dp
        .flow(&datapath::check::flow_key(&request))?
        .context("no flow")?;
    dp.act_for_uplink(u32::from(id))?;
    let (first, last) = fragment(&whole, 32, 0x5151);
    let out_first = dp.run(EGRESS, &first, 0)?.data;
    only_changed(&first, &out_first, &translated_ranges(&first, true))?;
    let out_last = dp.run(EGRESS, &last, 0)?.data;
    only_changed(&last, &out_last, &[24..26, 26..30])?;
    ensure!(
        view(&out_last).src == uplink_addr(id),
        "later fragment left untranslated: {}",
        view(&out_last).src
    );
    let reassembled = reassemble(&out_first, &out_last);
    verify_checksums(&reassembled).map_err(anyhow::Error::msg)?;
    ensure!(view(&reassembled).src_port == u16::from_be(entry.nat_port));
    Ok(())
}

/// A fragmented UDP datagram each way: the first fragment creates or finds the flow and is
/// translated like any packet, the later one gets the same address and mark by IP id; the
/// reassembled result has a right UDP checksum. Unknown later fragments pass untouched.
#[test]
fn fragments_follow_their_first_fragment() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    let mut request = Packet::udp((CLIENT, 40_000), (SERVER, 53));
    request.payload = (0..64u8).collect();
    let (first, last) = fragment(&request.bytes(), 32, 0x7777);
    let lan = dp.run(LAN, &first, 0)?;
    let id = (lan.mark >> 24) as u8;
    ensure!(
        lan.action == PASS && lan.data == first && id != 0,
        "first fragment not steered"
    );
    let entry = dp
        .flow(&datapath::check::flow_key(&request))?
        .context("no flow")?;
    let lan = dp.run(LAN, &last, FOREIGN_MARK)?;
    ensure!(
        lan.mark == u32::from(id) << 24 | FOREIGN_MARK && lan.data == last,
        "later fragment"
    );

    dp.act_for_uplink(u32::from(id))?;
    let out_first = dp.run(EGRESS, &first, 0)?.data;
    only_changed(&first, &out_first, &translated_ranges(&first, true))?;
    let out_last = dp.run(EGRESS, &last, 0)?.data;
    only_changed(&last, &out_last, &[24..26, 26..30])?;
    ensure!(
        view(&out_last).src == uplink_addr(id),
        "later fragment source"
    );
    let whole = reassemble(&out_first, &out_last);
    verify_checksums(&whole).map_err(anyhow::Error::msg)?;
    ensure!(view(&whole).src_port == u16::from_be(entry.nat_port));

    // The reply, fragmented too.
    let mut reply = reply_to(&request, uplink_addr(id), u16::from_be(entry.nat_port));
    reply.payload = (0..100u8).collect();
    let (first, last) = fragment(&reply.bytes(), 48, 0x8888);
    let in_first = dp.run(INGRESS, &first, 0)?;
    only_changed(&first, &in_first.data, &translated_ranges(&first, false))?;
    let in_last = dp.run(INGRESS, &last, 0)?;
    ensure!(
        in_last.mark == u32::from(id) << 24,
        "later reply fragment mark"
    );
    only_changed(&last, &in_last.data, &[24..26, 30..34])?;
    let whole = reassemble(&in_first.data, &in_last.data);
    verify_checksums(&whole).map_err(anyhow::Error::msg)?;
    let v = view(&whole);
    ensure!(v.dst == CLIENT && v.dst_port == 40_000, "{v:?}");

    // Later fragments of unknown datagrams, or leaving by another uplink: untouched, counted;
    // from the LAN toward the internet such a fragment is dropped instead.
    let (_, stranger) = fragment(&request.bytes(), 32, 0x1111);
    for (program, frame, reason, action) in [
        (LAN, &stranger, DROP_UNTRANSLATED, DROP),
        (EGRESS, &stranger, PASS_FRAGMENT, PASS),
        (INGRESS, &stranger, PASS_FRAGMENT, PASS),
    ] {
        let before = dp.reason(reason)?;
        let run = dp.run(program, frame, FOREIGN_MARK)?;
        ensure!(run.action == action, "{program}: action");
        ensure!(
            run.data == *frame && run.mark == FOREIGN_MARK,
            "{program}: changed"
        );
        ensure!(dp.reason(reason)? == before + 1, "{program}: not counted");
    }
    let (_, known) = fragment(&request.bytes(), 32, 0x7777);
    dp.act_for_uplink(u32::from(id % 3 + 1))?;
    let before = dp.reason(PASS_WRONG_UPLINK)?;
    ensure!(
        dp.run(EGRESS, &known, 0)?.data == known,
        "translated on another uplink"
    );
    ensure!(dp.reason(PASS_WRONG_UPLINK)? == before + 1);
    Ok(())
}

/// The MSS option value of a TCP frame, if any (first option walk, like the program's).
fn mss_of(frame: &[u8]) -> Option<u16> {
    let v = view(frame);
    let end = v.l4_off + usize::from(frame[v.l4_off + 12] >> 4) * 4;
    let mut at = v.l4_off + 20;
    while at < end {
        match frame[at] {
            0 => return None,
            1 => at += 1,
            2 => return Some(u16::from_be_bytes([frame[at + 2], frame[at + 3]])),
            _ if frame[at + 1] < 2 => return None,
            _ => at += usize::from(frame[at + 1]),
        }
    }
    None
}

/// SYNs leaving by an uplink announce at most its MSS: translated flows and the gateway's own,
/// the option at an even or odd offset; smaller MSS, other segments and odd options untouched.
#[test]
fn syns_are_clamped_to_the_uplink_mss() -> anyhow::Result<()> {
    let mut dp = Datapath::load()?;
    let syn = |port: u16, options: &[u8]| {
        Packet::tcp((CLIENT, port), (SERVER, 443), TCP_SYN).with_tcp_options(options)
    };
    let even = [2, 4, 0x05, 0xb4, 4, 2, 1, 1];
    let odd = [1, 2, 4, 0x05, 0xb4, 1, 1, 0];
    let cases = [
        ("mss 1460", syn(40_000, &even), Some(MSS_MAX)),
        (
            "mss 1460 at an odd offset",
            syn(40_001, &odd),
            Some(MSS_MAX),
        ),
        ("mss 1400", syn(40_002, &[2, 4, 0x05, 0x78]), Some(1400)),
        ("no mss", syn(40_003, &[1, 1, 4, 2]), None),
        (
            "zero-length option first",
            syn(40_004, &[3, 0, 2, 4, 0x05, 0xb4, 0, 0]),
            None,
        ),
    ];
    for (name, packet, want) in cases {
        let frame = packet.bytes();
        let lan = dp.run(LAN, &frame, 0)?;
        let id = (lan.mark >> 24) as u8;
        dp.act_for_uplink(u32::from(id))?;
        let out = dp.run(EGRESS, &frame, lan.mark)?.data;
        ensure!(mss_of(&out) == want, "{name}: mss {:?}", mss_of(&out));
        let mss = view(&frame).l4_off + 20..view(&frame).l4_off + 28;
        let mut allowed = translated_ranges(&frame, true);
        if want == Some(MSS_MAX) {
            allowed.push(mss);
        }
        only_changed(&frame, &out, &allowed).context(name)?;
        verify_checksums(&out).map_err(|what| anyhow::anyhow!("{name}: {what}"))?;
    }

    // The gateway's own SYN: clamped, not translated.
    dp.act_for_uplink(1)?;
    let own = Packet::tcp((uplink_addr(1), 40_000), (SERVER, 443), TCP_SYN).with_tcp_options(&even);
    let frame = own.bytes();
    let out = dp.run(EGRESS, &frame, 0)?.data;
    let l4 = view(&frame).l4_off;
    only_changed(&frame, &out, &[l4 + 16..l4 + 18, l4 + 22..l4 + 24])?;
    ensure!(mss_of(&out) == Some(MSS_MAX));
    verify_checksums(&out).map_err(anyhow::Error::msg)?;

    // Not a SYN, or clamping off on the uplink: untouched.
    let mut ack = own.clone();
    ack.l4 = L4::Tcp {
        src_port: 40_000,
        dst_port: 443,
        seq: 1,
        flags: TCP_ACK,
    };
    ensure!(
        dp.run(EGRESS, &ack.bytes(), 0)?.data == ack.bytes(),
        "an ACK was clamped"
    );
    let mut uplink = dp.uplink(1)?;
    uplink.mss_max = 0;
    dp.set_uplink(1, uplink)?;
    ensure!(
        dp.run(EGRESS, &frame, 0)?.data == frame,
        "clamped with mss_max 0"
    );
    Ok(())
}
