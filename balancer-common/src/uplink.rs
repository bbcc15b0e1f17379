//! What the programs know about each uplink and about destinations, written by user space.

/// Uplink ids run from 1 to 254 (`balancer::ownership::UPLINK_ID_RANGE`); `UPLINKS` is indexed
/// by id, so it has one slot more than the largest id. Slot 0 is never used.
pub const UPLINK_SLOTS: u32 = 256;

/// Capacity of `UPLINK_BY_IFINDEX` (key: ifindex, value: uplink id), one per possible id.
pub const UPLINK_BY_IFINDEX_ENTRIES: u32 = 256;

/// One uplink. Value of the `UPLINKS` array, indexed by uplink id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UplinkInfo {
    /// The address flows are translated to, network order. Zero: the slot is unused.
    pub source_addr: u32,
    /// The mark the routing rules send to this uplink's table.
    pub mark: u32,
    /// Bumped whenever the uplink is disabled, so flows pinned to it are released lazily.
    pub generation: u32,
    /// The uplink's interface, for the programs attached to it.
    pub ifindex: u32,
    /// 1 when the uplink takes new flows.
    pub enabled: u8,
    pub _pad: u8,
    /// Largest TCP MSS a SYN leaving by this uplink may announce (host order): the interface
    /// MTU minus 40. SYNs announcing more are clamped at uplink egress; 0 turns clamping off.
    pub mss_max: u16,
}

/// The bits of `skb->mark` the balancer owns: LAN ingress replaces them with the flow's uplink
/// mark and keeps the rest, and the routing rules match `fwmark <mark>/0xff000000`. Uplink marks
/// must lie inside this mask (user space uses `id << 24`).
pub const MARK_MASK: u32 = 0xff00_0000;

/// Most slots in the weighted round-robin schedule. User space fills `SCHEDULE[0..length]` with
/// uplink ids in smooth weighted round-robin order (weights reduced, scaled to fit).
pub const SCHEDULE_SLOTS: u32 = 1024;

/// `SCHEDULE_LENGTH[0]`: how many slots of `SCHEDULE` are in use; 0 means no uplink is enabled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScheduleLength {
    pub length: u32,
}

/// Value of the `DESTINATIONS` longest-prefix-match trie (key: prefix length and IPv4 address,
/// network order): what LAN ingress does with packets to that destination.
pub const DESTINATION_PASS: u32 = 0;
// Values 1..=254 mean "send by this uplink id" (a modem's own subnet).
/// `DESTINATION_UPLINK_ADDRESS | id`: uplink `id`'s own address. Passed like
/// `DESTINATION_PASS`, except that a packet to a LAN endpoint's mapping there is hairpinned.
pub const DESTINATION_UPLINK_ADDRESS: u32 = 0x100;

/// The LPM trie's capacity: LAN networks, gateway addresses and uplink subnets.
pub const DESTINATION_ENTRIES: u32 = 1024;

/// Runtime settings. Value of `SETTINGS[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Translated source ports come from `nat_port_min..=nat_port_max` (host order), a range
    /// outside the gateway's `ip_local_port_range` so its own sockets are never shadowed.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// The gateway's `ip_local_port_range` (host order): UDP arriving on an uplink at one of
    /// these ports is a reply to the gateway's own socket, not an inbound connection.
    pub local_port_min: u16,
    pub local_port_max: u16,
    /// Timeouts in nanoseconds.
    pub tcp_syn_timeout_ns: u64,
    pub tcp_established_timeout_ns: u64,
    pub tcp_closing_timeout_ns: u64,
    pub udp_timeout_ns: u64,
    pub icmp_timeout_ns: u64,
    /// 1 (what the daemon writes by default): LAN traffic the data plane cannot translate,
    /// headed for the internet, is dropped and counted. 0: it is passed untouched (a LAN with
    /// public addresses; also programs attached before anything configured them).
    pub drop_untranslated: u8,
    /// `FILTERING_*`: which unsolicited packets to a LAN endpoint's translated port reach it.
    pub filtering: u8,
    pub _pad: [u8; 6],
}

/// `Settings::filtering`: a packet from the internet reaches a LAN endpoint only from an
/// address and port the endpoint sent to (RFC 4787 REQ-8's default, "port restricted cone").
pub const FILTERING_ADDRESS_AND_PORT_DEPENDENT: u8 = 0;
/// `Settings::filtering`: any remote may send UDP to a LAN endpoint's live mapping ("full
/// cone"); such a packet creates an unsolicited flow, pending until the endpoint answers.
pub const FILTERING_ENDPOINT_INDEPENDENT: u8 = 1;

const _: () = assert!(core::mem::size_of::<UplinkInfo>() == 20);
const _: () = assert!(core::mem::size_of::<Settings>() == 56);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::UplinkInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ScheduleLength {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Settings {}
}
