//! Passive detection: a line that passes pings but not traffic. The data plane counts, per
//! uplink, new TCP flows and those that got any answer (SYN-ACK or RST). When most new flows on
//! one uplink go unanswered while another uplink answers most of its own (with a minimum sample
//! on both, so one dead server cannot condemn a line), that uplink is condemned, even though its
//! probe targets answer. It rejoins after a TCP connect through it succeeds (see the daemon's
//! acquittal), and the detector then starts fresh, so the evidence that condemned it cannot
//! condemn it again.
//!
//! Each new flow is given `ANSWER_LAG`, or twice the uplink's smoothed probe RTT when that is
//! longer, to be answered: on a saturated line with a deep queue a SYN-ACK takes seconds, and
//! a slow answer is not a missing one.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use crate::config::ProbeTarget;

/// New flows are counted over this window, ending `ANSWER_LAG` ago...
const WINDOW: Duration = Duration::from_millis(1500);
/// ...which gives each SYN that long to be answered (at least: see `answer_lag`).
const ANSWER_LAG: Duration = Duration::from_millis(400);
/// The longest a SYN is ever given, whatever the RTT.
const MAX_ANSWER_LAG: Duration = Duration::from_secs(4);
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

    /// A TCP connect through the uplink succeeded: it carries traffic again. The detector
    /// starts fresh: the samples that condemned it (and its idle time out of the rotation)
    /// say nothing about the line now.
    pub fn acquit(&mut self, id: u32) -> bool {
        let acquitted = self.condemned.remove(&id);
        if acquitted {
            self.samples.clear();
        }
        acquitted
    }

    /// Takes a new sample of the counters; returns the uplinks newly condemned, with why.
    /// `rtts`: each uplink's smoothed probe RTT, which stretches the time a SYN is given.
    pub fn observe(
        &mut self,
        now: Instant,
        counters: TcpCounters,
        rtts: &BTreeMap<u32, Duration>,
    ) -> Vec<(u32, String)> {
        self.samples.push_back((now, counters));
        while self.samples.len() > 2
            && now.duration_since(self.samples[1].0) > WINDOW + MAX_ANSWER_LAG
        {
            self.samples.pop_front();
        }
        let latest = self
            .samples
            .back()
            .map(|(_, c)| c.clone())
            .unwrap_or_default();
        let ids: Vec<u32> = latest.keys().copied().collect();
        let ratios: BTreeMap<u32, (u64, f64)> = ids
            .into_iter()
            .filter_map(|id| {
                let lag = answer_lag(rtts.get(&id).copied());
                let cutoff = now.checked_sub(lag)?;
                // New flows counted over the window ending `lag` ago. A daemon that just
                // started judges on the history it has: the minimum sample, not a full
                // window, is what guards against a verdict on too little evidence.
                let (_, at_cutoff) = self
                    .samples
                    .iter()
                    .rev()
                    .find(|(time, _)| *time <= cutoff)?;
                let first = cutoff
                    .checked_sub(WINDOW)
                    .and_then(|start| self.samples.iter().rev().find(|(time, _)| *time <= start))
                    .or_else(|| self.samples.front())
                    .map(|(_, c)| c)?;
                let (new_then, _) = at_cutoff.get(&id).copied()?;
                let (new_before, answered_before) = first.get(&id).copied().unwrap_or((0, 0));
                let new = new_then.saturating_sub(new_before);
                let answered = latest
                    .get(&id)
                    .map_or(0, |(_, a)| *a)
                    .saturating_sub(answered_before)
                    .min(new);
                (new >= MIN_SAMPLE).then(|| (id, (new, 1.0 - answered as f64 / new as f64)))
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

/// Where the TCP connects that clear a passive verdict go, through the condemned uplink: its
/// `tcp:` targets, then remote ends that answer TCP on other uplinks right now
/// (`answered_elsewhere`, from the flow table), then its probe addresses on port 443 (a refusal
/// counts: the RST came back over the line). So an uplink with ICMP-only `track`, whose probe
/// hosts may drop TCP altogether, still has somewhere real to try.
pub fn acquittal_targets(
    track: &[ProbeTarget],
    answered_elsewhere: &[SocketAddrV4],
) -> Vec<SocketAddrV4> {
    let mut targets: Vec<SocketAddrV4> = track
        .iter()
        .filter_map(|t| match t {
            ProbeTarget::Tcp(address) => Some(*address),
            ProbeTarget::Icmp(_) => None,
        })
        .collect();
    targets.extend(answered_elsewhere.iter().take(ACQUITTAL_FROM_FLOWS));
    targets.extend(track.iter().filter_map(|t| match t {
        ProbeTarget::Icmp(address) => Some(SocketAddrV4::new(*address, 443)),
        ProbeTarget::Tcp(_) => None,
    }));
    targets.dedup();
    targets
}

/// Remote ends taken from other uplinks' answered flows per acquittal attempt.
pub const ACQUITTAL_FROM_FLOWS: usize = 3;

/// How long a new flow on an uplink is given to be answered: `ANSWER_LAG`, or twice the
/// uplink's smoothed RTT on a slow (loaded) line, at most `MAX_ANSWER_LAG`.
fn answer_lag(rtt: Option<Duration>) -> Duration {
    rtt.map_or(ANSWER_LAG, |rtt| {
        (rtt * 2).clamp(ANSWER_LAG, MAX_ANSWER_LAG)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds samples every 250 ms: `rates[id] = (new per sample, answered per sample)`.
    fn run_with(
        detector: &mut PassiveDetector,
        start: Instant,
        samples: u32,
        rates: &[(u32, u64, u64)],
        rtts: &BTreeMap<u32, Duration>,
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
                rtts,
            ));
        }
        found
    }

    fn run(
        detector: &mut PassiveDetector,
        start: Instant,
        samples: u32,
        rates: &[(u32, u64, u64)],
    ) -> Vec<(u32, String)> {
        run_with(detector, start, samples, rates, &BTreeMap::new())
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

    #[test]
    fn an_acquitted_uplink_is_judged_afresh() {
        let mut detector = PassiveDetector::default();
        let start = Instant::now();
        let found = run(&mut detector, start, 9, &[(1, 2, 2), (3, 1, 0)]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(detector.acquit(3));
        // The counters stand still while it was out; the old failures must not count again.
        let counters: TcpCounters = BTreeMap::from([(1, (16, 16)), (3, (8, 0))]);
        for step in 9..20 {
            let at = start + Duration::from_millis(250 * step);
            assert!(
                detector
                    .observe(at, counters.clone(), &BTreeMap::new())
                    .is_empty(),
                "condemned again on old evidence at step {step}"
            );
        }
    }

    #[test]
    fn a_slow_answer_on_a_loaded_line_is_not_a_missing_one() {
        // Uplink 3 answers every SYN, but 1.2 s late (a deep queue): with its RTT known, the
        // answers fall inside the time each flow is given.
        let mut detector = PassiveDetector::default();
        let start = Instant::now();
        let rtts = BTreeMap::from([(3, Duration::from_millis(1100))]);
        let mut found = Vec::new();
        for step in 0..24u64 {
            let new3 = step;
            let answered3 = step.saturating_sub(5);
            let counters = BTreeMap::from([(1, (2 * step, 2 * step)), (3, (new3, answered3))]);
            found.extend(detector.observe(
                start + Duration::from_millis(250 * step),
                counters,
                &rtts,
            ));
        }
        assert!(found.is_empty(), "{found:?}");
        // Without the RTT, the same line would be condemned.
        let mut detector = PassiveDetector::default();
        let mut found = Vec::new();
        for step in 0..24u64 {
            let counters = BTreeMap::from([
                (1, (2 * step, 2 * step)),
                (3, (step, step.saturating_sub(5))),
            ]);
            found.extend(detector.observe(
                start + Duration::from_millis(250 * step),
                counters,
                &BTreeMap::new(),
            ));
        }
        assert_eq!(found.len(), 1, "{found:?}");
    }

    #[test]
    fn acquittal_tries_tcp_targets_then_live_remotes_then_probe_hosts() {
        let icmp = ProbeTarget::Icmp(
            "198.18.9.53"
                .parse()
                .unwrap_or(std::net::Ipv4Addr::LOCALHOST),
        );
        let remote = SocketAddrV4::new(std::net::Ipv4Addr::new(198, 18, 9, 1), 9000);
        assert_eq!(
            acquittal_targets(std::slice::from_ref(&icmp), &[remote]),
            [
                remote,
                SocketAddrV4::new(std::net::Ipv4Addr::new(198, 18, 9, 53), 443)
            ],
            "ICMP-only track: a live remote first"
        );
        let tcp = SocketAddrV4::new(std::net::Ipv4Addr::new(198, 18, 9, 1), 443);
        assert_eq!(
            acquittal_targets(&[icmp, ProbeTarget::Tcp(tcp)], &[]),
            [
                tcp,
                SocketAddrV4::new(std::net::Ipv4Addr::new(198, 18, 9, 53), 443)
            ]
        );
    }
}
