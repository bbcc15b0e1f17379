//! Everything the balancer puts into the kernel carries these tags, and only objects carrying them
//! are ever changed or removed. Keeping them in one place is what makes `down`, adoption after a
//! restart and reconciliation safe on a gateway that also has an administrator's own rules.

use std::ops::RangeInclusive;

/// Route and rule protocol number (`proto 77` in `ip route` / `ip rule`). Unassigned in
/// /etc/iproute2/rt_protos, so an administrator's routes never carry it by accident.
pub const PROTOCOL: u8 = 77;

/// Routing tables the balancer owns. Uplink tables are `UPLINK_TABLE_BASE + id`.
pub const TABLE_RANGE: RangeInclusive<u32> = 2000..=2254;
pub const UPLINK_TABLE_BASE: u32 = 2000;
/// Table holding the route for the gateway's own unbound traffic (its resolver, updates).
pub const LOCAL_EGRESS_TABLE: u32 = 2000;

/// Rule priorities the balancer owns: all ahead of the main table's rule (32766).
pub const PRIORITY_BAND: RangeInclusive<u32> = 10000..=10999;
/// `to <LAN network> lookup main`, one per LAN network, ahead of everything else so that
/// traffic to the office never follows an uplink's table.
pub const PRIORITY_LAN: u32 = 10000;
/// `from <uplink source> lookup <uplink table>`, plus the uplink id.
pub const PRIORITY_FROM_SOURCE: u32 = 10300;
/// `fwmark <mark>/<mask> lookup <uplink table>`, plus the uplink id.
pub const PRIORITY_FWMARK: u32 = 10600;
/// `lookup main suppress_prefixlength 0`: the main table's specific routes still win for the
/// gateway's own unbound traffic; only its default route (if any) is overridden.
pub const PRIORITY_MAIN_SPECIFIC: u32 = 10900;
/// `lookup <LOCAL_EGRESS_TABLE>`: the gateway's own unbound traffic leaves by an uplink with
/// that uplink's source address.
pub const PRIORITY_LOCAL_EGRESS: u32 = 10910;

/// Uplink ids; the id decides the table, the rule priorities and the mark.
pub const UPLINK_ID_RANGE: RangeInclusive<u32> = 1..=254;
/// Most LAN networks a config may list (each gets one rule priority).
pub const MAX_LAN_NETWORKS: usize = 200;

/// The packet-mark bits the balancer owns; the rest of the mark stays free for other software.
pub const MARK_MASK: u32 = 0xff00_0000;
pub const MARK_SHIFT: u32 = 24;

/// The default mark of an uplink: its id in the owned bits.
pub const fn default_mark(id: u32) -> u32 {
    (id << MARK_SHIFT) & MARK_MASK
}

/// The default table of an uplink.
pub const fn default_table(id: u32) -> u32 {
    UPLINK_TABLE_BASE + id
}

/// Metric of the catch-all `unreachable default` that ends every uplink table, so a lookup never
/// falls through to another uplink's route when the real default route is gone.
pub const TERMINAL_METRIC: u32 = u32::MAX;

/// A route is the balancer's only when it carries its protocol and sits in one of its tables:
/// both tags must agree before anything is replaced or removed.
pub fn owns_route(protocol: u8, table: u32) -> bool {
    protocol == PROTOCOL && TABLE_RANGE.contains(&table)
}

/// A rule is the balancer's only when it carries its protocol and its priority is in the band.
pub fn owns_rule(protocol: u8, priority: u32) -> bool {
    protocol == PROTOCOL && PRIORITY_BAND.contains(&priority)
}
