//! One uplink's health as a pure state machine over probe rounds: hysteresis (down after
//! `down_after` lost rounds in a row, up after `up_after` good ones), a moving window for loss and
//! RTT, and a probe timeout that follows the measured RTT.

use std::{collections::VecDeque, time::Duration};

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

    /// Records one probe round: `Some(rtt)` if any target answered in time, `None` if all were
    /// lost. Returns the state change it caused, if any.
    pub fn record(&mut self, outcome: Option<Duration>, config: &Health) -> Option<Transition> {
        if self.window.len() == WINDOW {
            self.window.pop_front();
        }
        self.window.push_back(outcome);
        match outcome {
            Some(rtt) => {
                self.smoothed_rtt = Some(match self.smoothed_rtt {
                    None => rtt,
                    Some(smoothed) => (smoothed * 7 + rtt) / 8,
                });
                self.good_in_a_row += 1;
                self.lost_in_a_row = 0;
            }
            None => {
                self.lost_in_a_row += 1;
                self.good_in_a_row = 0;
            }
        }
        let next = match self.state {
            State::Unknown if self.good_in_a_row >= 1 => State::Up,
            State::Down if self.good_in_a_row >= config.up_after => State::Up,
            State::Unknown | State::Up if self.lost_in_a_row >= config.down_after => State::Down,
            state => state,
        };
        if next == self.state {
            return None;
        }
        let reason = match next {
            State::Down => format!("{} probe rounds lost in a row", self.lost_in_a_row),
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

    fn ms(value: u64) -> Option<Duration> {
        Some(Duration::from_millis(value))
    }

    #[test]
    fn down_after_consecutive_losses_and_up_only_after_hysteresis() {
        let config = Health::default();
        let mut tracker = Tracker::default();
        assert_eq!(
            tracker.record(ms(20), &config).map(|t| t.to),
            Some(State::Up)
        );
        assert_eq!(tracker.record(None, &config), None);
        assert_eq!(
            tracker.record(ms(20), &config),
            None,
            "an isolated loss does not count"
        );
        assert_eq!(tracker.record(None, &config), None);
        assert_eq!(tracker.record(None, &config), None);
        let down = tracker.record(None, &config).expect("third loss in a row");
        assert_eq!((down.from, down.to), (State::Up, State::Down));
        for _ in 0..config.up_after - 1 {
            assert_eq!(
                tracker.record(ms(20), &config),
                None,
                "not before up_after good rounds"
            );
        }
        assert_eq!(
            tracker.record(ms(20), &config).map(|t| t.to),
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
        assert_eq!(tracker.timeout(&config), Duration::from_millis(300));
        for _ in 0..40 {
            tracker.record(ms(400), &config);
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
}
