//! Packet headers as byte arrays (no alignment requirements, no endianness surprises) and the
//! one bounds-checked accessor every parser goes through.

use aya_ebpf::programs::TcContext;

pub const ETH_HDR_LEN: usize = 14;
/// The link-layer header of a raw-IP uplink (PPP, raw-IP LTE, TUN, WireGuard): none, tc sees
/// the IPv4 header first.
pub const RAW_IP_HDR_LEN: usize = 0;
/// EtherType of IPv4 in network byte order, as it sits in the frame.
pub const ETH_P_IP: [u8; 2] = [0x08, 0x00];

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

/// The fixed 20-byte part of an IPv4 header; options follow when `ihl > 5`.
#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<EthHdr>() == ETH_HDR_LEN);
const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == 20);

impl Ipv4Hdr {
    pub fn version(&self) -> u8 {
        self.version_ihl >> 4
    }

    /// Header length in bytes, options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.version_ihl & 0x0f) * 4
    }
}

/// A pointer to a `T` at `offset` into the packet, or `None` if the packet is too short. The
/// comparison against `data_end` is what lets the verifier accept the later dereference.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Offset of the IPv4 checksum from the start of an IPv4 header (also one quoted in an ICMP
/// error). The checksum, source and destination are contiguous, so one store writes all three.
pub const IP_CHECK_FIELD: usize = 10;
/// Smallest IPv4 header (no options).
pub const IPV4_MIN_LEN: usize = 20;

/// The fixed 20-byte part of a TCP header.
#[repr(C)]
pub struct TcpHdr {
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub seq: [u8; 4],
    pub ack_seq: [u8; 4],
    /// Data offset in the high nibble, in 32-bit words.
    pub data_off: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urg_ptr: [u8; 2],
}

#[repr(C)]
pub struct UdpHdr {
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

/// ICMP echo request/reply header.
#[repr(C)]
pub struct IcmpEchoHdr {
    pub kind: u8,
    pub code: u8,
    pub check: [u8; 2],
    pub id: [u8; 2],
    pub seq: [u8; 2],
}

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// ICMP errors, which quote the IP header and first 8 bytes (or more) of the packet they are
/// about, after their own 8-byte header.
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
pub const ICMP_HDR_LEN: usize = 8;
/// Bytes of the quoted L4 header every ICMP error carries (RFC 792): ports or echo id.
pub const QUOTED_L4_MIN: usize = 8;

/// "More fragments" in the host-order flags + fragment offset field.
pub const IP_MF: u16 = 0x2000;

/// Checksum field offsets inside each L4 header.
pub const TCP_CHECK_OFF: usize = 16;
pub const UDP_CHECK_OFF: usize = 6;
pub const ICMP_CHECK_OFF: usize = 2;
/// Where the echo identifier sits inside an ICMP echo header.
pub const ICMP_ID_OFF: usize = 4;

const _: () = assert!(core::mem::size_of::<TcpHdr>() == 20);
const _: () = assert!(core::mem::size_of::<UdpHdr>() == 8);
const _: () = assert!(core::mem::size_of::<IcmpEchoHdr>() == 8);
