//! Frames the cost bench feeds to BPF_PROG_TEST_RUN: Ethernet, IPv4 and TCP, UDP or ICMP with
//! correct checksums (the programs update them incrementally, so a wrong one would stay wrong),
//! and an ARP frame that every program passes at once.

use std::net::Ipv4Addr;

/// An ARP request frame: not IPv4, so every program passes it at once.
pub(super) fn arp() -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    frame.extend_from_slice(&[0u8; 28]);
    frame
}

pub(super) fn be(addr: Ipv4Addr) -> u32 {
    u32::from(addr).to_be()
}

pub(super) fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
    let mut l4 = vec![0u8; 20];
    l4[0..2].copy_from_slice(&src.1.to_be_bytes());
    l4[2..4].copy_from_slice(&dst.1.to_be_bytes());
    l4[4..8].copy_from_slice(&0x1000_0000u32.to_be_bytes());
    l4[8..12].copy_from_slice(&0x2000_0000u32.to_be_bytes());
    l4[12] = 5 << 4;
    l4[13] = flags;
    l4[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    l4.extend_from_slice(b"balancer bench payload");
    let sum = checksum(&[&pseudo_header(src.0, dst.0, 6, l4.len()), &l4]);
    l4[16..18].copy_from_slice(&sum.to_be_bytes());
    frame(src.0, dst.0, 6, &l4)
}

pub(super) fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let payload = b"balancer bench payload";
    let mut l4 = vec![0u8; 8];
    l4[0..2].copy_from_slice(&src.1.to_be_bytes());
    l4[2..4].copy_from_slice(&dst.1.to_be_bytes());
    let len = u16::try_from(8 + payload.len()).unwrap_or(u16::MAX);
    l4[4..6].copy_from_slice(&len.to_be_bytes());
    l4.extend_from_slice(payload);
    let sum = checksum(&[&pseudo_header(src.0, dst.0, 17, l4.len()), &l4]);
    let sum = if sum == 0 { 0xffff } else { sum };
    l4[6..8].copy_from_slice(&sum.to_be_bytes());
    frame(src.0, dst.0, 17, &l4)
}

/// ICMP type 3 code 4 with next-hop MTU 1400, quoting `quoted` (an IP header + 8 bytes).
pub(super) fn icmp_frag_needed(src: Ipv4Addr, dst: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let mut l4 = vec![3, 4, 0, 0, 0, 0];
    l4.extend_from_slice(&1400u16.to_be_bytes());
    l4.extend_from_slice(quoted);
    let sum = checksum(&[&l4]);
    l4[2..4].copy_from_slice(&sum.to_be_bytes());
    frame(src, dst, 1, &l4)
}

/// Ethernet + a 20-byte IPv4 header (DF, TTL 64, correct checksum) + `l4`.
fn frame(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    let total = u16::try_from(20 + l4.len()).unwrap_or(u16::MAX);
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = protocol;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    bytes.extend_from_slice(&ip);
    bytes.extend_from_slice(l4);
    bytes
}

fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.push(0);
    p.push(protocol);
    p.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
    p
}

/// The Internet checksum over the concatenation of `parts` (each of even length but the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for part in parts {
        for pair in part.chunks(2) {
            let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
            sum += u32::from(word);
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
