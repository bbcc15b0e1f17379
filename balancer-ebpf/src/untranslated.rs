//! The last word on LAN packets the data plane does not translate: one headed for the internet
//! would leave with its private source (the ISP drops it, or worse, routes it), so it is
//! dropped and counted by reason, unless the config passes untranslated traffic (a LAN with
//! public addresses) or nothing configured the programs yet. Packets to the LAN, the gateway
//! and office destinations pass.

use aya_ebpf::maps::lpm_trie::Key;
use balancer_common::{
    stats::untranslated_drop,
    uplink::{DESTINATION_PASS, DESTINATION_UPLINK_ADDRESS},
};

use crate::maps::{DESTINATIONS, SETTINGS};

/// The reason to count for a LAN packet to `dst` (network order) that was not translated for
/// `reason`: `reason` itself when passing it is safe, else the matching drop.
#[inline(always)]
pub fn verdict(dst: u32, reason: u32) -> u32 {
    let Some(drop) = untranslated_drop(reason) else {
        return reason;
    };
    match DESTINATIONS.get(Key::new(32, dst)) {
        Some(&DESTINATION_PASS) => return reason,
        Some(&value) if value & DESTINATION_UPLINK_ADDRESS != 0 => return reason,
        _ => {}
    }
    if SETTINGS.get(0).is_some_and(|s| s.drop_untranslated == 1) {
        return drop;
    }
    reason
}
