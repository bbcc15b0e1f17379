//! Parsing shared by all three programs: the link-layer header (Ethernet, or none on a raw-IP
//! uplink such as PPP, an LTE modem's raw-IP interface or TUN), IPv4 (honouring IHL) and the L4
//! header of the protocols the data plane translates. Every field is copied out here, before any helper
//! call, because store and checksum helpers invalidate packet pointers.
//!
//! Errors are `balancer_common::stats` reasons; the packet is then passed untouched.

use aya_ebpf::programs::TcContext;
use balancer_common::{
    flow::{PROTOCOL_ICMP, PROTOCOL_TCP, PROTOCOL_UDP},
    policy::{TCP_FIN, TCP_SYN},
    stats::{PASS_FRAGMENT, PASS_MALFORMED, PASS_NOT_IPV4, PASS_OTHER_PROTOCOL},
};

use crate::headers::{
    ETH_HDR_LEN, ETH_P_IP, EthHdr, IP_MF, IPV4_MIN_LEN, IcmpEchoHdr, Ipv4Hdr, TcpHdr, UdpHdr,
    ptr_at,
};

/// A valid IPv4 header. Addresses are network order, as in the packet.
pub struct Ipv4 {
    /// Offset of the IPv4 header from the start of the frame: the link-layer header's length,
    /// a constant of the program variant, so it costs nothing at run time.
    pub l3_off: usize,
    pub src: u32,
    pub dst: u32,
    /// The header checksum, network order.
    pub check: u16,
    pub protocol: u8,
    /// A non-first fragment: no L4 header to look at.
    pub later_fragment: bool,
    /// More fragments follow (MF set): with `later_fragment` false, a first fragment.
    pub more_fragments: bool,
    /// The identification field, network order: names a fragmented datagram.
    pub id: u16,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    /// `tot_len` minus the IP header: the L4 bytes the header vouches for.
    pub l4_len: usize,
}

/// A TCP, UDP or ICMP echo packet.
pub struct Packet {
    pub ip: Ipv4,
    /// Network order. ICMP echo: the identifier in both.
    pub src_port: u16,
    pub dst_port: u16,
    /// ICMP only.
    pub icmp_type: u8,
    /// TCP only.
    pub tcp_flags: u8,
    /// TCP only, host order: the sequence number and the sequence space the segment uses
    /// (payload, plus one each for SYN and FIN).
    pub seq: u32,
    pub seq_len: u32,
    /// TCP only, host order: the acknowledgment number (meaningful with ACK set).
    pub ack: u32,
    /// TCP only, host order: the advertised window, unscaled.
    pub window: u16,
}

/// Makes the first `upto` bytes directly readable when the skb's linear part is shorter
/// (paged frames from some drivers); otherwise a valid packet would look truncated. Asks only
/// for the header about to be read: a GSO packet's linear part usually holds exactly its
/// headers, and pulling more would copy payload, and sometimes reallocate the head, for every
/// such packet.
#[inline(always)]
fn ensure_linear(ctx: &TcContext, upto: usize) {
    if ctx.data() + upto > ctx.data_end() && upto <= ctx.len() as usize {
        // On failure the bounds checks below see the short linear part and pass the packet
        // as malformed: untouched, which is the safe outcome.
        let _ = ctx.pull_data(upto as u32);
    }
}

/// The link-layer header (`L2` bytes: [`ETH_HDR_LEN`] or `headers::RAW_IP_HDR_LEN`) and IPv4: version
/// 4, IHL >= 5, `tot_len` covering the header and not longer than the frame. Ethernet padding
/// after `tot_len` is allowed. `L2` is a constant of each program variant, so the Ethernet
/// programs pay nothing for raw-IP support.
#[inline(always)]
pub fn parse_ipv4<const L2: usize>(ctx: &TcContext) -> Result<Ipv4, u32> {
    ensure_linear(ctx, L2 + IPV4_MIN_LEN);
    if L2 == ETH_HDR_LEN {
        let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(PASS_MALFORMED)?;
        // SAFETY: `ptr_at` checked that the whole header lies inside the packet.
        if unsafe { (*eth).ether_type } != ETH_P_IP {
            return Err(PASS_NOT_IPV4);
        }
    } else {
        // No link-layer header: the kernel's protocol field (network order, as in a frame)
        // says what the packet is.
        // SAFETY: `skb` is the context pointer the kernel passed in; `protocol` is readable.
        let protocol = unsafe { (*ctx.skb.skb).protocol };
        if protocol != u32::from(u16::from_ne_bytes(ETH_P_IP)) {
            return Err(PASS_NOT_IPV4);
        }
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, L2).ok_or(PASS_MALFORMED)?;
    // SAFETY: as above, bounds-checked by `ptr_at`.
    let ip = unsafe { &*ip };
    let header_len = ip.header_len();
    let tot_len = usize::from(u16::from_be_bytes(ip.tot_len));
    if ip.version() != 4
        || header_len < IPV4_MIN_LEN
        || tot_len < header_len
        || L2 + tot_len > ctx.len() as usize
    {
        return Err(PASS_MALFORMED);
    }
    Ok(Ipv4 {
        l3_off: L2,
        src: u32::from_ne_bytes(ip.src),
        dst: u32::from_ne_bytes(ip.dst),
        check: u16::from_ne_bytes(ip.check),
        protocol: ip.protocol,
        later_fragment: u16::from_be_bytes(ip.frag_off) & 0x1fff != 0,
        more_fragments: u16::from_be_bytes(ip.frag_off) & IP_MF != 0,
        id: u16::from_ne_bytes(ip.id),
        l4_off: L2 + header_len,
        l4_len: tot_len - header_len,
    })
}

/// The L4 header of TCP, UDP or ICMP echo; anything else is passed with a reason. Which ICMP
/// types count as echo depends on the direction, so the caller checks `icmp_type`.
#[inline(always)]
pub fn parse_l4(ctx: &TcContext, ip: Ipv4) -> Result<Packet, u32> {
    if ip.later_fragment {
        return Err(PASS_FRAGMENT);
    }
    let mut packet = Packet {
        src_port: 0,
        dst_port: 0,
        icmp_type: 0,
        tcp_flags: 0,
        seq: 0,
        seq_len: 0,
        ack: 0,
        window: 0,
        ip,
    };
    let off = packet.ip.l4_off;
    let l4_len = packet.ip.l4_len;
    match packet.ip.protocol {
        PROTOCOL_TCP => {
            ensure_linear(ctx, off + core::mem::size_of::<TcpHdr>());
            let tcp = ptr_at::<TcpHdr>(ctx, off).ok_or(PASS_MALFORMED)?;
            // SAFETY: bounds-checked by `ptr_at` at this (variable) offset.
            let tcp = unsafe { &*tcp };
            let header_len = usize::from(tcp.data_off >> 4) * 4;
            if header_len < core::mem::size_of::<TcpHdr>() || header_len > l4_len {
                return Err(PASS_MALFORMED);
            }
            packet.src_port = u16::from_ne_bytes(tcp.src_port);
            packet.dst_port = u16::from_ne_bytes(tcp.dst_port);
            packet.tcp_flags = tcp.flags;
            packet.seq = u32::from_be_bytes(tcp.seq);
            packet.ack = u32::from_be_bytes(tcp.ack_seq);
            packet.window = u16::from_be_bytes(tcp.window);
            let control = u32::from(tcp.flags & TCP_SYN != 0) + u32::from(tcp.flags & TCP_FIN != 0);
            packet.seq_len = (l4_len - header_len) as u32 + control;
        }
        PROTOCOL_UDP => {
            ensure_linear(ctx, off + core::mem::size_of::<UdpHdr>());
            let udp = ptr_at::<UdpHdr>(ctx, off).ok_or(PASS_MALFORMED)?;
            // SAFETY: bounds-checked by `ptr_at`.
            let udp = unsafe { &*udp };
            let len = usize::from(u16::from_be_bytes(udp.len));
            let header = core::mem::size_of::<UdpHdr>();
            // A first fragment carries only part of the datagram its length describes.
            let overlong = len > l4_len && !packet.ip.more_fragments;
            if len < header || l4_len < header || overlong {
                return Err(PASS_MALFORMED);
            }
            packet.src_port = u16::from_ne_bytes(udp.src_port);
            packet.dst_port = u16::from_ne_bytes(udp.dst_port);
        }
        PROTOCOL_ICMP => {
            ensure_linear(ctx, off + core::mem::size_of::<IcmpEchoHdr>());
            let icmp = ptr_at::<IcmpEchoHdr>(ctx, off).ok_or(PASS_MALFORMED)?;
            if l4_len < core::mem::size_of::<IcmpEchoHdr>() {
                return Err(PASS_MALFORMED);
            }
            // SAFETY: bounds-checked by `ptr_at`.
            let icmp = unsafe { &*icmp };
            packet.icmp_type = icmp.kind;
            packet.src_port = u16::from_ne_bytes(icmp.id);
            packet.dst_port = packet.src_port;
        }
        _ => return Err(PASS_OTHER_PROTOCOL),
    }
    Ok(packet)
}
