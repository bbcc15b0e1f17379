//! The one packet builder of the data path tests (Ethernet + IPv4 with options + TCP, UDP,
//! ICMP or raw payload) and the reference checksums the programs' output is verified with.

use std::net::Ipv4Addr;

pub const ETH_LEN: usize = 14;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        src_port: u16,
        dst_port: u16,
        seq: u32,
        flags: u8,
    },
    /// `zero_checksum`: send without a checksum (allowed for UDP over IPv4).
    Udp {
        src_port: u16,
        dst_port: u16,
        zero_checksum: bool,
    },
    Icmp {
        kind: u8,
        id: u16,
        seq: u16,
    },
    /// Any other IP protocol, e.g. GRE (47): the payload follows the IP header as is.
    Other {
        protocol: u8,
    },
}

#[derive(Clone, Debug)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// IPv4 options, padded by the caller to a multiple of 4 bytes.
    pub options: Vec<u8>,
    /// TCP options, padded by the caller to a multiple of 4 bytes.
    pub tcp_options: Vec<u8>,
    /// The raw flags + fragment offset field.
    pub frag_off: u16,
    pub ether_type: u16,
}

impl Packet {
    fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        Self {
            src,
            dst,
            l4,
            payload: b"balancer datapath test payload".to_vec(),
            options: Vec::new(),
            tcp_options: Vec::new(),
            frag_off: 0x4000, // DF, like most TCP
            ether_type: 0x0800,
        }
    }

    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
        let l4 = L4::Tcp {
            src_port: src.1,
            dst_port: dst.1,
            seq: 0x1000_0000,
            flags,
        };
        Self::new(src.0, dst.0, l4)
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        let l4 = L4::Udp {
            src_port: src.1,
            dst_port: dst.1,
            zero_checksum: false,
        };
        Self::new(src.0, dst.0, l4)
    }

    pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, id: u16) -> Self {
        Self::new(src, dst, L4::Icmp { kind, id, seq: 7 })
    }

    pub fn other(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8) -> Self {
        Self::new(src, dst, L4::Other { protocol })
    }

    pub fn with_options(mut self, options: &[u8]) -> Self {
        self.options = options.to_vec();
        self
    }

    /// A TCP packet with sequence number `value` instead of the default 0x1000_0000.
    pub fn with_seq(mut self, value: u32) -> Self {
        if let L4::Tcp { seq, .. } = &mut self.l4 {
            *seq = value;
        }
        self
    }

    pub fn with_tcp_options(mut self, options: &[u8]) -> Self {
        self.tcp_options = options.to_vec();
        self
    }

    pub fn protocol(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Icmp { .. } => 1,
            L4::Other { protocol } => protocol,
        }
    }

    /// The frame, every checksum correct.
    pub fn bytes(&self) -> Vec<u8> {
        let mut l4 = match &self.l4 {
            L4::Tcp {
                src_port,
                dst_port,
                seq,
                flags,
            } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&src_port.to_be_bytes());
                h[2..4].copy_from_slice(&dst_port.to_be_bytes());
                h[4..8].copy_from_slice(&seq.to_be_bytes());
                h[8..12].copy_from_slice(&0x2000_0000u32.to_be_bytes());
                h[12] = (((20 + self.tcp_options.len()) / 4) << 4) as u8;
                h[13] = *flags;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes());
                h.extend_from_slice(&self.tcp_options);
                h
            }
            L4::Udp {
                src_port, dst_port, ..
            } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&src_port.to_be_bytes());
                h[2..4].copy_from_slice(&dst_port.to_be_bytes());
                h[4..6].copy_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                h
            }
            L4::Icmp { kind, id, seq } => {
                let mut h = vec![*kind, 0, 0, 0];
                h.extend_from_slice(&id.to_be_bytes());
                h.extend_from_slice(&seq.to_be_bytes());
                h
            }
            L4::Other { .. } => Vec::new(),
        };
        l4.extend_from_slice(&self.payload);
        match &self.l4 {
            L4::Tcp { .. } => {
                let sum = checksum(&[&pseudo_header(self.src, self.dst, 6, l4.len()), &l4]);
                l4[16..18].copy_from_slice(&sum.to_be_bytes());
            }
            L4::Udp { zero_checksum, .. } if !zero_checksum => {
                let sum = checksum(&[&pseudo_header(self.src, self.dst, 17, l4.len()), &l4]);
                let sum = if sum == 0 { 0xffff } else { sum };
                l4[6..8].copy_from_slice(&sum.to_be_bytes());
            }
            L4::Icmp { .. } => {
                let sum = checksum(&[&l4]);
                l4[2..4].copy_from_slice(&sum.to_be_bytes());
            }
            _ => {}
        }

        let header_len = 20 + self.options.len();
        let mut ip = vec![0u8; 20];
        ip[0] = 0x40 | (header_len / 4) as u8;
        ip[2..4].copy_from_slice(&((header_len + l4.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag_off.to_be_bytes());
        ip[8] = 64;
        ip[9] = self.protocol();
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.options);
        let sum = checksum(&[&ip]);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());

        let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
        frame.extend_from_slice(&self.ether_type.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&l4);
        frame
    }
}

/// An ICMP error `kind`/`code` from `src` to `dst` quoting `quoted` (an IPv4 packet, possibly
/// cut short); `rest` is the header's second word (the next-hop MTU for "fragmentation
/// needed"). Every checksum correct.
pub fn icmp_error(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: u8,
    code: u8,
    rest: u32,
    quoted: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let sum = checksum(&[&icmp]);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut packet = Packet::other(src, dst, 1);
    packet.payload = icmp;
    packet.frag_off = 0;
    packet.bytes()
}

fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, protocol]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

/// The Internet checksum (RFC 1071) over the concatenated parts; each part but the last must
/// have even length.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    for part in parts {
        for chunk in part.chunks(2) {
            let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
            sum += u64::from(word);
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The fields of a frame the tests look at, parsed independently of the programs.
#[derive(Debug, PartialEq, Eq)]
pub struct View {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub l4_off: usize,
    /// TCP/UDP ports; ICMP: the echo id in both.
    pub src_port: u16,
    pub dst_port: u16,
    /// The L4 checksum field as it is.
    pub l4_check: u16,
}

pub fn view(frame: &[u8]) -> View {
    let ip = &frame[ETH_LEN..];
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let l4_off = ETH_LEN + header_len;
    let l4 = &frame[l4_off..];
    let protocol = ip[9];
    let word = |bytes: &[u8], at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
    let (src_port, dst_port, l4_check) = match protocol {
        6 => (word(l4, 0), word(l4, 2), word(l4, 16)),
        17 => (word(l4, 0), word(l4, 2), word(l4, 6)),
        1 => (word(l4, 4), word(l4, 4), word(l4, 2)),
        _ => (0, 0, 0),
    };
    View {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        protocol,
        l4_off,
        src_port,
        dst_port,
        l4_check,
    }
}

/// Recomputes every checksum of `frame` from scratch: the IPv4 header, then TCP or UDP (with
/// the pseudo-header; a zero UDP checksum means "none") or ICMP. Returns what is wrong.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let ip = &frame[ETH_LEN..];
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if checksum(&[&ip[..header_len]]) != 0 {
        return Err("IPv4 header checksum".into());
    }
    let v = view(frame);
    let l4 = &ip[header_len..tot_len];
    let pseudo = pseudo_header(v.src, v.dst, v.protocol, l4.len());
    let ok = match v.protocol {
        6 => checksum(&[&pseudo, l4]) == 0,
        17 => v.l4_check == 0 || checksum(&[&pseudo, l4]) == 0,
        1 => checksum(&[l4]) == 0,
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("L4 checksum (protocol {})", v.protocol))
    }
}
