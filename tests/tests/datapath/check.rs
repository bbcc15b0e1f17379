//! Checks shared by the data path tests: the flow key a packet should get, the remote's reply,
//! "only these bytes changed", and one flow's complete round trip through all three programs.

use std::{net::Ipv4Addr, ops::Range};

use anyhow::ensure;
use balancer_common::{
    flow::{FLOW_FLAG_ANSWERED, FLOW_STATE_ESTABLISHED, FLOW_STATE_NEW, FlowKey, ReverseKey},
    maps::{
        PROGRAM_LAN_INGRESS as LAN, PROGRAM_UPLINK_EGRESS as EGRESS,
        PROGRAM_UPLINK_INGRESS as INGRESS,
    },
};

use super::{
    harness::{Datapath, PASS, be, uplink_addr},
    packet::{L4, Packet, TCP_ACK, TCP_SYN, verify_checksums, view},
};

/// Low bits of the mark belong to others: they must survive steering.
pub const FOREIGN_MARK: u32 = 0x0000_1234;

/// The packet's FlowKey as lan_ingress builds it (ICMP: the echo id, remote port 0).
pub fn flow_key(packet: &Packet) -> FlowKey {
    let v = view(&packet.bytes());
    let icmp = v.protocol == 1;
    FlowKey {
        client_addr: be(v.src),
        remote_addr: be(v.dst),
        client_port: v.src_port.to_be(),
        remote_port: if icmp { 0 } else { v.dst_port.to_be() },
        protocol: v.protocol,
        _pad: [0; 3],
    }
}

/// The remote's answer to `request` after source NAT to `addr`:`port`.
pub fn reply_to(request: &Packet, addr: Ipv4Addr, port: u16) -> Packet {
    let mut reply = match &request.l4 {
        L4::Tcp { dst_port, .. } => {
            Packet::tcp((request.dst, *dst_port), (addr, port), TCP_SYN | TCP_ACK)
        }
        L4::Udp {
            dst_port,
            zero_checksum,
            ..
        } => {
            let mut reply = Packet::udp((request.dst, *dst_port), (addr, port));
            reply.l4 = match reply.l4 {
                L4::Udp {
                    src_port, dst_port, ..
                } => L4::Udp {
                    src_port,
                    dst_port,
                    zero_checksum: *zero_checksum,
                },
                other => other,
            };
            reply
        }
        L4::Icmp { .. } => Packet::icmp_echo(request.dst, addr, 0, port),
        L4::Other { protocol } => Packet::other(request.dst, addr, *protocol),
    };
    reply.options = request.options.clone();
    reply.payload = b"the remote's answer".to_vec();
    reply
}

/// Asserts that `out` equals `input` except in `ranges`.
pub fn only_changed(input: &[u8], out: &[u8], ranges: &[Range<usize>]) -> anyhow::Result<()> {
    ensure!(
        input.len() == out.len(),
        "length changed: {} -> {}",
        input.len(),
        out.len()
    );
    for (at, (a, b)) in input.iter().zip(out).enumerate() {
        if a != b && !ranges.iter().any(|range| range.contains(&at)) {
            anyhow::bail!("byte {at} changed: {a:#04x} -> {b:#04x}");
        }
    }
    Ok(())
}

/// Byte ranges a translation may touch: IPv4 checksum, the address, the port (or echo id) and
/// the L4 checksum.
pub fn translated_ranges(frame: &[u8], source: bool) -> Vec<Range<usize>> {
    let v = view(frame);
    let l4 = v.l4_off;
    let (port, check) = match v.protocol {
        6 => (
            if source { l4..l4 + 2 } else { l4 + 2..l4 + 4 },
            l4 + 16..l4 + 18,
        ),
        17 => (
            if source { l4..l4 + 2 } else { l4 + 2..l4 + 4 },
            l4 + 6..l4 + 8,
        ),
        _ => (l4 + 4..l4 + 6, l4 + 2..l4 + 4),
    };
    let addr = if source { 26..30 } else { 30..34 };
    vec![24..26, addr, port, check]
}

/// One flow through all three programs; returns the uplink and the translated port.
pub fn round_trip(dp: &mut Datapath, request: &Packet) -> anyhow::Result<(u8, u16)> {
    let frame = request.bytes();
    let key = flow_key(request);

    let lan = dp.run(LAN, &frame, FOREIGN_MARK)?;
    ensure!(lan.action == PASS, "lan_ingress action {}", lan.action);
    ensure!(lan.data == frame, "lan_ingress changed the packet");
    let id = (lan.mark >> 24) as u8;
    ensure!(
        (1..=3).contains(&id),
        "mark {:#x} names no uplink",
        lan.mark
    );
    ensure!(
        lan.mark == (u32::from(id) << 24) | FOREIGN_MARK,
        "mark {:#x}",
        lan.mark
    );
    let entry = dp
        .flow(&key)?
        .ok_or_else(|| anyhow::anyhow!("no FLOWS entry"))?;
    ensure!(
        entry.uplink_id == id && entry.uplink_addr == be(uplink_addr(id)),
        "{entry:?}"
    );
    ensure!(
        entry.mark == u32::from(id) << 24 && entry.state == FLOW_STATE_NEW,
        "{entry:?}"
    );
    let nat_port = u16::from_be(entry.nat_port);
    ensure!(
        (32_768..=65_535).contains(&nat_port),
        "nat port {nat_port} outside the default range"
    );
    let reverse = ReverseKey {
        uplink_addr: entry.uplink_addr,
        remote_addr: key.remote_addr,
        nat_port: entry.nat_port,
        remote_port: key.remote_port,
        protocol: key.protocol,
        _pad: [0; 3],
    };
    ensure!(
        dp.reverse()?.contains(&(reverse, key)),
        "no matching NAT_REVERSE entry"
    );

    dp.act_for_uplink(u32::from(id))?;
    let egress = dp.run(EGRESS, &frame, lan.mark)?;
    ensure!(
        egress.action == PASS,
        "uplink_egress action {}",
        egress.action
    );
    only_changed(&frame, &egress.data, &translated_ranges(&frame, true))?;
    let out = view(&egress.data);
    ensure!(
        out.src == uplink_addr(id) && out.src_port == nat_port,
        "egress {out:?}"
    );
    // (ICMP's "ports" are both the echo id, which did change.)
    let icmp = out.protocol == 1;
    ensure!(
        out.dst == request.dst && (icmp || out.dst_port == view(&frame).dst_port),
        "egress {out:?}"
    );
    verify_checksums(&egress.data).map_err(|what| anyhow::anyhow!("egress: wrong {what}"))?;
    if let L4::Udp {
        zero_checksum: true,
        ..
    } = request.l4
    {
        ensure!(
            out.l4_check == 0,
            "a zero UDP checksum became {:#x}",
            out.l4_check
        );
    }

    let reply = reply_to(request, uplink_addr(id), nat_port).bytes();
    let ingress = dp.run(INGRESS, &reply, 0)?;
    ensure!(
        ingress.action == PASS,
        "uplink_ingress action {}",
        ingress.action
    );
    ensure!(
        ingress.mark == u32::from(id) << 24,
        "reply mark {:#x}",
        ingress.mark
    );
    only_changed(&reply, &ingress.data, &translated_ranges(&reply, false))?;
    let back = view(&ingress.data);
    let client = view(&frame);
    ensure!(
        back.dst == client.src && back.dst_port == client.src_port,
        "ingress {back:?}"
    );
    ensure!(back.src == request.dst, "ingress {back:?}");
    verify_checksums(&ingress.data).map_err(|what| anyhow::anyhow!("ingress: wrong {what}"))?;
    if let L4::Udp {
        zero_checksum: true,
        ..
    } = request.l4
    {
        ensure!(
            back.l4_check == 0,
            "a zero UDP checksum became {:#x}",
            back.l4_check
        );
    }
    let entry = dp
        .flow(&key)?
        .ok_or_else(|| anyhow::anyhow!("FLOWS entry gone"))?;
    ensure!(
        entry.state == FLOW_STATE_ESTABLISHED && entry.flags & FLOW_FLAG_ANSWERED != 0,
        "{entry:?}"
    );
    Ok((id, nat_port))
}
