//! Hostile and odd input: over a million random and mutated frames (truncated headers, bad IHL
//! and lengths, options, fragments, odd ICMP, ICMP errors whose quoted packets lie) through all
//! three programs with BPF_PROG_TEST_RUN. Nothing may be mangled: an output either equals its
//! input or is a translation that changed only the fields a translation may change, with every
//! checksum domain's sum unchanged (the check of an incremental update, valid for inputs with
//! wrong checksums too); lan_ingress never changes bytes; every drop is counted by reason.
//! Root only. `FUZZ_PACKETS` and `FUZZ_SEED` override the defaults.

mod datapath;

use std::{net::Ipv4Addr, ops::Range, time::Instant};

use anyhow::{Context, bail, ensure};
use balancer_common::{
    maps::{
        PROGRAM_LAN_INGRESS as LAN, PROGRAM_UPLINK_EGRESS as EGRESS,
        PROGRAM_UPLINK_INGRESS as INGRESS,
    },
    stats::{REASONS_LEN, is_drop},
};
use datapath::{
    check::{reply_to, round_trip},
    harness::{DROP, Datapath, PASS, uplink_addr},
    packet::{ETH_LEN, L4, Packet, TCP_ACK, TCP_SYN, checksum, icmp_error},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// splitmix64: tiny, fast, and good enough to spread mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// Well-formed frames of every kind the programs translate, with live flows behind them, for
/// the mutations to start from.
fn seeds(dp: &mut Datapath) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut zero = Packet::udp((CLIENT, 40_003), (SERVER, 53));
    zero.l4 = L4::Udp {
        src_port: 40_003,
        dst_port: 53,
        zero_checksum: true,
    };
    let requests = [
        Packet::tcp((CLIENT, 40_000), (SERVER, 443), TCP_SYN)
            .with_tcp_options(&[2, 4, 0x05, 0x78, 1, 3, 3, 7]),
        Packet::tcp((CLIENT, 40_001), (SERVER, 443), TCP_SYN).with_options(&[1, 1, 1, 0]),
        Packet::udp((CLIENT, 40_002), (SERVER, 53)),
        zero,
        Packet::icmp_echo(CLIENT, SERVER, 8, 0x4242),
    ];
    let mut seeds = Vec::new();
    for request in &requests {
        let (id, port) = round_trip(dp, request)?;
        dp.act_for_uplink(u32::from(id))?;
        let frame = request.bytes();
        let sent = dp.run(EGRESS, &frame, 0)?.data;
        let mut reply = reply_to(request, uplink_addr(id), port);
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
        seeds.push(icmp_error(
            ROUTER,
            uplink_addr(id),
            3,
            0,
            0x0500,
            &sent[ETH_LEN..],
        ));
        seeds.push(icmp_error(
            ROUTER,
            uplink_addr(id),
            11,
            0,
            0x0500,
            &sent[ETH_LEN..ETH_LEN + 28],
        ));
        seeds.push(icmp_error(
            CLIENT,
            SERVER,
            3,
            0,
            0x0500,
            &delivered[ETH_LEN..],
        ));
        let mut first = frame.clone();
        first[20] |= 0x20; // MF: a first fragment
        let mut later = frame.clone();
        later[21] = 4; // offset 32
        seeds.extend([frame, sent, arrived, delivered, first, later]);
    }
    // A SYN to clamp (MSS 1460), its flow made by lan_ingress.
    let syn = Packet::tcp((CLIENT, 40_010), (SERVER, 443), TCP_SYN)
        .with_tcp_options(&[1, 2, 4, 0x05, 0xb4, 1, 1, 0])
        .bytes();
    dp.run(LAN, &syn, 0)?;
    seeds.push(syn);
    // All three programs act for uplink 1 from here on; other uplinks' flows exercise the
    // wrong-uplink paths.
    dp.act_for_uplink(1)?;
    Ok(seeds)
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut frame = seeds[rng.below(seeds.len())].clone();
    let len = frame.len();
    match rng.below(10) {
        0 => {} // unchanged: the translations themselves
        1 => {
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(len.min(96));
                frame[at] = rng.byte();
            }
        }
        2 => frame.truncate(ETH_LEN + rng.below(len - ETH_LEN + 1)),
        3 => frame[ETH_LEN] = 0x40 | (rng.byte() & 0x0f),
        4 => {
            let tot = rng.below(len + 8) as u16;
            frame[16..18].copy_from_slice(&tot.to_be_bytes());
        }
        5 => {
            // Inside a quoted packet (or the L4 header): ihl, lengths, ports, protocol.
            let at = (42 + rng.below(40)).min(len - 1);
            frame[at] = rng.byte();
        }
        6 => frame.extend((0..rng.below(64)).map(|_| rng.byte())),
        7 => {
            let frag = rng.next() as u16;
            frame[20..22].copy_from_slice(&frag.to_be_bytes());
        }
        8 => {
            let n = 14 + 20 + rng.below(120);
            frame = (0..n).map(|_| rng.byte()).collect();
            frame[12..14].copy_from_slice(&[0x08, 0x00]);
            frame[ETH_LEN] = 0x40 | (frame[ETH_LEN] & 0x0f);
        }
        _ => {
            // Several fields at once, then the outer header checksum made right again, so the
            // damage is not only in a field nothing checks.
            for _ in 0..1 + rng.below(3) {
                let at = ETH_LEN + rng.below((len - ETH_LEN).min(80));
                frame[at] ^= 1 << rng.below(8);
            }
            let ihl = usize::from(frame[ETH_LEN] & 0x0f) * 4;
            if ihl >= 20 && ETH_LEN + ihl <= frame.len() {
                frame[24..26].fill(0);
                let sum = checksum(&[&frame[ETH_LEN..ETH_LEN + ihl]]);
                frame[24..26].copy_from_slice(&sum.to_be_bytes());
            }
        }
    }
    frame
}

/// One's complement sum of `parts` modulo 0xffff (so +0 and -0 compare equal).
fn sum(parts: &[&[u8]]) -> u32 {
    u32::from(!checksum(parts)) % 0xffff
}

fn word(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

/// Bytes that differ outside `allowed`, as an error.
fn only_in(input: &[u8], out: &[u8], allowed: &[Range<usize>]) -> anyhow::Result<()> {
    for (at, (a, b)) in input.iter().zip(out).enumerate() {
        if a != b && !allowed.iter().any(|r| r.contains(&at)) {
            bail!("byte {at} changed: {a:#04x} -> {b:#04x}");
        }
    }
    Ok(())
}

fn pseudo(frame: &[u8], ip: usize, protocol: u8, len: usize) -> Vec<u8> {
    let mut p = frame[ip + 12..ip + 20].to_vec();
    p.extend_from_slice(&[0, protocol]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

/// The sums a TCP/UDP checksum at `check` protects (pseudo-header from the IP header at `ip`,
/// L4 bytes `l4..end`) are the same before and after; a zero UDP checksum stays zero.
fn l4_sum_kept(
    input: &[u8],
    out: &[u8],
    ip: usize,
    l4: Range<usize>,
    proto: u8,
) -> anyhow::Result<()> {
    let check = l4.start + if proto == 6 { 16 } else { 6 };
    if check + 2 > l4.end {
        return Ok(()); // not carried: nothing to keep
    }
    if proto == 17 && word(input, check) == 0 {
        ensure!(
            word(out, check) == 0,
            "zero UDP checksum became {:#x}",
            word(out, check)
        );
        return Ok(());
    }
    let len = l4.len();
    let before = sum(&[&pseudo(input, ip, proto, len), &input[l4.clone()]]);
    let after = sum(&[&pseudo(out, ip, proto, len), &out[l4]]);
    ensure!(before == after, "L4 checksum not kept (proto {proto})");
    Ok(())
}

/// What a translation may have done to `input` (known to differ from `out`), by program.
fn check_translation(program: &str, input: &[u8], out: &[u8]) -> anyhow::Result<()> {
    ensure!(program != LAN, "lan_ingress changed bytes");
    ensure!(out.len() == input.len(), "length changed");
    let egress = program == EGRESS;
    ensure!(
        input.len() >= 34 && input[12..14] == [8, 0],
        "not IPv4, yet changed"
    );
    let ihl = usize::from(input[ETH_LEN] & 0x0f) * 4;
    let tot = usize::from(word(input, 16));
    ensure!(
        ihl >= 20 && tot >= ihl && ETH_LEN + tot <= input.len(),
        "bad IPv4, yet changed"
    );
    let (addr, quoted_addr) = if egress {
        (26..30, 16..20)
    } else {
        (30..34, 12..16)
    };
    let l4 = ETH_LEN + ihl;
    let end = ETH_LEN + tot;
    only_in(&input[..l4], &out[..l4], &[24..26, addr.clone()])?;
    ensure!(
        sum(&[&input[ETH_LEN..l4]]) == sum(&[&out[ETH_LEN..l4]]),
        "IPv4 checksum not kept"
    );
    if word(input, 20) & 0x1fff != 0 {
        return only_in(input, out, &[24..26, addr]).context("later fragment");
    }
    let proto = input[23];
    let source_port = if egress { l4..l4 + 2 } else { l4 + 2..l4 + 4 };
    match proto {
        6 | 17 => {
            let check = if proto == 6 {
                l4 + 16..l4 + 18
            } else {
                l4 + 6..l4 + 8
            };
            // TCP at egress: MSS clamping may touch the options.
            let options = if proto == 6 && egress {
                l4 + 20..l4 + 60
            } else {
                0..0
            };
            only_in(input, out, &[0..l4, source_port, check, options])?;
            l4_sum_kept(input, out, ETH_LEN, l4..end, proto)
        }
        1 if [3, 11, 12].contains(&input[l4]) => {
            let q = l4 + 8;
            let qihl = usize::from(input[q] & 0x0f) * 4;
            let ql4 = q + qihl;
            ensure!(ql4 + 8 <= end, "a quote too short was translated");
            let qproto = input[q + 9];
            let qport = match (qproto, egress) {
                (1, _) => ql4 + 4..ql4 + 6,
                (_, true) => ql4 + 2..ql4 + 4,
                (_, false) => ql4..ql4 + 2,
            };
            let qcheck = match qproto {
                6 => ql4 + 16..ql4 + 18,
                17 => ql4 + 6..ql4 + 8,
                _ => ql4 + 2..ql4 + 4,
            };
            let qaddr = q + quoted_addr.start..q + quoted_addr.end;
            only_in(
                input,
                out,
                &[
                    0..l4,
                    l4 + 2..l4 + 4,
                    q + 10..q + 12,
                    qaddr.clone(),
                    qport,
                    qcheck,
                ],
            )?;
            ensure!(
                sum(&[&input[l4..end]]) == sum(&[&out[l4..end]]),
                "ICMP checksum not kept"
            );
            ensure!(
                sum(&[&input[q..ql4]]) == sum(&[&out[q..ql4]]),
                "quoted IPv4 checksum not kept"
            );
            ensure!(
                out[qaddr] == out[if egress { 26..30 } else { 30..34 }],
                "outer and quoted addresses disagree"
            );
            if qproto == 1 {
                ensure!(
                    sum(&[&input[ql4..end]]) == sum(&[&out[ql4..end]]),
                    "quoted echo checksum not kept"
                );
                Ok(())
            } else {
                l4_sum_kept(input, out, q, ql4..end, qproto)
            }
        }
        1 => {
            only_in(input, out, &[0..l4, l4 + 2..l4 + 6])?;
            ensure!(
                sum(&[&input[l4..end]]) == sum(&[&out[l4..end]]),
                "ICMP checksum not kept"
            );
            Ok(())
        }
        other => bail!("protocol {other} changed"),
    }
}

#[test]
fn a_million_hostile_packets_are_never_mangled() -> anyhow::Result<()> {
    let packets: usize = std::env::var("FUZZ_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x0ba1_a9ce);
    let mut dp = Datapath::load()?;
    let seeds = seeds(&mut dp)?;
    let mut rng = Rng(seed);
    let started = Instant::now();
    let (mut runs, mut refused, mut changed, mut drops) = (0u64, 0u64, [0u64; 3], 0u64);
    for n in 0..packets {
        let frame = mutate(&mut rng, &seeds);
        for (p, program) in [LAN, EGRESS, INGRESS].into_iter().enumerate() {
            let run = match dp.run(program, &frame, 0) {
                Ok(run) => run,
                // test_run itself refuses IPv4 frames shorter than Ethernet + 20 bytes.
                Err(_) if frame.len() < 34 => {
                    refused += 1;
                    continue;
                }
                Err(error) => return Err(error.context(format!("packet {n}"))),
            };
            runs += 1;
            match run.action {
                PASS => {}
                DROP => drops += 1,
                other => bail!("{program}: packet {n}: action {other}"),
            }
            if run.data != frame {
                changed[p] += 1;
                check_translation(program, &frame, &run.data).with_context(|| {
                    format!(
                        "{program}: packet {n} (seed {seed:#x})\n in  {frame:02x?}\n out {:02x?}",
                        run.data
                    )
                })?;
            }
            if program != LAN && run.data != frame && program == INGRESS {
                ensure!(
                    (1..=3).contains(&(run.mark >> 24)),
                    "{program}: packet {n}: translated without a mark"
                );
            }
        }
    }
    let mut counted = 0;
    for reason in (0..REASONS_LEN).filter(|r| is_drop(*r)) {
        counted += dp.reason(reason)?;
    }
    ensure!(counted == drops, "{drops} drops, {counted} counted");
    let reasons: Vec<u64> = (0..REASONS_LEN)
        .map(|r| dp.reason(r))
        .collect::<Result<_, _>>()?;
    let elapsed = started.elapsed();
    println!(
        "fuzz: {packets} packets, {runs} runs in {:.1} s ({:.2} µs/run), {refused} refused by test_run, translated: lan {} egress {} ingress {}, drops {drops}; reasons {reasons:?}",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / runs.max(1) as f64,
        changed[0],
        changed[1],
        changed[2],
    );
    ensure!(
        changed[1] > 1000 && changed[2] > 1000,
        "too few translations to mean much"
    );
    Ok(())
}
