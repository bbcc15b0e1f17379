//! Giving up a dead uplink's connections when `health::release` says so: the data plane resets
//! the uplink's TCP clients and releases its flows, and the proxy is told to close its tunnels
//! and kept connections on it.

use std::time::Duration;

use super::{Daemon, error_chain};
use crate::health;

impl Daemon {
    /// Gives up the connections of every uplink out of the rotation and silent past the reset
    /// delay (`health::release`): the data plane resets its TCP clients and releases its flows,
    /// the proxy closes its tunnels and kept connections.
    pub(super) fn release_due(&mut self, liveness: &health::Liveness) {
        let after = Duration::from_millis(u64::from(self.config.health.reset_after_ms));
        let due = self.releases.due(
            std::time::Instant::now(),
            after,
            liveness,
            self.passive.condemned(),
        );
        if due.is_empty() {
            return;
        }
        for id in due {
            let reset = match &mut self.dataplane {
                Some(dataplane) => match dataplane.release(id) {
                    Ok(reset) => reset,
                    Err(error) => {
                        tracing::warn!(uplink = id, error = %error_chain(&error), "releasing the flows of an uplink silent past the reset delay");
                        0
                    }
                },
                None => 0,
            };
            tracing::info!(
                uplink = id,
                reset,
                "gave up the connections of an uplink silent past the reset delay; reset its TCP clients"
            );
        }
        crate::proxy::released(&self.proxy_feed, self.releases.releases());
    }
}
