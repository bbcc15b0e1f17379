//! Flow and NAT state: the keys and values of `FLOWS` and `NAT_REVERSE`.
//!
//! Addresses and ports are kept in network byte order, exactly as they sit in the packet
//! (`u32::from_ne_bytes(header.src)`), so the hot path never swaps bytes; user space converts
//! with `u32::from_be`/`Ipv4Addr::from(u32::from_be(..))` when it prints them.

/// IP protocol numbers the data plane balances and translates.
pub const PROTOCOL_ICMP: u8 = 1;
pub const PROTOCOL_TCP: u8 = 6;
pub const PROTOCOL_UDP: u8 = 17;
/// `FlowKey::protocol` / `ReverseKey::protocol` of a hairpinned UDP flow (a LAN client to
/// another's mapping on an uplink address): UDP with the top bit set, a value no packet of
/// an ordinary flow carries, so hairpin flows never meet ordinary ones in the tables and an
/// ordinary flow's lookup never finds one.
pub const PROTOCOL_UDP_HAIRPIN: u8 = PROTOCOL_UDP | PROTOCOL_HAIRPIN_BIT;
/// The bit that marks a hairpin flow's protocol.
pub const PROTOCOL_HAIRPIN_BIT: u8 = 0x80;

/// A flow as the LAN client sent it. Key of `FLOWS`.
///
/// For ICMP echo, `client_port` is the echo identifier and `remote_port` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client_addr: u32,
    pub remote_addr: u32,
    pub client_port: u16,
    pub remote_port: u16,
    pub protocol: u8,
    /// Always zero: padding is hashed with the key, so garbage here would make lookups miss.
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The key of a flow; all values network order, as in the packet.
    #[inline(always)]
    pub fn new(
        client_addr: u32,
        remote_addr: u32,
        client_port: u16,
        remote_port: u16,
        protocol: u8,
    ) -> Self {
        let [ports, proto] = ports_and_protocol(client_port, remote_port, protocol);
        Self::from_words([client_addr, remote_addr, ports, proto])
    }

    #[inline(always)]
    fn from_words(words: [u32; 4]) -> Self {
        // SAFETY: `FlowKey` is `repr(C)`, 16 bytes, 4-aligned (asserted below), made of
        // integers only, so every bit pattern of four u32 words is a valid key.
        unsafe { core::mem::transmute::<[u32; 4], Self>(words) }
    }
}

/// The last two words of a [`FlowKey`] or [`ReverseKey`]: both ports, then the protocol with
/// its padding zero. Keys are built from words because the BPF target turns the three-byte
/// zero fill of `_pad` into a call of `memset`: a bpf-to-bpf call, whose return costs as much
/// as a helper call on hosts with return-thunk mitigations, on every packet.
#[inline(always)]
fn ports_and_protocol(first_port: u16, second_port: u16, protocol: u8) -> [u32; 2] {
    let [a, b] = first_port.to_ne_bytes();
    let [c, d] = second_port.to_ne_bytes();
    [
        u32::from_ne_bytes([a, b, c, d]),
        u32::from_ne_bytes([protocol, 0, 0, 0]),
    ]
}

const _: () =
    assert!(core::mem::size_of::<FlowKey>() == 16 && core::mem::align_of::<FlowKey>() == 4);
const _: () =
    assert!(core::mem::size_of::<ReverseKey>() == 16 && core::mem::align_of::<ReverseKey>() == 4);

/// A reply as it arrives on an uplink, before reverse NAT. Key of `NAT_REVERSE`, whose value
/// is a [`ReverseEntry`].
///
/// For ICMP echo replies, `nat_port` is the translated echo identifier and `remote_port` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReverseKey {
    /// The uplink's source address: the reply's destination.
    pub uplink_addr: u32,
    /// The reply's source.
    pub remote_addr: u32,
    /// The reply's destination port: the port the flow was translated to.
    pub nat_port: u16,
    /// The reply's source port.
    pub remote_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

impl ReverseKey {
    /// The key of a reply; all values network order, as in the packet.
    #[inline(always)]
    pub fn new(
        uplink_addr: u32,
        remote_addr: u32,
        nat_port: u16,
        remote_port: u16,
        protocol: u8,
    ) -> Self {
        let [ports, proto] = ports_and_protocol(nat_port, remote_port, protocol);
        // SAFETY: `ReverseKey` is `repr(C)`, 16 bytes, 4-aligned (asserted above), made of
        // integers only, so every bit pattern of four u32 words is a valid key.
        unsafe { core::mem::transmute::<[u32; 4], Self>([uplink_addr, remote_addr, ports, proto]) }
    }
}

/// Value of `NAT_REVERSE`: the flow a reply belongs to, and what translating an ordinary reply
/// takes, so that such a reply costs one lookup. Replies that change the flow's state (the
/// first answer, TCP SYN, FIN, RST) also update the flow in `FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReverseEntry {
    pub flow: FlowKey,
    /// Coarse monotonic time of the last reply; a flow whose client is silent while its
    /// remote still sends is not idle (see `policy::flow_expired_with_replies`).
    pub last_reply_ns: u64,
    /// The flow's mark, put on its replies.
    pub mark: u32,
    pub uplink_id: u8,
    /// `REVERSE_FLAG_*`.
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// `ReverseEntry::flags`: the flow has been answered and `FLOWS` knows it, so ordinary replies
/// need not touch `FLOWS`.
pub const REVERSE_FLAG_ANSWERED: u8 = 1 << 0;
/// `ReverseEntry::flags`: the flow is unsolicited (`FLOW_FLAG_UNSOLICITED`): the remote's
/// packets do not promote it, only the client's answer does.
pub const REVERSE_FLAG_UNSOLICITED: u8 = 1 << 1;

/// `FlowEntry::state`: where a flow is in its life, which decides its timeout.
pub const FLOW_STATE_NEW: u8 = 0;
/// A reply was seen: TCP SYN answered, or any UDP/ICMP reply.
pub const FLOW_STATE_ESTABLISHED: u8 = 1;
/// A FIN was seen in either direction.
pub const FLOW_STATE_CLOSING: u8 = 2;
/// Reserved: no longer entered. An RST moves a flow to closing, never ends it outright (RFC 7857
/// section 2.3); `FLOW_FLAG_RESET` records it.
pub const FLOW_STATE_CLOSED: u8 = 3;

/// `FlowEntry::flags`.
pub const FLOW_FLAG_ANSWERED: u8 = 1 << 0;
pub const FLOW_FLAG_CLIENT_FIN: u8 = 1 << 1;
pub const FLOW_FLAG_REMOTE_FIN: u8 = 1 << 2;
pub const FLOW_FLAG_RESET: u8 = 1 << 3;
/// The flow was put on its uplink by a `DESTINATIONS` entry (a modem's own subnet), not by the
/// schedule: it stays on that uplink even while the uplink takes no new balanced flows.
pub const FLOW_FLAG_FORCED: u8 = 1 << 4;
/// The flow was created by a remote's packet to a LAN endpoint's mapping (endpoint-independent
/// filtering), not by the client: it stays in the pending pair, where a flood can only evict
/// its like, until the client answers.
pub const FLOW_FLAG_UNSOLICITED: u8 = 1 << 5;

/// What the data plane knows about one flow. Value of `FLOWS`.
///
/// Written from several CPUs without locks: fields are independent and a lost update of
/// `last_seen_ns` or a sequence number only shifts a timeout or a later reset by one packet.
/// The TCP state never goes backwards: flags are set with an atomic OR, and what decides a
/// timeout or a port takeover reads the flags, so a stale `state` written late is harmless.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// `bpf_ktime_get_ns()` of the flow's first packet.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last packet in either direction.
    pub last_seen_ns: u64,
    /// The uplink's source address the flow is translated to.
    pub uplink_addr: u32,
    /// The uplink's mark, put on the flow's packets in both directions.
    pub mark: u32,
    /// `UplinkInfo::generation` when the flow was assigned; a different current generation
    /// means the uplink was disabled since, and the flow is released lazily.
    pub uplink_generation: u32,
    /// TCP: the next sequence number expected from the client (host order), for resets.
    pub client_seq_next: u32,
    /// TCP: the next sequence number the client expects from the remote end (host order),
    /// from the client's last acknowledgment.
    pub remote_seq_next: u32,
    /// The translated source port (echo identifier for ICMP), network order.
    pub nat_port: u16,
    pub uplink_id: u8,
    /// `FLOW_STATE_*`; only ever raised, except by a SYN that reuses a closed flow's ports.
    pub state: u8,
    /// `FLOW_FLAG_*`. Starts an 8-byte aligned word (with the window fields below)
    /// so the programs OR new bits in atomically: a bit set on one CPU is never lost to another.
    pub flags: u8,
    /// TCP: the window scale shift each end announced in its SYN, `WSCALE_NONE` if it did not.
    pub client_wscale: u8,
    pub remote_wscale: u8,
    pub _pad: u8,
    /// TCP: the window the client last advertised (unscaled, host order): with
    /// `remote_seq_next`, where an RST from the remote end must fall (RFC 5382).
    pub client_window: u16,
    /// TCP: the window of the remote end's last answer that went through `FLOWS` (its first
    /// answer, SYN, FIN or RST; unscaled, host order).
    pub remote_window: u16,
}

/// `FlowEntry::client_wscale` / `remote_wscale`: that end's SYN carried no window scale option
/// (or was not seen), so neither direction's window is scaled (RFC 7323).
pub const WSCALE_NONE: u8 = 0xff;

/// One fragmented datagram as a program sees it: the fields that, with the source, name a
/// datagram for reassembly (RFC 791). Key of `FRAGMENTS`.
///
/// Filled when a first fragment (offset 0, MF set) of a known flow passes: at LAN ingress with
/// the client's tuple, at uplink ingress with the remote's tuple as it arrives. Later fragments
/// carry no ports; they find their flow's translation here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: u32,
    pub dst: u32,
    /// The IP identification field, network order.
    pub id: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Where the later fragments of a datagram go. Value of `FRAGMENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentEntry {
    /// The address that replaces the fragment's source (LAN side: the uplink's address) or
    /// destination (uplink side: the client's address), network order.
    pub addr: u32,
    /// The flow's mark.
    pub mark: u32,
    /// The flow's uplink: LAN-side fragments are translated only when they leave by it.
    pub uplink_id: u8,
    pub _pad: [u8; 3],
}

/// The remote end of a connection that arrived on an uplink. Key of `INBOUND`.
///
/// It names only the remote end: at uplink ingress (before conntrack's DNAT) the LAN host a
/// port forward will pick is unknown, and so is the port it listens on; the LAN host's reply
/// is addressed to exactly this address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InboundKey {
    /// Network order, as in the packet.
    pub remote_addr: u32,
    pub remote_port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// Which uplink an inbound connection came in on. Value of `INBOUND`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundEntry {
    /// Coarse monotonic time of the first packet, then of the last LAN-side reply.
    pub last_seen_ns: u64,
    /// The uplink's mark, put on the LAN-side replies.
    pub mark: u32,
    pub uplink_id: u8,
    pub _pad: [u8; 3],
}

/// A LAN endpoint (address, port, protocol) as its flows leave. Key of `MAPPINGS`: every flow
/// of one endpoint gets the same uplink and translated port, whatever its destination
/// (endpoint-independent mapping, RFC 4787 REQ-1 and RFC 5382 REQ-1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MappingKey {
    /// Network order, as in the packet.
    pub client_addr: u32,
    pub client_port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// An endpoint's mapping. Value of `MAPPINGS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappingEntry {
    /// Coarse monotonic time the last flow of the endpoint was created with this mapping.
    pub last_flow_ns: u64,
    /// That flow's remote end (network order): while it lives, so does the mapping, however
    /// long ago it was created.
    pub anchor_remote_addr: u32,
    pub anchor_remote_port: u16,
    /// The translated port, network order.
    pub nat_port: u16,
    /// `UplinkInfo::generation` of the uplink when the mapping was made: a new generation (a
    /// new address, flows released) ends the mapping.
    pub uplink_generation: u32,
    pub uplink_id: u8,
    pub _pad: [u8; 3],
}

/// A translated UDP port on one uplink address. Key of `MAPPING_PORTS`, whose value is the
/// [`MappingKey`] of the endpoint mapped there: with endpoint-independent filtering a port
/// serves one endpoint per uplink and protocol, and a packet from anywhere to it finds that
/// endpoint here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MappingPortKey {
    /// Network order, as in the packet.
    pub uplink_addr: u32,
    /// Network order.
    pub nat_port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

/// A port the gateway itself listens on, or the host's firewall forwards (DNAT), with its
/// protocol. Key of `RESERVED_PORTS`: such a port is never a translated port, so the replies of
/// LAN clients' flows can never be confused with packets for the gateway's own service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReservedPortKey {
    /// Network order.
    pub port: u16,
    /// `PROTOCOL_TCP` or `PROTOCOL_UDP`.
    pub protocol: u8,
    pub _pad: u8,
}

/// Value of `MAPPING_PORTS`: the endpoint mapped at a port, and when a flow of it last took
/// that mapping, so the port search can tell a live holder in one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappingPortEntry {
    pub endpoint: MappingKey,
    /// `MappingEntry::last_flow_ns` as written with it.
    pub last_flow_ns: u64,
}

const _: () = assert!(core::mem::size_of::<MappingPortEntry>() == 16);
const _: () = assert!(core::mem::size_of::<ReservedPortKey>() == 4);
const _: () = assert!(core::mem::size_of::<MappingKey>() == 8);
const _: () = assert!(core::mem::size_of::<MappingPortKey>() == 8);
const _: () = assert!(core::mem::size_of::<MappingEntry>() == 24);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<InboundKey>() == 8);
const _: () = assert!(core::mem::size_of::<InboundEntry>() == 16);
const _: () = assert!(core::mem::size_of::<FragmentKey>() == 12);
const _: () = assert!(core::mem::size_of::<FragmentEntry>() == 12);
const _: () = assert!(core::mem::size_of::<ReverseKey>() == 16);
const _: () = assert!(core::mem::size_of::<FlowEntry>() == 48);
const _: () = assert!(core::mem::offset_of!(FlowEntry, flags) % 8 == 0);
const _: () = assert!(core::mem::size_of::<ReverseEntry>() == 32);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ReverseKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ReverseEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragmentKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragmentEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InboundKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InboundEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MappingKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MappingEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MappingPortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ReservedPortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MappingPortEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_built_from_words_equal_keys_built_from_fields() {
        let (a, b, p, q) = (
            0x0a00_0005_u32.to_be(),
            0xcb00_710a_u32.to_be(),
            40_000_u16.to_be(),
            443_u16.to_be(),
        );
        assert_eq!(
            FlowKey::new(a, b, p, q, PROTOCOL_TCP),
            FlowKey {
                client_addr: a,
                remote_addr: b,
                client_port: p,
                remote_port: q,
                protocol: PROTOCOL_TCP,
                _pad: [0; 3],
            }
        );
        assert_eq!(
            ReverseKey::new(a, b, p, q, PROTOCOL_UDP),
            ReverseKey {
                uplink_addr: a,
                remote_addr: b,
                nat_port: p,
                remote_port: q,
                protocol: PROTOCOL_UDP,
                _pad: [0; 3],
            }
        );
    }
}
