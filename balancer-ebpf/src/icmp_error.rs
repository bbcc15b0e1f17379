//! ICMP errors (destination unreachable, fragmentation needed, time exceeded, parameter
//! problem) about translated flows. An error quotes the packet it is about after its own 8-byte
//! header: the IPv4 header and at least 8 bytes of L4 (RFC 792; Linux and most routers send
//! more). The quoted tuple names the flow; translating the error means rewriting the outer
//! address and the quoted packet's opposite side, with every checksum that covers them:
//!
//! - the outer IPv4 checksum (its address changed);
//! - the quoted IPv4 checksum (its address changed);
//! - the quoted L4 checksum when the error carries it (UDP: always; TCP: when at least 18 bytes
//!   are quoted; echo: always), updated incrementally for the pseudo-header address and port;
//! - the ICMP checksum, which covers all quoted bytes (but no pseudo-header).
//!
//! Each change is paired with its checksum within the packet, so the packet's total sum (and a
//! CHECKSUM_COMPLETE `skb->csum`) stays valid without helper help. Values are read with
//! `bpf_skb_load_bytes` and written with `bpf_skb_store_bytes`: the offsets are variable and
//! both helpers check them against the packet at run time.

use aya_ebpf::programs::TcContext;
use balancer_common::{
    flow::{FlowEntry, FlowKey, PROTOCOL_ICMP, PROTOCOL_TCP, PROTOCOL_UDP, ReverseKey},
    stats::{DROP_REWRITE_FAILED, PASS_ICMP_ERROR_MALFORMED, PASS_ICMP_ERROR_UNMATCHED},
};

use crate::{
    flow,
    headers::{
        ICMP_CHECK_OFF, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_HDR_LEN,
        ICMP_ID_OFF, ICMP_PARAMETER_PROBLEM, ICMP_TIME_EXCEEDED, IPV4_MIN_LEN, Ipv4Hdr,
        QUOTED_L4_MIN, TCP_CHECK_OFF, UDP_CHECK_OFF,
    },
    nat::{Side, csum_replace2, csum_replace4, store_ip_addr},
    parse::Ipv4,
};

/// The ICMP types translated here; others (redirects, timestamps, ...) pass untouched.
#[inline(always)]
pub fn is_error(kind: u8) -> bool {
    kind == ICMP_DEST_UNREACH || kind == ICMP_TIME_EXCEEDED || kind == ICMP_PARAMETER_PROBLEM
}

/// The packet an ICMP error quotes. Addresses, ports and checksums network order, as in the
/// packet.
pub struct Quoted {
    /// Frame offsets of the quoted IPv4 and L4 headers.
    ip_off: usize,
    l4_off: usize,
    ip_check: u16,
    pub src: u32,
    pub dst: u32,
    pub protocol: u8,
    /// Quoted ICMP only: its type (echo request or reply, to name a flow).
    pub icmp_type: u8,
    /// Ports; quoted ICMP: the echo id in both.
    pub src_port: u16,
    pub dst_port: u16,
    /// Frame offset of the quoted L4 checksum, 0 when the error does not carry it.
    check_off: usize,
    check: u16,
    /// The ICMP error's own checksum.
    icmp_check: u16,
}

/// Parses the quoted packet of the ICMP error in `ip`, within the bytes the outer header
/// vouches for. A quoted packet that cannot be real (short, bad version or IHL, a total length
/// shorter than its headers) is `PASS_ICMP_ERROR_MALFORMED`; one without ports (a later
/// fragment, another protocol) is `PASS_ICMP_ERROR_UNMATCHED`.
#[inline(always)]
pub fn parse_quoted(ctx: &TcContext, ip: &Ipv4) -> Result<Quoted, u32> {
    let end = ip.l4_off + ip.l4_len;
    let ip_off = ip.l4_off + ICMP_HDR_LEN;
    if ip_off + IPV4_MIN_LEN > end {
        return Err(PASS_ICMP_ERROR_MALFORMED);
    }
    let hdr: Ipv4Hdr = ctx.load(ip_off).map_err(|_| PASS_ICMP_ERROR_MALFORMED)?;
    let header_len = hdr.header_len();
    let tot_len = usize::from(u16::from_be_bytes(hdr.tot_len));
    let l4_off = ip_off + header_len;
    if hdr.version() != 4
        || header_len < IPV4_MIN_LEN
        || tot_len < header_len + QUOTED_L4_MIN
        || l4_off + QUOTED_L4_MIN > end
    {
        return Err(PASS_ICMP_ERROR_MALFORMED);
    }
    if u16::from_be_bytes(hdr.frag_off) & 0x1fff != 0 {
        return Err(PASS_ICMP_ERROR_UNMATCHED);
    }
    let l4: [u8; QUOTED_L4_MIN] = ctx.load(l4_off).map_err(|_| PASS_ICMP_ERROR_MALFORMED)?;
    let (check_at, icmp_type, src_port, dst_port) = match hdr.protocol {
        PROTOCOL_TCP | PROTOCOL_UDP => {
            let check_at = if hdr.protocol == PROTOCOL_TCP {
                TCP_CHECK_OFF
            } else {
                UDP_CHECK_OFF
            };
            let src_port = u16::from_ne_bytes([l4[0], l4[1]]);
            (check_at, 0, src_port, u16::from_ne_bytes([l4[2], l4[3]]))
        }
        PROTOCOL_ICMP => {
            let id = u16::from_ne_bytes([l4[ICMP_ID_OFF], l4[ICMP_ID_OFF + 1]]);
            (ICMP_CHECK_OFF, l4[0], id, id)
        }
        _ => return Err(PASS_ICMP_ERROR_UNMATCHED),
    };
    let mut check_off = l4_off + check_at;
    let mut check = 0;
    if check_off + 2 <= end {
        let bytes: [u8; 2] = ctx.load(check_off).map_err(|_| PASS_ICMP_ERROR_MALFORMED)?;
        check = u16::from_ne_bytes(bytes);
    } else {
        check_off = 0;
    }
    let icmp_check: [u8; 2] = ctx
        .load(ip.l4_off + ICMP_CHECK_OFF)
        .map_err(|_| PASS_ICMP_ERROR_MALFORMED)?;
    Ok(Quoted {
        ip_off,
        l4_off,
        ip_check: u16::from_ne_bytes(hdr.check),
        src: u32::from_ne_bytes(hdr.src),
        dst: u32::from_ne_bytes(hdr.dst),
        protocol: hdr.protocol,
        icmp_type,
        src_port,
        dst_port,
        check_off,
        check,
        icmp_check: u16::from_ne_bytes(icmp_check),
    })
}

/// Translates the ICMP error in `ip` quoting `q`: the outer `side` becomes `addr`, and the
/// quoted packet's other side (the one that was translated on the way out, or is about to be)
/// becomes `addr`:`port` (echo id for quoted ICMP). At uplink ingress `side` is the
/// destination (uplink address -> client); at uplink egress the source (client -> uplink).
/// A failing store is a drop: part of the packet may already be rewritten.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    ip: &Ipv4,
    q: &Quoted,
    side: Side,
    addr: u32,
    port: u16,
) -> Result<(), u32> {
    store_ip_addr(ctx, ip.l3_off, (ip.check, ip.src, ip.dst), side, addr)?;

    let (quoted_side, old_addr, old_port, port_at) = match side {
        Side::Destination => (Side::Source, q.src, q.src_port, 0),
        Side::Source => (Side::Destination, q.dst, q.dst_port, 2),
    };
    let port_at = if q.protocol == PROTOCOL_ICMP {
        ICMP_ID_OFF
    } else {
        port_at
    };
    let ip_check = store_ip_addr(ctx, q.ip_off, (q.ip_check, q.src, q.dst), quoted_side, addr)?;
    ctx.store(q.l4_off + port_at, &port, 0)
        .map_err(|_| DROP_REWRITE_FAILED)?;

    let mut icmp = csum_replace2(q.icmp_check, q.ip_check, ip_check);
    icmp = csum_replace4(icmp, old_addr, addr);
    icmp = csum_replace2(icmp, old_port, port);
    // A zero UDP checksum means "none" and stays zero.
    if q.check_off != 0 && !(q.protocol == PROTOCOL_UDP && q.check == 0) {
        let mut check = q.check;
        if q.protocol != PROTOCOL_ICMP {
            check = csum_replace4(check, old_addr, addr);
        }
        check = csum_replace2(check, old_port, port);
        if q.protocol == PROTOCOL_UDP && check == 0 {
            check = 0xffff;
        }
        ctx.store(q.check_off, &check, 0)
            .map_err(|_| DROP_REWRITE_FAILED)?;
        icmp = csum_replace2(icmp, q.check, check);
    }
    ctx.store(ip.l4_off + ICMP_CHECK_OFF, &icmp, 0)
        .map_err(|_| DROP_REWRITE_FAILED)
}

/// The flow a LAN client's ICMP error is about: it quotes a reply the client got (source the
/// remote, destination the client), so the quoted tuple read backwards is the flow's key.
/// Returns the quoted packet and the flow's uplink id, address, NAT port and mark.
#[inline(always)]
pub fn client_flow(ctx: &TcContext, ip: &Ipv4) -> Result<(Quoted, FlowEntry), u32> {
    let q = parse_quoted(ctx, ip)?;
    let echo = q.protocol == PROTOCOL_ICMP;
    // An error about a reply comes from the reply's destination.
    if (echo && q.icmp_type != ICMP_ECHO_REPLY) || q.dst != ip.src {
        return Err(PASS_ICMP_ERROR_UNMATCHED);
    }
    let key = FlowKey {
        client_addr: q.dst,
        remote_addr: q.src,
        client_port: q.dst_port,
        remote_port: if echo { 0 } else { q.src_port },
        protocol: q.protocol,
        _pad: [0; 3],
    };
    let entry = flow::lookup(&key).ok_or(PASS_ICMP_ERROR_UNMATCHED)?;
    // SAFETY: a successful lookup returns a pointer to the value; copied out at once.
    let entry = unsafe { *entry };
    Ok((q, entry))
}

/// The flow an ICMP error arriving on an uplink is about: it quotes a packet the flow sent
/// (already translated: source the uplink address and NAT port), found through `NAT_REVERSE`
/// like a reply. Returns the quoted packet, the flow's key (the client's address and port)
/// and its mark.
#[inline(always)]
pub fn remote_flow(ctx: &TcContext, ip: &Ipv4) -> Result<(Quoted, FlowKey, u32), u32> {
    let q = parse_quoted(ctx, ip)?;
    let echo = q.protocol == PROTOCOL_ICMP;
    // The quoted packet left with the uplink's address, which is where its errors come back.
    if (echo && q.icmp_type != ICMP_ECHO_REQUEST) || q.src != ip.dst {
        return Err(PASS_ICMP_ERROR_UNMATCHED);
    }
    let reverse = ReverseKey {
        uplink_addr: q.src,
        remote_addr: q.dst,
        nat_port: q.src_port,
        remote_port: if echo { 0 } else { q.dst_port },
        protocol: q.protocol,
        _pad: [0; 3],
    };
    let key = flow::lookup_reverse(&reverse).ok_or(PASS_ICMP_ERROR_UNMATCHED)?;
    // SAFETY: a successful lookup returns a pointer to the value; copied out at once, since
    // LRU entries may be reused under us.
    let key = unsafe { (*key).flow };
    let entry = flow::lookup(&key).ok_or(PASS_ICMP_ERROR_UNMATCHED)?;
    // SAFETY: as above.
    let (nat_port, uplink_addr, mark) =
        unsafe { ((*entry).nat_port, (*entry).uplink_addr, (*entry).mark) };
    // A reverse entry left behind by a replaced flow names a translation no longer in use.
    if nat_port != reverse.nat_port || uplink_addr != reverse.uplink_addr {
        return Err(PASS_ICMP_ERROR_UNMATCHED);
    }
    Ok((q, key, mark))
}
