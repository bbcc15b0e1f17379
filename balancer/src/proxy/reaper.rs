//! Closing what runs on a dead uplink: kept upstream connections and tunnels of an uplink are
//! closed when the uplink has been unusable for `health.reset_after_ms` (when the daemon resets
//! that uplink's transparent flows), and at once when it loses its address or interface, so
//! clients retry on a live uplink instead of hanging until the idle timeout. A carrier blip
//! shorter than the reset delay closes nothing.
//!
//! Connections subscribe by uplink id and end when their uplink's generation moves.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::{ProxyUplink, View};

/// Generations per uplink id; a bump closes every subscriber of that uplink.
#[derive(Default)]
pub struct Reaper {
    generations: Mutex<HashMap<u32, watch::Sender<u64>>>,
}

/// A connection's subscription: resolves when its uplink is declared dead.
pub struct Doom(Option<watch::Receiver<u64>>);

impl Doom {
    pub async fn wait(mut self) {
        match self.0.as_mut() {
            Some(receiver) => {
                let _ = receiver.changed().await;
            }
            None => std::future::pending().await,
        }
    }
}

impl Reaper {
    pub fn subscribe(&self, uplink: u32) -> Doom {
        Doom(self.generations.lock().ok().map(|mut generations| {
            generations
                .entry(uplink)
                .or_insert_with(|| watch::channel(0).0)
                .subscribe()
        }))
    }

    fn close_all(&self, uplink: &ProxyUplink, why: &str) {
        if let Ok(generations) = self.generations.lock()
            && let Some(sender) = generations.get(&uplink.id)
        {
            sender.send_modify(|generation| *generation += 1);
            tracing::info!(uplink = %uplink.name, why, "proxy: closing the uplink's tunnels and kept connections");
        }
    }
}

/// What to do about each uplink, given when it became unusable. Pure, for unit tests.
#[derive(Debug, Default)]
struct Outages {
    since: HashMap<u32, Instant>,
    closed: HashSet<u32>,
}

impl Outages {
    /// The uplinks to close now (with why), and when to look again.
    fn update(
        &mut self,
        uplinks: &[ProxyUplink],
        now: Instant,
        reset_after: Duration,
    ) -> (Vec<(ProxyUplink, &'static str)>, Option<Instant>) {
        let mut close = Vec::new();
        let mut next = None::<Instant>;
        // As for transparent flows: with no uplink usable, the ones with carrier keep carrying
        // what they can, and closing would only make things worse.
        let any_usable = uplinks.iter().any(|u| u.usable);
        for uplink in uplinks {
            if uplink.usable {
                self.since.remove(&uplink.id);
                self.closed.remove(&uplink.id);
                continue;
            }
            let since = *self.since.entry(uplink.id).or_insert(now);
            if self.closed.contains(&uplink.id) {
                continue;
            }
            if uplink.lost {
                close.push((uplink.clone(), "its address or interface is gone"));
            } else if !any_usable {
                continue;
            } else if now >= since + reset_after {
                close.push((uplink.clone(), "unusable for the reset delay"));
            } else {
                let due = since + reset_after;
                next = Some(next.map_or(due, |n| n.min(due)));
                continue;
            }
            self.closed.insert(uplink.id);
        }
        (close, next)
    }
}

/// Watches the daemon's view and closes what runs on dead uplinks, until the view's sender is
/// gone.
pub async fn run(
    reaper: std::sync::Arc<Reaper>,
    mut view: watch::Receiver<View>,
    reset_after: Duration,
) {
    let mut outages = Outages::default();
    loop {
        let uplinks = view.borrow_and_update().uplinks.clone();
        let (close, next) = outages.update(&uplinks, Instant::now(), reset_after);
        for (uplink, why) in close {
            reaper.close_all(&uplink, why);
        }
        let wake = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = view.changed() => if changed.is_err() { return },
            () = wake => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uplink(id: u32, usable: bool, lost: bool) -> ProxyUplink {
        ProxyUplink {
            id,
            name: format!("u{id}"),
            source: std::net::Ipv4Addr::new(198, 18, id as u8, 2),
            weight: 1,
            usable,
            lost,
            dns: Vec::new(),
        }
    }

    /// `u` beside a healthy uplink 9.
    fn with_live(u: ProxyUplink) -> Vec<ProxyUplink> {
        vec![u, uplink(9, true, false)]
    }

    #[test]
    fn blips_close_nothing_outages_close_once_and_lost_addresses_close_at_once() {
        let reset = Duration::from_millis(1000);
        let t0 = Instant::now();
        let mut outages = Outages::default();
        let (close, next) = outages.update(&with_live(uplink(1, false, false)), t0, reset);
        assert!(close.is_empty());
        assert_eq!(next, Some(t0 + reset));
        // Back after 300 ms: nothing closed, and the clock starts over next time.
        let (close, _) = outages.update(&with_live(uplink(1, true, false)), t0 + reset / 3, reset);
        assert!(close.is_empty());
        let t1 = t0 + Duration::from_secs(5);
        outages.update(&with_live(uplink(1, false, false)), t1, reset);
        let (close, next) = outages.update(&with_live(uplink(1, false, false)), t1 + reset, reset);
        assert_eq!(close.len(), 1);
        assert_eq!(next, None);
        let (close, _) = outages.update(&with_live(uplink(1, false, false)), t1 + reset * 2, reset);
        assert!(close.is_empty(), "closed once per outage");
        let (close, _) = outages.update(&with_live(uplink(2, false, true)), t1, reset);
        assert_eq!(close.len(), 1, "a lost address closes at once");
        let mut alone = Outages::default();
        alone.update(&[uplink(3, false, false)], t0, reset);
        let (close, _) = alone.update(&[uplink(3, false, false)], t1, reset);
        assert!(close.is_empty(), "nothing closed while no uplink is usable");
    }
}
