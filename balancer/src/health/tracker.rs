//! One uplink's health as a pure state machine over probe rounds: hysteresis (down after
//! `down_after` silent rounds in a row, up after `up_after` good ones), a moving window for loss
//! and RTT, and a probe timeout that follows the measured RTT, late answers included.
//!
//! A round is silent only when its probes went unanswered and nothing else was answered on the
//! uplink while it ran (replies of flows, the gateway's own connections: see `liveness`). A
//! saturated line whose queue delays the probes past their deadline is therefore never down.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::config::Health;

/// Rounds kept for loss and RTT figures.
const WINDOW: usize = 50;
/// Longest a probe is ever given: beyond this the line is unusable for interactive traffic.
const MAX_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// No verdict yet (just started): treated as usable so a restart never drops traffic.
    Unknown,
    Up,
    Down,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct Tracker {
    state: State,
    good_in_a_row: u32,
    /// When the current run of good rounds began: a down uplink comes back only after
    /// answering for `up_after` intervals, however many rounds in flight its return answers.
    good_since: Option<Instant>,
    lost_in_a_row: u32,
    /// Outcome of recent rounds: the round's RTT, or None when it was lost.
    window: VecDeque<Option<Duration>>,
    /// Smoothed RTT (RFC 6298 style, alpha 1/8).
    smoothed_rtt: Option<Duration>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            state: State::Unknown,
            good_in_a_row: 0,
            good_since: None,
            lost_in_a_row: 0,
            window: VecDeque::new(),
            smoothed_rtt: None,
        }
    }
}

impl Tracker {
    pub fn state(&self) -> State {
        self.state
    }

    /// How long the next probe may take. A queue building up on a loaded line raises the RTT
    /// gradually, and the timeout follows it, so bufferbloat is not mistaken for a dead line; a
    /// dead line gives no replies at all, whatever the timeout.
    pub fn timeout(&self, config: &Health) -> Duration {
        let floor = Duration::from_millis(u64::from(config.timeout_ms));
        let adaptive = self
            .smoothed_rtt
            .map_or(Duration::ZERO, |rtt| rtt * 3 + Duration::from_millis(50));
        floor.max(adaptive).min(MAX_TIMEOUT)
    }

    /// Share of lost rounds in the window, 0.0 to 1.0.
    pub fn loss(&self) -> f64 {
        if self.window.is_empty() {
            return 0.0;
        }
        self.window.iter().filter(|r| r.is_none()).count() as f64 / self.window.len() as f64
    }

    /// Mean RTT of the answered rounds in the window.
    pub fn rtt(&self) -> Option<Duration> {
        let answered: Vec<Duration> = self.window.iter().flatten().copied().collect();
        (!answered.is_empty()).then(|| answered.iter().sum::<Duration>() / answered.len() as u32)
    }

    /// The smoothed probe RTT, late answers included.
    pub fn smoothed_rtt(&self) -> Option<Duration> {
        self.smoothed_rtt
    }

    /// A probe answered after its round's deadline: the round stays lost, but the RTT (and so
    /// the next deadlines) learns how slow the line is now.
    pub fn late_answer(&mut self, rtt: Duration) {
        self.smooth(rtt);
    }

    fn smooth(&mut self, rtt: Duration) {
        self.smoothed_rtt = Some(match self.smoothed_rtt {
            None => rtt,
            Some(smoothed) => (smoothed * 7 + rtt) / 8,
        });
    }

    /// Records one probe round: `Some(rtt)` if any target answered in time, `None` if all were
    /// lost; `traffic`: the uplink answered other traffic while the round ran; `now`: when the
    /// round was judged. Returns the state change it caused, if any.
    pub fn record(
        &mut self,
        outcome: Option<Duration>,
        traffic: bool,
        now: Instant,
        config: &Health,
    ) -> Option<Transition> {
        if self.window.len() == WINDOW {
            self.window.pop_front();
        }
        self.window.push_back(outcome);
        if let Some(rtt) = outcome {
            self.smooth(rtt);
        }
        if outcome.is_some() || traffic {
            self.good_in_a_row += 1;
            self.good_since.get_or_insert(now);
            self.lost_in_a_row = 0;
        } else {
            self.lost_in_a_row += 1;
            self.good_in_a_row = 0;
            self.good_since = None;
        }
        let hysteresis = Duration::from_millis(u64::from(config.interval_ms))
            * config.up_after.saturating_sub(1);
        let answered_long_enough = self
            .good_since
            .is_some_and(|since| now.saturating_duration_since(since) >= hysteresis);
        let next = match self.state {
            State::Unknown if self.good_in_a_row >= 1 => State::Up,
            State::Down if self.good_in_a_row >= config.up_after && answered_long_enough => {
                State::Up
            }
            State::Unknown | State::Up if self.lost_in_a_row >= config.down_after => State::Down,
            state => state,
        };
        if next == self.state {
            return None;
        }
        let reason = match next {
            State::Down => format!(
                "{} probe rounds lost in a row, and no traffic answered",
                self.lost_in_a_row
            ),
            _ if outcome.is_none() => format!(
                "{} rounds answered in a row (traffic answered while probes waited)",
                self.good_in_a_row
            ),
            _ => format!("{} probe rounds answered in a row", self.good_in_a_row),
        };
        let transition = Transition {
            from: self.state,
            to: next,
            reason,
        };
        self.state = next;
        Some(transition)
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    /// Rounds judged one interval apart, as the probe task judges them.
    struct Clock(Instant);

    impl Clock {
        fn tick(&mut self) -> Instant {
            self.0 += Duration::from_millis(200);
            self.0
        }
    }

    fn ms(value: u64) -> Option<Duration> {
        Some(Duration::from_millis(value))
    }

    #[test]
    fn down_after_consecutive_losses_and_up_only_after_hysteresis() {
        let config = Health::default();
        let mut tracker = Tracker::default();
        let mut clock = Clock(Instant::now());
        assert_eq!(
            tracker
                .record(ms(20), false, clock.tick(), &config)
                .map(|t| t.to),
            Some(State::Up)
        );
        assert_eq!(tracker.record(None, false, clock.tick(), &config), None);
        assert_eq!(
            tracker.record(ms(20), false, clock.tick(), &config),
            None,
            "an isolated loss does not count"
        );
        assert_eq!(tracker.record(None, false, clock.tick(), &config), None);
        assert_eq!(tracker.record(None, false, clock.tick(), &config), None);
        let down = tracker
            .record(None, false, clock.tick(), &config)
            .expect("third loss in a row");
        assert_eq!((down.from, down.to), (State::Up, State::Down));
        for _ in 0..config.up_after - 1 {
            assert_eq!(
                tracker.record(ms(20), false, clock.tick(), &config),
                None,
                "not before up_after good rounds"
            );
        }
        assert_eq!(
            tracker
                .record(ms(20), false, clock.tick(), &config)
                .map(|t| t.to),
            Some(State::Up)
        );
        assert!(
            (tracker.loss() - 3.0 / 11.0).abs() < 1e-9 + 0.1,
            "{}",
            tracker.loss()
        );
    }

    #[test]
    fn a_silent_line_is_down_within_a_second_with_the_defaults() {
        let config = Health::default();
        // A cut right after a probe was sent: the next round starts one interval later, and
        // each round is judged when its timeout runs out.
        let interval = u64::from(config.interval_ms);
        let worst =
            interval * u64::from(config.down_after - 1) + interval + u64::from(config.timeout_ms);
        assert!(worst <= 1000, "worst-case detection {worst} ms");
    }

    #[test]
    fn the_timeout_follows_a_rising_rtt_but_is_capped() {
        let config = Health::default();
        let mut tracker = Tracker::default();
        let mut clock = Clock(Instant::now());
        assert_eq!(tracker.timeout(&config), Duration::from_millis(300));
        for _ in 0..40 {
            tracker.record(ms(400), false, clock.tick(), &config);
        }
        let timeout = tracker.timeout(&config);
        assert!(
            timeout > Duration::from_millis(1000) && timeout <= MAX_TIMEOUT,
            "{timeout:?}"
        );
        assert_eq!(
            tracker.state(),
            State::Up,
            "a slow but answering line stays up"
        );
    }

    #[test]
    fn a_line_that_answers_traffic_is_never_down_whatever_its_probes() {
        let config = Health::default();
        let mut tracker = Tracker::default();
        let mut clock = Clock(Instant::now());
        tracker.record(ms(20), false, clock.tick(), &config);
        for _ in 0..100 {
            assert_eq!(
                tracker.record(None, true, clock.tick(), &config),
                None,
                "probes stuck behind a full queue, replies flowing"
            );
        }
        assert_eq!(tracker.state(), State::Up);
        for _ in 0..config.down_after - 1 {
            assert_eq!(tracker.record(None, false, clock.tick(), &config), None);
        }
        let down = tracker
            .record(None, false, clock.tick(), &config)
            .expect("silent: neither probes nor traffic");
        assert!(down.reason.contains("no traffic"), "{}", down.reason);
        // Traffic answering again counts toward the hysteresis like answered probes.
        for _ in 0..config.up_after - 1 {
            assert_eq!(tracker.record(None, true, clock.tick(), &config), None);
        }
        assert_eq!(
            tracker
                .record(None, true, clock.tick(), &config)
                .map(|t| t.to),
            Some(State::Up)
        );
    }

    #[test]
    fn late_answers_raise_the_deadline() {
        let config = Health::default();
        let mut tracker = Tracker::default();
        let mut clock = Clock(Instant::now());
        tracker.record(ms(5), false, clock.tick(), &config);
        for _ in 0..30 {
            tracker.record(None, true, clock.tick(), &config);
            tracker.late_answer(Duration::from_millis(900));
        }
        assert!(
            tracker.timeout(&config) >= Duration::from_millis(1900),
            "{:?}",
            tracker.timeout(&config)
        );
    }

    #[test]
    fn rounds_in_flight_at_a_return_do_not_shorten_the_hysteresis() {
        let config = Health::default();
        let mut tracker = Tracker::default();
        let start = Instant::now();
        tracker.record(ms(20), false, start, &config);
        for step in 1..=3 {
            tracker.record(
                None,
                false,
                start + Duration::from_millis(200 * step),
                &config,
            );
        }
        assert_eq!(tracker.state(), State::Down);
        // The line returns: five rounds judged within 300 ms all count as answered.
        let back = start + Duration::from_millis(1000);
        for step in 0..5 {
            let at = back + Duration::from_millis(60 * step);
            assert_eq!(tracker.record(ms(20), false, at, &config), None);
        }
        let up = back + Duration::from_millis(800);
        assert_eq!(
            tracker.record(ms(20), false, up, &config).map(|t| t.to),
            Some(State::Up)
        );
    }
}
