//! Closing what runs on a dead uplink: kept upstream connections and tunnels of an uplink are
//! closed when the daemon gives up the uplink's connections (`health::release`: out of the
//! rotation and silent for the reset delay, the moment its transparent flows are reset), and
//! at once when it is renumbered, so clients retry on a live uplink instead of hanging until
//! the idle timeout. A carrier blip shorter than the reset delay closes nothing.
//!
//! Connections subscribe by uplink id and end when their uplink's generation moves.

use std::{collections::HashMap, sync::Mutex};

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
    /// The uplink's generation when this subscription was taken: connections opened under an
    /// older one belong to a released uplink.
    pub fn generation(&self) -> u64 {
        self.0.as_ref().map_or(0, |receiver| *receiver.borrow())
    }

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

    /// The uplink's current generation (0 before anything subscribed to it).
    pub fn generation(&self, uplink: u32) -> u64 {
        self.generations
            .lock()
            .ok()
            .and_then(|generations| generations.get(&uplink).map(|sender| *sender.borrow()))
            .unwrap_or(0)
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

/// What has been closed already: the release count and the address last seen per uplink.
/// Pure, for unit tests.
#[derive(Debug, Default)]
struct Outages {
    released: HashMap<u32, u64>,
    addresses: HashMap<u32, std::net::Ipv4Addr>,
}

impl Outages {
    /// The uplinks to close now, with why: those whose connections the daemon gave up since
    /// the last look, and those renumbered (their old address can carry nothing any more).
    fn update(&mut self, view: &View) -> Vec<(ProxyUplink, &'static str)> {
        let mut close = Vec::new();
        for uplink in &view.uplinks {
            let count = view.released.get(&uplink.id).copied().unwrap_or(0);
            let seen = self.released.insert(uplink.id, count).unwrap_or(0);
            if count != seen {
                close.push((uplink.clone(), "silent past the reset delay"));
                continue;
            }
            // An address that goes keeps what runs on it (it may come back, as for transparent
            // flows); another address in its place closes it at once.
            if uplink.source.is_unspecified() {
                continue;
            }
            if let Some(old) = self.addresses.insert(uplink.id, uplink.source)
                && old != uplink.source
            {
                close.push((uplink.clone(), "its address changed"));
            }
        }
        close
    }
}

/// Watches the daemon's view and closes what runs on dead uplinks, until the view's sender is
/// gone.
pub async fn run(reaper: std::sync::Arc<Reaper>, mut view: watch::Receiver<View>) {
    let mut outages = Outages::default();
    loop {
        let current = view.borrow_and_update().clone();
        for (uplink, why) in outages.update(&current) {
            reaper.close_all(&uplink, why);
        }
        if view.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uplink(id: u32, source: [u8; 4]) -> ProxyUplink {
        ProxyUplink {
            id,
            name: format!("u{id}"),
            source: std::net::Ipv4Addr::from(source),
            weight: 1,
            usable: true,
            dns: Vec::new(),
        }
    }

    fn view(uplinks: Vec<ProxyUplink>, released: &[(u32, u64)]) -> View {
        View {
            uplinks,
            refused: Vec::new(),
            released: released.iter().copied().collect(),
        }
    }

    #[test]
    fn releases_close_once_and_renumbering_closes_at_once_but_a_lost_address_does_not() {
        let mut outages = Outages::default();
        let one = || uplink(1, [198, 18, 1, 2]);
        assert!(outages.update(&view(vec![one()], &[])).is_empty());
        let closed = outages.update(&view(vec![one()], &[(1, 1)]));
        assert_eq!(closed.len(), 1, "released by the daemon");
        assert!(
            outages.update(&view(vec![one()], &[(1, 1)])).is_empty(),
            "once per release"
        );
        assert!(
            outages
                .update(&view(vec![uplink(1, [0, 0, 0, 0])], &[(1, 1)]))
                .is_empty(),
            "an address that goes may come back"
        );
        assert!(outages.update(&view(vec![one()], &[(1, 1)])).is_empty());
        let closed = outages.update(&view(vec![uplink(1, [198, 18, 7, 2])], &[(1, 1)]));
        assert_eq!(closed.len(), 1, "renumbered");
    }
}
