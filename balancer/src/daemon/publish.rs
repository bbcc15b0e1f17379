//! Sharing each pass's view of the uplinks: the `status` document, the proxy's feed, the
//! release clock and the health probes all read it from here.

use super::{Daemon, Failures};
use crate::{state::UplinkStatus, uplink::UplinkState};

impl Daemon {
    /// Shares the uplinks' state with `status`, the proxy and the health probes.
    pub(super) fn publish(
        &mut self,
        states: &[UplinkState],
        failures: &Failures,
        proxy_refused: Vec<ipnet::Ipv4Net>,
    ) {
        let uplinks = self
            .config
            .uplinks
            .iter()
            .zip(states)
            .map(|(uplink, state)| UplinkStatus {
                id: uplink.id,
                name: uplink.name.clone(),
                interface: uplink.interface.clone(),
                source: state.source.map_or("-".into(), |a| a.to_string()),
                gateway: match (state.gateway, &state.interface) {
                    (Some(gateway), _) => gateway.to_string(),
                    (None, Some(_)) if state.source.is_some() => "dev".into(),
                    _ => "-".into(),
                },
                weight: uplink.weight,
                table: uplink.table,
                mark: format!("{:#x}", uplink.mark),
                carrier: state.carrier,
                unavailable: (!state.routable).then(|| state.unavailable()).flatten(),
                health: None,
                stages: state.stages.clone(),
                usable: state.usable,
                errors: failures
                    .iter()
                    .filter(|(owner, _)| *owner == Some(uplink.id))
                    .map(|(_, f)| f.clone())
                    .collect(),
            })
            .collect();
        if let Ok(mut status) = self.status.lock() {
            status.uplinks = uplinks;
        }
        let usable: Vec<(u32, bool)> = states.iter().map(|s| (s.id, s.usable)).collect();
        self.releases.track(&usable, std::time::Instant::now());
        crate::proxy::feed(
            &self.proxy_feed,
            &self.config,
            states,
            proxy_refused,
            self.releases.releases(),
        );
        if let Some(monitor) = &self.health {
            let probed: Vec<(crate::config::Uplink, Option<std::net::Ipv4Addr>)> = self
                .config
                .uplinks
                .iter()
                .zip(states)
                // Probes go on while the address exists (a link that is down fails them,
                // so it rejoins only after `up_after` good rounds); without one they stop.
                .map(|(uplink, state)| (uplink.clone(), state.source))
                .collect();
            monitor.follow(&probed, &self.config.health);
        }
    }

    /// The source an uplink has now (configured or learned), from the last pass.
    pub(super) fn current_source(&self, id: u32) -> Option<std::net::Ipv4Addr> {
        let status = self.status.lock().ok()?;
        status
            .uplinks
            .iter()
            .find(|u| u.id == id)
            .and_then(|u| u.source.parse().ok())
    }
}
