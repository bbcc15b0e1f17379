//! Liveness from traffic: when each uplink last got an answer, from any source. An answered
//! probe is one; a reply of a translated flow or a packet of one of the gateway's own
//! connections is another (the data plane counts those as received minus unsolicited). A line
//! that answers is alive whatever its probes say: on a saturated line with a deep modem queue
//! the probes wait behind the traffic and time out, while the traffic itself keeps flowing.
//!
//! Also carries each uplink's smoothed probe RTT (late answers included), so the passive
//! detector gives a new flow as long to be answered as the line currently needs.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

#[derive(Debug, Default)]
struct Shared {
    last_answer: BTreeMap<u32, Instant>,
    /// Only answers of traffic (not probes): what counts for an uplink the passive signal
    /// condemned, whose probes answer although its traffic does not.
    last_traffic: BTreeMap<u32, Instant>,
    smoothed_rtt: BTreeMap<u32, Duration>,
}

/// Shared between the probe tasks (writers of probe answers and RTTs) and the daemon (writer
/// of traffic answers; reader for resets and passive detection). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Liveness {
    shared: Arc<Mutex<Shared>>,
}

impl Liveness {
    /// Uplink `id` answered at `at`.
    pub fn heard(&self, id: u32, at: Instant) {
        if let Ok(mut shared) = self.shared.lock() {
            let last = shared.last_answer.entry(id).or_insert(at);
            *last = (*last).max(at);
        }
    }

    /// Uplink `id`'s traffic (a flow's reply, a packet of the gateway's own connections)
    /// answered at `at`; also an answer.
    pub fn heard_traffic(&self, id: u32, at: Instant) {
        if let Ok(mut shared) = self.shared.lock() {
            let last = shared.last_traffic.entry(id).or_insert(at);
            *last = (*last).max(at);
        }
        self.heard(id, at);
    }

    /// When uplink `id`'s traffic last answered, if ever since the daemon started.
    pub fn last_traffic(&self, id: u32) -> Option<Instant> {
        self.shared
            .lock()
            .ok()
            .and_then(|shared| shared.last_traffic.get(&id).copied())
    }

    /// When uplink `id` last answered anything, if ever since the daemon started.
    pub fn last_answer(&self, id: u32) -> Option<Instant> {
        self.shared
            .lock()
            .ok()
            .and_then(|shared| shared.last_answer.get(&id).copied())
    }

    /// Whether uplink `id` answered anything after `since`.
    pub fn answered_since(&self, id: u32, since: Instant) -> bool {
        self.last_answer(id).is_some_and(|last| last > since)
    }

    pub fn set_rtt(&self, id: u32, rtt: Duration) {
        if let Ok(mut shared) = self.shared.lock() {
            shared.smoothed_rtt.insert(id, rtt);
        }
    }

    /// Every uplink's smoothed probe RTT, for those that have one.
    pub fn rtts(&self) -> BTreeMap<u32, Duration> {
        self.shared
            .lock()
            .map(|shared| shared.smoothed_rtt.clone())
            .unwrap_or_default()
    }
}

/// Turns the data plane's cumulative answer counters into "answered now" events.
#[derive(Debug, Default)]
pub struct TrafficWatch {
    previous: BTreeMap<u32, u64>,
}

impl TrafficWatch {
    /// `answers[id]`: packets received on the uplink that answered something, since attach.
    /// An uplink whose count grew since the last call answered at `now`. The first sample only
    /// sets the baseline: packets from before the daemon started prove nothing about now.
    pub fn observe(&mut self, now: Instant, answers: BTreeMap<u32, u64>, liveness: &Liveness) {
        for (id, count) in answers {
            if let Some(previous) = self.previous.insert(id, count)
                && count != previous
            {
                liveness.heard_traffic(id, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growing_counters_are_answers_and_the_first_sample_is_only_a_baseline() {
        let liveness = Liveness::default();
        let mut watch = TrafficWatch::default();
        let start = Instant::now();
        watch.observe(start, BTreeMap::from([(1, 100), (2, 5)]), &liveness);
        assert_eq!(liveness.last_answer(1), None, "baseline only");
        let later = start + Duration::from_millis(100);
        watch.observe(later, BTreeMap::from([(1, 130), (2, 5)]), &liveness);
        assert_eq!(liveness.last_answer(1), Some(later));
        assert_eq!(liveness.last_traffic(1), Some(later));
        assert_eq!(liveness.last_answer(2), None, "no new answers on uplink 2");
        assert!(liveness.answered_since(1, start));
        assert!(!liveness.answered_since(1, later));
        // An earlier answer reported late (a probe) never moves the time back; a probe's
        // answer is no traffic.
        liveness.heard(1, start);
        assert_eq!(liveness.last_answer(1), Some(later));
        liveness.heard(2, later);
        assert_eq!(liveness.last_traffic(2), None);
    }
}
