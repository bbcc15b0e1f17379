//! Passive detection: a line that passes pings but not traffic. The data plane counts, per
//! uplink, new TCP flows and those that got any answer (SYN-ACK or RST). When most new flows on
//! one uplink go unanswered while another uplink answers most of its own (with a minimum sample
//! on both, so one dead server cannot condemn a line), that uplink is condemned, even though its
//! probe targets answer. It rejoins only after a TCP connect through it succeeds.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::{Duration, Instant},
};

/// New flows are counted over this window, ending `ANSWER_LAG` ago...
const WINDOW: Duration = Duration::from_millis(1500);
/// ...which gives each SYN that long to be answered.
const ANSWER_LAG: Duration = Duration::from_millis(400);
/// Fewer new flows than this in the window say nothing.
const MIN_SAMPLE: u64 = 4;
/// Share of unanswered new flows that condemns an uplink...
const CONDEMN_RATIO: f64 = 0.75;
/// ...when at least one other uplink stays at or below this share.
const HEALTHY_RATIO: f64 = 0.25;

/// Cumulative counters of one uplink: new TCP flows, and answered ones.
pub type TcpCounters = BTreeMap<u32, (u64, u64)>;

#[derive(Debug, Default)]
pub struct PassiveDetector {
    samples: VecDeque<(Instant, TcpCounters)>,
    condemned: BTreeSet<u32>,
}

impl PassiveDetector {
    pub fn condemned(&self) -> &BTreeSet<u32> {
        &self.condemned
    }

    /// A TCP connect through the uplink succeeded: it carries traffic again.
    pub fn acquit(&mut self, id: u32) -> bool {
        self.condemned.remove(&id)
    }

    /// Takes a new sample of the counters; returns the uplinks newly condemned, with why.
    pub fn observe(&mut self, now: Instant, counters: TcpCounters) -> Vec<(u32, String)> {
        self.samples.push_back((now, counters));
        while self.samples.len() > 2 && now.duration_since(self.samples[1].0) > WINDOW + ANSWER_LAG
        {
            self.samples.pop_front();
        }
        // A daemon that just started judges on the history it has: the minimum sample, not a
        // full window, is what guards against a verdict on too little evidence.
        let Some((_, first)) = self.samples.front() else {
            return Vec::new();
        };
        let Some(cutoff) = now.checked_sub(ANSWER_LAG) else {
            return Vec::new();
        };
        let Some((_, at_cutoff)) = self.samples.iter().rev().find(|(time, _)| *time <= cutoff)
        else {
            return Vec::new();
        };
        let latest = &self
            .samples
            .back()
            .map(|(_, c)| c.clone())
            .unwrap_or_default();
        let ratios: BTreeMap<u32, (u64, f64)> = at_cutoff
            .iter()
            .filter_map(|(id, (new_then, _))| {
                let (new_before, answered_before) = first.get(id).copied().unwrap_or((0, 0));
                let new = new_then.saturating_sub(new_before);
                let answered = latest
                    .get(id)
                    .map_or(0, |(_, a)| *a)
                    .saturating_sub(answered_before)
                    .min(new);
                (new >= MIN_SAMPLE).then(|| (*id, (new, 1.0 - answered as f64 / new as f64)))
            })
            .collect();
        let others_fine = |id: u32| {
            ratios
                .iter()
                .any(|(other, (_, ratio))| *other != id && *ratio <= HEALTHY_RATIO)
        };
        let mut newly = Vec::new();
        for (id, (new, ratio)) in &ratios {
            if *ratio >= CONDEMN_RATIO && others_fine(*id) && self.condemned.insert(*id) {
                let unanswered = (*new as f64 * ratio).round() as u64;
                newly.push((*id, format!("passive: {unanswered} of {new} new TCP flows unanswered while other uplinks answer")));
            }
        }
        newly
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds samples every 250 ms: `rates[id] = (new per sample, answered per sample)`.
    fn run(
        detector: &mut PassiveDetector,
        start: Instant,
        samples: u32,
        rates: &[(u32, u64, u64)],
    ) -> Vec<(u32, String)> {
        let mut found = Vec::new();
        for step in 0..samples {
            let counters = rates
                .iter()
                .map(|&(id, new, answered)| {
                    (id, (new * u64::from(step), answered * u64::from(step)))
                })
                .collect();
            found.extend(detector.observe(
                start + Duration::from_millis(250 * u64::from(step)),
                counters,
            ));
        }
        found
    }

    #[test]
    fn a_line_that_answers_no_tcp_is_condemned_within_two_seconds() {
        let mut detector = PassiveDetector::default();
        // Uplink 3 gets 1 new flow per 250 ms and answers none; the others answer all.
        let found = run(
            &mut detector,
            Instant::now(),
            9,
            &[(1, 2, 2), (2, 2, 2), (3, 1, 0)],
        );
        assert_eq!(
            found.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            [3],
            "{found:?}"
        );
        assert!(found[0].1.contains("unanswered"), "{found:?}");
        assert!(detector.acquit(3));
        assert!(detector.condemned().is_empty());
    }

    #[test]
    fn a_daemon_that_just_started_judges_on_the_history_it_has() {
        let mut detector = PassiveDetector::default();
        // From the first sample on, 2 new flows per 250 ms on uplink 3, none answered: by
        // 1 s, 4 of them have had their 400 ms to be answered. A full window (1.9 s) of history
        // is not waited for.
        let found = run(&mut detector, Instant::now(), 5, &[(1, 2, 2), (3, 2, 0)]);
        assert_eq!(
            found.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            [3],
            "{found:?}"
        );
    }

    #[test]
    fn nothing_is_condemned_without_a_healthy_comparison_or_enough_flows() {
        let mut detector = PassiveDetector::default();
        assert!(
            run(&mut detector, Instant::now(), 12, &[(1, 1, 0), (2, 1, 0)]).is_empty(),
            "everything failing: the servers, not the lines"
        );
        let mut detector = PassiveDetector::default();
        assert!(
            run(&mut detector, Instant::now(), 12, &[(1, 2, 2), (2, 0, 0)]).is_empty(),
            "an idle uplink says nothing"
        );
        let mut detector = PassiveDetector::default();
        assert!(
            run(&mut detector, Instant::now(), 12, &[(1, 4, 4), (2, 4, 3)]).is_empty(),
            "some unanswered flows are normal"
        );
    }
}
