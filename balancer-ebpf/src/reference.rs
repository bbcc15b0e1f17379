//! Reference programs for `cargo xtask bench`, measured beside ours in the same run so that the
//! per-packet costs read as ratios, whatever the shared host's speed that minute. The daemon
//! never loads them.
//!
//! - An empty program: the floor of one BPF_PROG_TEST_RUN pass.
//! - A naive source NAT, the way first write-ups do it: one helper per field (load the headers,
//!   look the flow up in `FLOWS`, store the address, fix the IP checksum, fix the L4 checksum for
//!   the address, store the port, fix the L4 checksum again), then mark and count. The issue's
//!   target for ours (100 ns) was set against this (155-173 ns on the machine it was measured
//!   on). TCP without IP options only: that is all the bench feeds it.

use aya_ebpf::{bindings::BPF_F_PSEUDO_HDR, helpers::bpf_ktime_get_ns, programs::TcContext};
use balancer_common::{
    flow::{FlowKey, PROTOCOL_TCP},
    stats::UPLINK_TX_PACKETS,
};

use crate::{
    headers::{ETH_HDR_LEN, Ipv4Hdr},
    lan_ingress::set_mark,
    maps::{FLOWS, bump_uplink},
};

const IP_CHECK_OFF: usize = ETH_HDR_LEN + 10;
const IP_SRC_OFF: usize = ETH_HDR_LEN + 12;
const TCP_OFF: usize = ETH_HDR_LEN + 20;
const TCP_CHECK_OFF: usize = TCP_OFF + 16;

#[inline(always)]
pub fn naive_snat(ctx: &TcContext) -> Result<(), ()> {
    let ip: Ipv4Hdr = ctx.load(ETH_HDR_LEN).map_err(|_| ())?;
    if ip.protocol != PROTOCOL_TCP || ip.header_len() != 20 {
        return Err(());
    }
    let ports: [u16; 2] = ctx.load(TCP_OFF).map_err(|_| ())?;
    let key = FlowKey {
        client_addr: u32::from_ne_bytes(ip.src),
        remote_addr: u32::from_ne_bytes(ip.dst),
        client_port: ports[0],
        remote_port: ports[1],
        protocol: PROTOCOL_TCP,
        _pad: [0; 3],
    };
    let entry = FLOWS.get_ptr_mut(&key).ok_or(())?;
    // SAFETY: a pointer into the map value, valid for this run.
    let entry = unsafe { &mut *entry };
    // SAFETY: a plain helper call without arguments.
    entry.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    let (addr, port) = (entry.uplink_addr, entry.nat_port);
    let (mark, id) = (entry.mark, entry.uplink_id);

    ctx.store(IP_SRC_OFF, &addr, 0).map_err(|_| ())?;
    ctx.l3_csum_replace(IP_CHECK_OFF, u64::from(key.client_addr), u64::from(addr), 4)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(
        TCP_CHECK_OFF,
        u64::from(key.client_addr),
        u64::from(addr),
        u64::from(BPF_F_PSEUDO_HDR) | 4,
    )
    .map_err(|_| ())?;
    ctx.store(TCP_OFF, &port, 0).map_err(|_| ())?;
    ctx.l4_csum_replace(
        TCP_CHECK_OFF,
        u64::from(key.client_port),
        u64::from(port),
        2,
    )
    .map_err(|_| ())?;
    set_mark(ctx, mark);
    bump_uplink(u32::from(id), UPLINK_TX_PACKETS, 1);
    Ok(())
}
