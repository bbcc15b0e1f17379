//! Uplink egress: count, clamp the MSS of SYNs, then source-NAT the packets of flows assigned
//! to this uplink, later fragments of their datagrams (also those the gateway made itself), and
//! LAN clients' ICMP errors about their replies. Runs after routing, so the packet is known to leave by this uplink; a flow of
//! another uplink here means marks and routes disagree, and translating it would only hide that.

use aya_ebpf::programs::TcContext;
use balancer_common::{
    flow::{FlowKey, PROTOCOL_ICMP, PROTOCOL_TCP},
    policy::TCP_SYN,
    stats::{
        PASS_ICMP_OTHER, PASS_NOT_TRANSLATED, PASS_WRONG_UPLINK, UPLINK_TX_BYTES, UPLINK_TX_PACKETS,
    },
};

use crate::{
    flow, fragments,
    headers::ICMP_ECHO_REQUEST,
    icmp_error,
    maps::{UPLINK_BY_IFINDEX, UPLINKS, bump_uplink},
    mss,
    nat::{Side, rewrite},
    parse::{parse_ipv4, parse_l4},
};

/// `L2`: the uplink's link-layer header length (`headers::ETH_HDR_LEN` or `RAW_IP_HDR_LEN`).
#[inline(always)]
pub fn try_uplink_egress<const L2: usize>(ctx: &TcContext) -> Result<(), u32> {
    // SAFETY: `skb` is the context pointer the kernel passed in; `ifindex` is readable.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let result = translate::<L2>(ctx, ifindex);
    let id = match result {
        Ok(Some(id)) => Some(id),
        _ => uplink_of(ifindex),
    };
    if let Some(id) = id {
        bump_uplink(id, UPLINK_TX_PACKETS, 1);
        bump_uplink(id, UPLINK_TX_BYTES, u64::from(ctx.len()));
    }
    result.map(|_| ())
}

/// The uplink the daemon registered interface `ifindex` as; `None` while it has not (the
/// program may be attached first).
#[inline(always)]
fn uplink_of(ifindex: u32) -> Option<u32> {
    // SAFETY: the value is a plain u32, copied out at once.
    unsafe { UPLINK_BY_IFINDEX.get(ifindex) }.copied()
}

/// Source-translates the packet if it belongs to a flow of this uplink; `Ok(Some(uplink id))`
/// when the packet was a flow's (so the caller need not look the interface up to count it).
///
/// The common packet, an established flow's, takes the short way: its flow names its uplink,
/// and that uplink's slot names its interface, which must be this one. SYNs (whose MSS is
/// clamped to this interface's uplink whether or not they belong to a flow), later fragments
/// and ICMP errors find the uplink by interface first.
#[inline(always)]
fn translate<const L2: usize>(ctx: &TcContext, ifindex: u32) -> Result<Option<u32>, u32> {
    let ip = parse_ipv4::<L2>(ctx)?;
    if ip.later_fragment {
        let id = uplink_of(ifindex).ok_or(PASS_NOT_TRANSLATED)?;
        return fragments::translate(ctx, &ip, Side::Source, id).map(|()| Some(id));
    }
    let packet = parse_l4(ctx, ip)?;
    let protocol = packet.ip.protocol;
    let icmp_error = protocol == PROTOCOL_ICMP && icmp_error::is_error(packet.icmp_type);
    let syn = protocol == PROTOCOL_TCP && packet.tcp_flags & TCP_SYN != 0;
    let interface_uplink = if syn || icmp_error {
        let id = uplink_of(ifindex).ok_or(PASS_NOT_TRANSLATED)?;
        let mss_max = UPLINKS.get(id).map_or(0, |uplink| uplink.mss_max);
        mss::clamp(ctx, &packet, mss_max)?;
        Some(id)
    } else {
        None
    };
    if icmp_error {
        let (quoted, entry) = icmp_error::client_flow(ctx, &packet.ip)?;
        let id = u32::from(entry.uplink_id);
        if interface_uplink != Some(id) {
            return Err(PASS_WRONG_UPLINK);
        }
        icmp_error::rewrite(
            ctx,
            &packet.ip,
            &quoted,
            Side::Source,
            entry.uplink_addr,
            entry.nat_port,
        )?;
        return Ok(Some(id));
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
    let entry = flow::lookup(&key).ok_or(PASS_NOT_TRANSLATED)?;
    // SAFETY: a successful lookup returns a pointer to the value; fields are copied out.
    let (uplink_id, uplink_addr, nat_port, mark) = unsafe {
        (
            (*entry).uplink_id,
            (*entry).uplink_addr,
            (*entry).nat_port,
            (*entry).mark,
        )
    };
    let id = u32::from(uplink_id);
    let leaves_by_its_uplink = UPLINKS
        .get(id)
        .is_some_and(|uplink| uplink.ifindex == ifindex && uplink.ifindex != 0);
    if !leaves_by_its_uplink {
        return Err(PASS_WRONG_UPLINK);
    }
    // A first fragment here may be one the gateway made itself (the uplink's MTU is below the
    // LAN's and DF was clear): LAN ingress saw a whole datagram and remembered nothing, so the
    // later fragments find their translation only if it is remembered here.
    fragments::remember(&packet.ip, uplink_addr, mark, uplink_id);
    rewrite(ctx, &packet, Side::Source, uplink_addr, nat_port)?;
    Ok(Some(id))
}
