//! When an uplink's connections are given up: the one decision that both the data plane (it
//! resets the LAN clients' TCP connections and releases the uplink's flows) and the forward
//! proxy (it closes the tunnels and kept upstream connections on that uplink) act on, so the
//! two never disagree about whether a line is dead.
//!
//! Leaving the rotation gives up nothing by itself: a carrier blip or a probe verdict on a line
//! that comes back must cost no connection. An uplink's connections go only once it has been
//! out of the rotation for the reset delay with nothing answered on it: the first answered
//! probe, reply of a flow or packet of the gateway's own connections stops that clock. Once
//! per outage; never while no uplink is usable (then the uplinks with carrier keep carrying
//! what they can, and giving up would only make things worse).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use super::Liveness;

/// Per uplink: since when it is out of the rotation, whether this outage was already acted on,
/// and how many outages were (the proxy closes connections when that count moves).
#[derive(Debug, Default)]
pub struct ReleaseClock {
    out_since: BTreeMap<u32, Instant>,
    released: BTreeSet<u32>,
    releases: BTreeMap<u32, u64>,
    any_usable: bool,
}

impl ReleaseClock {
    /// Notes which uplinks take new flows now (`(id, usable)` from the uplink model). An
    /// uplink no longer listed (removed by a reload) is forgotten.
    pub fn track(&mut self, usable: &[(u32, bool)], now: Instant) {
        self.any_usable = usable.iter().any(|(_, usable)| *usable);
        self.out_since
            .retain(|id, _| usable.iter().any(|(listed, _)| listed == id));
        for (id, usable) in usable {
            if *usable {
                self.out_since.remove(id);
                self.released.remove(id);
            } else {
                self.out_since.entry(*id).or_insert(now);
            }
        }
    }

    /// The uplinks whose connections are given up now. For an uplink the passive signal
    /// condemned (`passive`), only traffic counts as an answer: its probes answer by definition.
    pub fn due(
        &mut self,
        now: Instant,
        after: Duration,
        liveness: &Liveness,
        passive: &BTreeSet<u32>,
    ) -> Vec<u32> {
        if !self.any_usable {
            return Vec::new();
        }
        let due: Vec<u32> = self
            .out_since
            .iter()
            .filter(|(id, since)| {
                let last_answer = if passive.contains(id) {
                    liveness.last_traffic(**id)
                } else {
                    liveness.last_answer(**id)
                };
                !self.released.contains(id) && silent_past(**since, last_answer, after, now)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &due {
            self.released.insert(*id);
            *self.releases.entry(*id).or_default() += 1;
        }
        due
    }

    /// How many outages of each uplink were acted on since the daemon started.
    pub fn releases(&self) -> &BTreeMap<u32, u64> {
        &self.releases
    }
}

/// Whether an uplink that left the rotation at `out_since` and last answered at `last_answer`
/// has been silent for `after` at `now`: the clock starts when it left the rotation and
/// restarts at every answer (probe, reply, own connection), so a line that answers is never
/// released, and one that left and came back starts afresh when it leaves again.
fn silent_past(
    out_since: Instant,
    last_answer: Option<Instant>,
    after: Duration,
    now: Instant,
) -> bool {
    let silent_since = last_answer.map_or(out_since, |answered| answered.max(out_since));
    now.saturating_duration_since(silent_since) >= after
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reset_clock_starts_at_the_outage_and_restarts_at_every_answer() {
        let after = Duration::from_millis(1000);
        let out = Instant::now();
        let at = |ms: u64| out + Duration::from_millis(ms);
        assert!(!silent_past(out, None, after, at(999)));
        assert!(
            silent_past(out, None, after, at(1000)),
            "silent for the delay"
        );
        assert!(
            silent_past(out, Some(out - Duration::from_secs(5)), after, at(1000)),
            "an answer from before the outage stops nothing"
        );
        assert!(
            !silent_past(out, Some(at(600)), after, at(1500)),
            "an answer during the delay restarts the clock"
        );
        assert!(silent_past(out, Some(at(600)), after, at(1600)));
    }

    #[test]
    fn an_outage_is_acted_on_once_and_never_while_no_uplink_is_usable() {
        let after = Duration::from_millis(1000);
        let liveness = Liveness::default();
        let none = BTreeSet::new();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut clock = ReleaseClock::default();
        clock.track(&[(1, false), (2, true)], t0);
        assert!(clock.due(at(999), after, &liveness, &none).is_empty());
        assert_eq!(clock.due(at(1000), after, &liveness, &none), [1]);
        assert!(
            clock.due(at(5000), after, &liveness, &none).is_empty(),
            "once per outage"
        );
        assert_eq!(clock.releases().get(&1), Some(&1));
        // Back, then out again: a new outage, a new count.
        clock.track(&[(1, true), (2, true)], at(6000));
        clock.track(&[(1, false), (2, true)], at(7000));
        assert_eq!(clock.due(at(8000), after, &liveness, &none), [1]);
        assert_eq!(clock.releases().get(&1), Some(&2));
        // A blip shorter than the delay: nothing.
        clock.track(&[(2, false), (1, true)], at(9000));
        clock.track(&[(2, true), (1, true)], at(9300));
        assert!(clock.due(at(11_000), after, &liveness, &none).is_empty());
        // Every uplink out: the ones with carrier keep what they carry.
        let mut alone = ReleaseClock::default();
        alone.track(&[(3, false)], t0);
        assert!(alone.due(at(5000), after, &liveness, &none).is_empty());
    }

    #[test]
    fn an_answer_during_the_outage_holds_the_release_and_passive_needs_traffic() {
        let after = Duration::from_millis(1000);
        let liveness = Liveness::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut clock = ReleaseClock::default();
        clock.track(&[(1, false), (2, true)], t0);
        liveness.heard(1, at(800));
        assert!(
            clock
                .due(at(1500), after, &liveness, &BTreeSet::new())
                .is_empty(),
            "a probe answered 800 ms in"
        );
        let condemned = BTreeSet::from([1]);
        assert_eq!(
            clock.due(at(1500), after, &liveness, &condemned),
            [1],
            "for a passive verdict a probe answer is no answer"
        );
    }
}
