//! Uplink egress: count, clamp the MSS of SYNs, then source-NAT the packets of flows assigned
//! to this uplink, later fragments of their datagrams, and LAN clients' ICMP errors about their
//! replies. Runs after routing, so the packet is known to leave by this uplink; a flow of
//! another uplink here means marks and routes disagree, and translating it would only hide that.

use aya_ebpf::programs::TcContext;
use balancer_common::{
    flow::{FlowKey, PROTOCOL_ICMP},
    stats::{
        PASS_ICMP_OTHER, PASS_NOT_TRANSLATED, PASS_WRONG_UPLINK, UPLINK_TX_BYTES, UPLINK_TX_PACKETS,
    },
};

use crate::{
    fragments,
    headers::ICMP_ECHO_REQUEST,
    icmp_error,
    maps::{FLOWS, UPLINK_BY_IFINDEX, UPLINKS, bump_uplink},
    mss,
    nat::{Side, rewrite},
    parse::{parse_ipv4, parse_l4},
};

#[inline(always)]
pub fn try_uplink_egress(ctx: &TcContext) -> Result<(), u32> {
    // SAFETY: `skb` is the context pointer the kernel passed in; `ifindex` is readable.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is a plain u32, copied out at once.
    let Some(&id) = (unsafe { UPLINK_BY_IFINDEX.get(ifindex) }) else {
        // Attached before user space registered the interface: nothing to do yet.
        return Ok(());
    };
    bump_uplink(id, UPLINK_TX_PACKETS, 1);
    bump_uplink(id, UPLINK_TX_BYTES, u64::from(ctx.len()));

    let ip = parse_ipv4(ctx)?;
    if ip.later_fragment {
        return fragments::translate(ctx, &ip, Side::Source, id);
    }
    let packet = parse_l4(ctx, ip)?;
    let mss_max = UPLINKS.get(id).map_or(0, |uplink| uplink.mss_max);
    mss::clamp(ctx, &packet, mss_max)?;
    let protocol = packet.ip.protocol;
    if protocol == PROTOCOL_ICMP && icmp_error::is_error(packet.icmp_type) {
        let (quoted, entry) = icmp_error::client_flow(ctx, &packet.ip)?;
        if u32::from(entry.uplink_id) != id {
            return Err(PASS_WRONG_UPLINK);
        }
        return icmp_error::rewrite(
            ctx,
            &packet.ip,
            &quoted,
            Side::Source,
            entry.uplink_addr,
            entry.nat_port,
        );
    }
    if protocol == PROTOCOL_ICMP && packet.icmp_type != ICMP_ECHO_REQUEST {
        return Err(PASS_ICMP_OTHER);
    }
    let key = FlowKey {
        client_addr: packet.ip.src,
        remote_addr: packet.ip.dst,
        client_port: packet.src_port,
        remote_port: if protocol == PROTOCOL_ICMP {
            0
        } else {
            packet.dst_port
        },
        protocol,
        _pad: [0; 3],
    };
    let entry = FLOWS.get_ptr(&key).ok_or(PASS_NOT_TRANSLATED)?;
    // SAFETY: a successful lookup returns a pointer to the value; fields are copied out.
    let (uplink_id, uplink_addr, nat_port) =
        unsafe { ((*entry).uplink_id, (*entry).uplink_addr, (*entry).nat_port) };
    if u32::from(uplink_id) != id {
        return Err(PASS_WRONG_UPLINK);
    }
    rewrite(ctx, &packet, Side::Source, uplink_addr, nat_port)
}
