//! The flow table: finding a live flow, creating one as a forward/reverse pair (after
//! Cilium's `bpf/lib/nat.h`: the reverse entry reserves the translated port, the forward entry
//! publishes the flow, and a failed second insert removes the first, so no half flow remains),
//! and promoting it on its first answer. Unsolicited flows (endpoint-independent filtering)
//! are created by a remote's packet and promoted only by the client's answer.
//!
//! Two tables of pairs: a new flow goes into the pending pair (`PENDING_FLOWS`,
//! `PENDING_REVERSE`, LRU maps), and its first answer moves it into the main pair (`FLOWS`,
//! `NAT_REVERSE`, plain hashes that never evict). A flood of unanswered flows therefore only
//! ever evicts unanswered flows, and an established flow's packets find it with the same one
//! lookup as before. A translated port is free only when neither reverse map holds it.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32};
use balancer_common::{
    counters::{COUNTER_HALVES_REMOVED, COUNTER_PORT_TAKEOVERS, COUNTER_PROMOTIONS_REFUSED},
    flow::{
        FLOW_FLAG_FORCED, FLOW_FLAG_UNSOLICITED, FLOW_STATE_NEW, FlowEntry, FlowKey, MappingKey,
        PROTOCOL_HAIRPIN_BIT, PROTOCOL_TCP, REVERSE_FLAG_ANSWERED, REVERSE_FLAG_UNSOLICITED,
        ReservedPortKey, ReverseEntry, ReverseKey, WSCALE_NONE,
    },
    policy::{flow_expired, flow_expired_with_replies, flow_over, nat_port_range},
    stats::{
        DROP_NAT_EXHAUSTED, PASS_NO_UPLINK, UPLINK_NAT_EXHAUSTED, UPLINK_NEW_FLOWS,
        UPLINK_TCP_NEW_FLOWS,
    },
    uplink::{Settings, UplinkInfo},
};

use crate::{
    mapping,
    maps::{
        FLOWS, NAT_REVERSE, PENDING_FLOWS, PENDING_REVERSE, RESERVED_PORTS, UPLINKS, bump,
        bump_uplink,
    },
};

/// Translated ports tried per new flow before giving up: bounded for the verifier and for
/// latency; 32 random ports all taken means the range is nearly full anyway.
const PORT_PROBES: u32 = 32;
/// Probes that look for a free port only. After them the range is crowded, and later probes
/// may also take the port of a TCP flow that is over (see `release_if_over`).
const FREE_PORT_PROBES: u32 = 8;
/// How long a TCP flow that is over must have been quiet before its port can be taken: the
/// last ACK of the close takes a round trip, and a FIN whose ACK was lost comes again after
/// the sender's retransmission timeout (at least 200 ms on Linux).
const CLOSED_PORT_GRACE_NS: u64 = 500_000_000;
/// How old a pending reverse entry without its flow must be before its port is taken: younger
/// than this, its flow may be being created on another CPU right now (reverse half first).
const ALONE_HALF_GRACE_NS: u64 = 500_000_000;

/// Flow `key`, answered (`FLOWS`) or not yet (`PENDING_FLOWS`).
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<*mut FlowEntry> {
    match FLOWS.get_ptr_mut(key) {
        Some(entry) => Some(entry),
        None => PENDING_FLOWS.get_ptr_mut(key),
    }
}

/// Reverse entry `reverse`, of an answered flow or a pending one.
#[inline(always)]
pub fn lookup_reverse(reverse: &ReverseKey) -> Option<*mut ReverseEntry> {
    match NAT_REVERSE.get_ptr_mut(reverse) {
        Some(value) => Some(value),
        None => PENDING_REVERSE.get_ptr_mut(reverse),
    }
}

/// Whether `reverse` exists and belongs to flow `key`.
#[inline(always)]
fn owns(reverse: &ReverseKey, key: &FlowKey) -> bool {
    // SAFETY: a successful lookup returns a pointer to the value; read at once.
    lookup_reverse(reverse).is_some_and(|value| unsafe { (*value).flow } == *key)
}

/// What `FLOWS` holds for a key.
pub enum Found {
    /// A flow to keep using: its uplink is unchanged and usable and it has not idled out.
    Live(*mut FlowEntry),
    /// An entry to replace; its reverse key must go first so its port is released.
    Stale(ReverseKey),
    Missing,
}

/// The reverse key of `entry` (flow `key`): the reply's view of the flow.
#[inline(always)]
pub fn reverse_key(key: &FlowKey, uplink_addr: u32, nat_port: u16) -> ReverseKey {
    ReverseKey::new(
        uplink_addr,
        key.remote_addr,
        nat_port,
        key.remote_port,
        key.protocol,
    )
}

/// Looks `key` up and decides whether the flow is still good. A flow is released lazily when
/// its uplink's generation moved on (user space released the uplink's flows: silent past the
/// reset delay, or a new address) or when it idled out. An uplink merely out of the rotation
/// keeps its flows: a blip must cost nothing, and a line back before the reset delay finds
/// its connections working.
#[inline(always)]
pub fn find(key: &FlowKey, settings: &Settings, now_ns: u64) -> Found {
    // Answered flows first: that is where an established flow's packets look, once.
    let (entry, pending) = match FLOWS.get_ptr_mut(key) {
        Some(entry) => (entry, false),
        None => match PENDING_FLOWS.get_ptr_mut(key) {
            Some(entry) => (entry, true),
            None => return Found::Missing,
        },
    };
    // SAFETY: a successful lookup returns a pointer to the value, valid for this program run.
    let e = unsafe { &*entry };
    let reverse = reverse_key(key, e.uplink_addr, e.nat_port);
    let mut live = match UPLINKS.get(u32::from(e.uplink_id)) {
        Some(uplink) => {
            uplink.source_addr != 0
                && uplink.generation == e.uplink_generation
                && (!flow_expired(e, key.protocol, settings, now_ns)
                    || replies_keep_alive(key, e, settings, now_ns))
        }
        None => false,
    };
    // A pending flow whose reverse half the LRU evicted would never see its replies: it is
    // replaced, which removes it.
    if live && pending {
        if !owns(&reverse, key) {
            bump(COUNTER_HALVES_REMOVED, 1);
            live = false;
        } else if e.flags & FLOW_FLAG_UNSOLICITED != 0 && promote(&reverse, true).is_some() {
            // The client answers a flow a remote started (endpoint-independent filtering): it
            // is answered now, and moves to the main pair like any other.
            if let Some(promoted) = FLOWS.get_ptr_mut(key) {
                return Found::Live(promoted);
            }
        }
    }
    if live {
        Found::Live(entry)
    } else {
        Found::Stale(reverse)
    }
}

/// Whether replies translated without touching `FLOWS` (`ReverseEntry::last_reply_ns`) keep a
/// flow alive that its own last packet would let expire: a remote still sending to a silent
/// client. Asked only on that rare path, so ordinary packets pay no second lookup.
#[inline(always)]
fn replies_keep_alive(key: &FlowKey, entry: &FlowEntry, settings: &Settings, now_ns: u64) -> bool {
    let reverse = reverse_key(key, entry.uplink_addr, entry.nat_port);
    match NAT_REVERSE.get_ptr(&reverse) {
        Some(value) => {
            // SAFETY: a successful lookup returns a pointer to the value; copied out at once.
            let value = unsafe { *value };
            value.flow == *key
                && !flow_expired_with_replies(
                    entry,
                    value.last_reply_ns,
                    key.protocol,
                    settings,
                    now_ns,
                )
        }
        None => false,
    }
}

/// What a new TCP flow records from the client's SYN (all zero but the scale for other
/// protocols): the next sequence number, the window and its scale.
pub struct ClientSyn {
    pub seq_next: u32,
    pub window: u16,
    pub wscale: u8,
}

/// Creates flow `key` on uplink `id`, replacing `stale` if given, and returns the mark and
/// translated port (network order) of the flow that ended up in the table (another CPU may
/// have created the same flow first). `preferred_port` (network order: the endpoint's
/// mapping) is tried first, else the client's own port. With `exclusive` (endpoint-independent
/// filtering) a port another endpoint's live mapping holds is not free.
/// `Err(DROP_NAT_EXHAUSTED)` when no translated port is free.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn create(
    key: &FlowKey,
    id: u32,
    uplink: &UplinkInfo,
    forced: bool,
    stale: Option<ReverseKey>,
    preferred_port: Option<u16>,
    exclusive: Option<&MappingKey>,
    syn: ClientSyn,
    settings: &Settings,
    now_ns: u64,
) -> Result<(u32, u16), u32> {
    if let Some(old) = &stale {
        // Releases the old port; if the old entry's uplink and port are the same, the search
        // below finds that port free again and the remote sees the same peer.
        release(key, old);
    }

    let (min, max) = nat_port_range(settings);
    let span = u32::from(max - min) + 1;
    let first = u32::from(u16::from_be(preferred_port.unwrap_or(key.client_port)));
    // The mapping's port, else the client's when it is in range (no visible translation, as
    // RFC 4787 prefers); otherwise start at a random point so concurrent flows do not all
    // probe the same ports.
    let mut offset = if first >= u32::from(min) && first <= u32::from(max) {
        first - u32::from(min)
    } else {
        // SAFETY: a plain helper call without arguments.
        let random = unsafe { bpf_get_prandom_u32() };
        random % span
    };
    let mut reverse = reverse_key(key, uplink.source_addr, 0);
    let reverse_entry = ReverseEntry {
        flow: *key,
        // No reply yet: the creation time, which tells a half being created from one left
        // alone (`release_if_alone`). Promotion overwrites it with the first reply's time.
        last_reply_ns: now_ns,
        mark: uplink.mark,
        uplink_id: id as u8,
        flags: 0,
        _pad: [0; 2],
    };
    let mut reserved = false;
    for probe in 0..PORT_PROBES {
        reverse.nat_port = ((u32::from(min) + offset) as u16).to_be();
        // A lookup first: far cheaper than an insert that fails (an LRU insert takes a node
        // off the free list before it finds the key taken), which is every probe in a crowded
        // range. The insert still decides a race with another CPU.
        let free = match NAT_REVERSE.get_ptr(&reverse) {
            // SAFETY: a successful lookup returns a pointer to the value; copied out at once.
            Some(owner) => {
                probe >= FREE_PORT_PROBES
                    && release_if_over(&reverse, unsafe { (*owner).flow }, now_ns)
            }
            None => match PENDING_REVERSE.get_ptr(&reverse) {
                None => true,
                Some(owner) => {
                    // SAFETY: as above.
                    let owner = unsafe { *owner };
                    release_if_alone(&reverse, owner, now_ns)
                        || (probe >= FREE_PORT_PROBES
                            && release_if_over(&reverse, owner.flow, now_ns))
                }
            },
        };
        let free = free
            && !is_reserved(key.protocol, reverse.nat_port)
            && exclusive.is_none_or(|endpoint| {
                mapping::port_free_for(
                    endpoint,
                    reverse.uplink_addr,
                    reverse.nat_port,
                    settings,
                    now_ns,
                )
            });
        if free
            && PENDING_REVERSE
                .insert(&reverse, &reverse_entry, u64::from(BPF_NOEXIST))
                .is_ok()
        {
            reserved = true;
            break;
        }
        // Random rather than the next port: taken ports do not cluster, so a crowded range
        // costs a few probes, not a walk along a run of taken ones.
        // SAFETY: a plain helper call without arguments.
        offset = unsafe { bpf_get_prandom_u32() } % span;
    }
    if !reserved {
        bump_uplink(id, UPLINK_NAT_EXHAUSTED, 1);
        return Err(DROP_NAT_EXHAUSTED);
    }

    let entry = FlowEntry {
        created_ns: now_ns,
        last_seen_ns: now_ns,
        uplink_addr: uplink.source_addr,
        mark: uplink.mark,
        uplink_generation: uplink.generation,
        client_seq_next: syn.seq_next,
        remote_seq_next: 0,
        nat_port: reverse.nat_port,
        uplink_id: id as u8,
        state: FLOW_STATE_NEW,
        flags: if forced { FLOW_FLAG_FORCED } else { 0 },
        client_wscale: syn.wscale,
        remote_wscale: WSCALE_NONE,
        _pad: 0,
        client_window: syn.window,
        remote_window: 0,
    };
    if PENDING_FLOWS
        .insert(key, &entry, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Another CPU created this flow between our lookup and now: its pair stands, ours goes.
        let _ = PENDING_REVERSE.remove(&reverse);
        return match lookup(key) {
            // SAFETY: a successful lookup returns a pointer to the value.
            Some(winner) => Ok(unsafe { ((*winner).mark, (*winner).nat_port) }),
            // The insert failed for another reason (out of memory): no flow, so the packet
            // follows the routing tables unmarked, like one sent while no uplink is up.
            None => Err(PASS_NO_UPLINK),
        };
    }
    bump_uplink(id, UPLINK_NEW_FLOWS, 1);
    if key.protocol == PROTOCOL_TCP {
        bump_uplink(id, UPLINK_TCP_NEW_FLOWS, 1);
    }
    Ok((entry.mark, entry.nat_port))
}

/// Whether `port` (network order) is one the gateway listens on or forwards for `protocol`
/// (a hairpin flow's protocol counts as UDP): never a translated port.
#[inline(always)]
pub fn is_reserved(protocol: u8, port: u16) -> bool {
    let key = ReservedPortKey {
        port,
        protocol: protocol & !PROTOCOL_HAIRPIN_BIT,
        _pad: 0,
    };
    // SAFETY: the value is a plain u8 and only its presence is used.
    unsafe { RESERVED_PORTS.get(&key) }.is_some()
}

/// Creates flow `key` on uplink `id` with the translated port `reverse` names, in the pending
/// pair, without a port search: for a remote's packet to a LAN endpoint's mapping
/// (endpoint-independent filtering: `unsolicited`, the mapping holds the port already) and for
/// a hairpinned sender (its mapping's port). Returns the reverse entry; `None` when the client
/// has a flow with that key already, the port is taken, or the insert lost a race.
#[inline(always)]
pub fn create_at(
    key: &FlowKey,
    reverse: &ReverseKey,
    id: u32,
    uplink: &UplinkInfo,
    unsolicited: bool,
    now_ns: u64,
) -> Option<*mut ReverseEntry> {
    if lookup(key).is_some() || NAT_REVERSE.get_ptr(reverse).is_some() {
        return None;
    }
    let reverse_entry = ReverseEntry {
        flow: *key,
        last_reply_ns: now_ns,
        mark: uplink.mark,
        uplink_id: id as u8,
        flags: if unsolicited {
            REVERSE_FLAG_UNSOLICITED
        } else {
            0
        },
        _pad: [0; 2],
    };
    PENDING_REVERSE
        .insert(reverse, &reverse_entry, u64::from(BPF_NOEXIST))
        .ok()?;
    let entry = FlowEntry {
        created_ns: now_ns,
        last_seen_ns: now_ns,
        uplink_addr: uplink.source_addr,
        mark: uplink.mark,
        uplink_generation: uplink.generation,
        client_seq_next: 0,
        remote_seq_next: 0,
        nat_port: reverse.nat_port,
        uplink_id: id as u8,
        state: FLOW_STATE_NEW,
        flags: if unsolicited {
            FLOW_FLAG_UNSOLICITED
        } else {
            0
        },
        client_wscale: WSCALE_NONE,
        remote_wscale: WSCALE_NONE,
        _pad: 0,
        client_window: 0,
        remote_window: 0,
    };
    if PENDING_FLOWS
        .insert(key, &entry, u64::from(BPF_NOEXIST))
        .is_err()
    {
        let _ = PENDING_REVERSE.remove(reverse);
        return None;
    }
    bump_uplink(id, UPLINK_NEW_FLOWS, 1);
    PENDING_REVERSE.get_ptr_mut(reverse)
}

/// Removes flow `key`, found stale with reverse key `reverse`, before it is created anew.
#[inline(always)]
pub fn release_stale(key: &FlowKey, reverse: &ReverseKey) {
    release(key, reverse);
}

/// Frees the translated port `reverse` holds for flow `owner` if that is a TCP flow that is over (reset,
/// or closed by both ends) and quiet for `CLOSED_PORT_GRACE_NS`; returns whether the port may
/// be tried again. Such a flow would otherwise keep its port for the whole closing timeout
/// (60 s), which caps sustained new connections to one server at about 75 per second per
/// uplink. Both halves go: a late packet of the old connection then finds no flow and is not
/// translated onto the new one. The remote may still hold the old connection in TIME_WAIT;
/// Linux accepts a new SYN there when its sequence number or timestamp is newer, and
/// otherwise the client's SYN retransmission gets through, which still beats a dropped SYN.
#[inline(always)]
fn release_if_over(reverse: &ReverseKey, owner: FlowKey, now_ns: u64) -> bool {
    if reverse.protocol != PROTOCOL_TCP {
        return false;
    }
    // No flow: being created by another CPU right now, or an orphan the sweeper removes.
    let Some(entry) = lookup(&owner) else {
        return false;
    };
    // SAFETY: as above.
    let entry = unsafe { *entry };
    if !flow_over(entry.flags)
        || entry.nat_port != reverse.nat_port
        || entry.uplink_addr != reverse.uplink_addr
        || now_ns.saturating_sub(entry.last_seen_ns) < CLOSED_PORT_GRACE_NS
    {
        return false;
    }
    release(&owner, reverse);
    bump(COUNTER_PORT_TAKEOVERS, 1);
    true
}

/// Frees the port pending reverse entry `reverse` (value `owner`) holds if its flow is gone
/// (evicted from the LRU) or uses another translation now, and the entry is old enough not to
/// be a flow being created on another CPU. Returns whether the port may be tried again.
#[inline(always)]
fn release_if_alone(reverse: &ReverseKey, owner: ReverseEntry, now_ns: u64) -> bool {
    if let Some(entry) = lookup(&owner.flow) {
        // SAFETY: a successful lookup returns a pointer to the value; read at once.
        let (nat_port, uplink_addr) = unsafe { ((*entry).nat_port, (*entry).uplink_addr) };
        if nat_port == reverse.nat_port && uplink_addr == reverse.uplink_addr {
            return false;
        }
    }
    if now_ns.saturating_sub(owner.last_reply_ns) < ALONE_HALF_GRACE_NS {
        return false;
    }
    let _ = PENDING_REVERSE.remove(reverse);
    bump(COUNTER_HALVES_REMOVED, 1);
    bump(COUNTER_PORT_TAKEOVERS, 1);
    true
}

/// Removes both halves of flow `key`, whose replies carry `reverse`, from whichever table
/// holds them; the reverse half only while it still belongs to this flow.
#[inline(always)]
fn release(key: &FlowKey, reverse: &ReverseKey) {
    let _ = FLOWS.remove(key);
    let _ = PENDING_FLOWS.remove(key);
    // SAFETY: successful lookups return pointers to the values; read at once.
    if NAT_REVERSE
        .get_ptr(reverse)
        .is_some_and(|value| unsafe { (*value).flow } == *key)
    {
        let _ = NAT_REVERSE.remove(reverse);
    }
    // SAFETY: as above.
    if PENDING_REVERSE
        .get_ptr(reverse)
        .is_some_and(|value| unsafe { (*value).flow } == *key)
    {
        let _ = PENDING_REVERSE.remove(reverse);
    }
}

/// Moves the pending flow whose reply carries `reverse` into the main table on its first
/// answer, and returns its reverse entry there (or in the pending table, where it stays when
/// the main table is full). `None` when no flow owns `reverse`; a pending reverse entry left
/// alone by the LRU is removed then. An unsolicited flow is answered by its client
/// (`by_client`), never by more packets from its remote: those leave it pending.
///
/// Order keeps every port held by one map at every moment: the main reverse entry is inserted
/// first (`BPF_NOEXIST`: another CPU promoting the same flow wins or loses here), then the
/// main flow entry, and only then the pending pair goes.
#[inline(always)]
pub fn promote(reverse: &ReverseKey, by_client: bool) -> Option<*mut ReverseEntry> {
    let pending = PENDING_REVERSE.get_ptr_mut(reverse)?;
    // SAFETY: a successful lookup returns a pointer to the value; copied out at once.
    let mut value = unsafe { *pending };
    let Some(entry) = PENDING_FLOWS.get_ptr(&value.flow) else {
        // Maybe promoted by another CPU a moment ago.
        if let Some(promoted) = NAT_REVERSE.get_ptr_mut(reverse) {
            return Some(promoted);
        }
        let _ = PENDING_REVERSE.remove(reverse);
        bump(COUNTER_HALVES_REMOVED, 1);
        return None;
    };
    // SAFETY: as above.
    let mut entry = unsafe { *entry };
    if entry.nat_port != reverse.nat_port || entry.uplink_addr != reverse.uplink_addr {
        // A half left behind by a replaced flow.
        let _ = PENDING_REVERSE.remove(reverse);
        bump(COUNTER_HALVES_REMOVED, 1);
        return None;
    }
    if value.flags & REVERSE_FLAG_UNSOLICITED != 0 {
        if !by_client {
            return Some(pending);
        }
        // Answered from now on: the remote's next packet records the answer in `FLOWS`.
        value.flags = 0;
        entry.flags &= !FLOW_FLAG_UNSOLICITED;
    }
    // Refused once (main table full): it stays pending rather than retrying on every reply.
    if value.flags & REVERSE_FLAG_ANSWERED != 0 {
        return Some(pending);
    }
    if NAT_REVERSE
        .insert(reverse, &value, u64::from(BPF_NOEXIST))
        .is_err()
    {
        if let Some(promoted) = NAT_REVERSE.get_ptr_mut(reverse) {
            return Some(promoted);
        }
        bump(COUNTER_PROMOTIONS_REFUSED, 1);
        return Some(pending);
    }
    if FLOWS
        .insert(&value.flow, &entry, u64::from(BPF_NOEXIST))
        .is_err()
    {
        let _ = NAT_REVERSE.remove(reverse);
        bump(COUNTER_PROMOTIONS_REFUSED, 1);
        return Some(pending);
    }
    let _ = PENDING_FLOWS.remove(&value.flow);
    let _ = PENDING_REVERSE.remove(reverse);
    NAT_REVERSE.get_ptr_mut(reverse)
}
