//! Reload on SIGHUP: the config is read again and, if `check` would pass it and it keeps every
//! remaining uplink's id, table and mark, it replaces the running one. Weights, uplinks added or
//! removed, track targets and the proxy section take effect without a restart; flows on uplinks
//! that stay are untouched, flows on a removed uplink are reset at once. A refused config is
//! logged and shown in `status`; the running one stays.

use std::path::Path;

use super::{Daemon, DaemonError, bind_proxy, error_chain, now_unix, write_uplink_names};
use crate::{
    config::{Config, ConfigError},
    plan::{self, Strictness},
    reconcile,
    state::Reload,
};

/// Refuses a new config that would change a remaining uplink's id, table or mark: its routing
/// table, rules and the flows pinned to it are keyed by them. Uplinks are matched by name.
pub fn refuse_identity_changes(running: &Config, new: &Config) -> Result<(), ConfigError> {
    for (position, uplink) in new.uplinks.iter().enumerate() {
        let Some(old) = running.uplinks.iter().find(|u| u.name == uplink.name) else {
            continue;
        };
        if (old.id, old.table, old.mark) != (uplink.id, uplink.table, uplink.mark) {
            return Err(new.error(
                &format!("uplink[{position}].id"),
                format!(
                    "uplink {} runs with id {} (table {}, mark {:#x}); a reload would make it id {} \
                     (table {}, mark {:#x}), which cannot change while it runs: set `id` \
                     explicitly to keep it, or restart",
                    uplink.name,
                    old.id,
                    old.table,
                    old.mark,
                    uplink.id,
                    uplink.table,
                    uplink.mark
                ),
            ));
        }
    }
    if new.dataplane.enabled != running.dataplane.enabled {
        return Err(new.error(
            "dataplane.enabled",
            "turning the data plane on or off needs a restart",
        ));
    }
    Ok(())
}

impl Daemon {
    /// Re-reads the config; on success the next pass applies it. Never fails the daemon.
    pub(super) async fn reload(&mut self) {
        let outcome = self.try_reload().await;
        let (ok, message) = match outcome {
            Ok(message) => {
                tracing::info!(%message, "configuration reloaded");
                (true, message)
            }
            Err(error) => {
                let message = error_chain(&error);
                tracing::error!(error = %message, "reload refused; the running configuration stays");
                (false, message)
            }
        };
        if let Ok(mut status) = self.status.lock() {
            status.last_reload = Some(Reload {
                unix: now_unix(),
                ok,
                message,
            });
        }
    }

    async fn try_reload(&mut self) -> Result<String, DaemonError> {
        let path = self.config_path.clone();
        let new = Config::load(Path::new(&path))?;
        let refused = |error| DaemonError::Config {
            path: path.clone(),
            error,
        };
        refuse_identity_changes(&self.config, &new).map_err(refused)?;
        let observed = reconcile::observe(&self.netlink, &new)
            .await
            .map_err(DaemonError::Observe)?;
        plan::desired(&new, &observed, Strictness::Strict).map_err(refused)?;

        let names = |config: &Config| -> Vec<(u32, String)> {
            config
                .uplinks
                .iter()
                .map(|u| (u.id, u.name.clone()))
                .collect()
        };
        let removed: Vec<(u32, String)> = self
            .config
            .uplinks
            .iter()
            .filter(|old| !new.uplinks.iter().any(|u| u.name == old.name))
            .map(|u| (u.id, u.name.clone()))
            .collect();
        let added: Vec<String> = new
            .uplinks
            .iter()
            .filter(|u| !self.config.uplinks.iter().any(|old| old.name == u.name))
            .map(|u| u.name.clone())
            .collect();
        // The proxy knows its uplinks' names and settings from when it was bound: bind it anew
        // when either changes. Connections it already accepted go on.
        if new.proxy != self.config.proxy || names(&new) != names(&self.config) {
            self.restart_proxy(&new).await?;
        }
        self.config = new;
        write_uplink_names(&self.config, &self.state_dir);
        if let Some(dataplane) = &mut self.dataplane {
            for (id, name) in &removed {
                match dataplane.reset_flows_of(*id) {
                    Ok(reset) => {
                        tracing::info!(uplink = %name, reset, "reset the connections of a removed uplink")
                    }
                    Err(error) => {
                        tracing::warn!(uplink = %name, error = %error_chain(&error), "resetting the connections of a removed uplink")
                    }
                }
            }
        }
        let removed: Vec<String> = removed.into_iter().map(|(_, name)| name).collect();
        Ok(format!(
            "{} uplink(s); added [{}], removed [{}]",
            self.config.uplinks.len(),
            added.join(", "),
            removed.join(", ")
        ))
    }

    async fn restart_proxy(&mut self, new: &Config) -> Result<(), DaemonError> {
        if let Some(proxy) = self.proxy.take() {
            proxy.stop().await;
        }
        self.proxy_feed = None;
        let bound = match bind_proxy(new).await {
            Ok(bound) => bound,
            Err(error) => {
                // Put the running proxy back before refusing the new config.
                if let Ok(Some((feed, proxy))) = bind_proxy(&self.config).await {
                    self.proxy_feed = Some(feed);
                    self.proxy = proxy.spawn(self.status.clone()).ok();
                }
                return Err(error);
            }
        };
        if let Ok(mut status) = self.status.lock() {
            status.proxy = None;
        }
        if let Some((feed, proxy)) = bound {
            self.proxy_feed = Some(feed);
            self.proxy = Some(
                proxy
                    .spawn(self.status.clone())
                    .map_err(DaemonError::Proxy)?,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const BASE: &str = "[lan]\ninterfaces = [\"lan0\"]\nnetworks = [\"198.18.0.0/24\"]\n";

    fn config(uplinks: &str) -> Config {
        Config::parse(&format!("{BASE}{uplinks}")).unwrap()
    }

    #[test]
    fn a_reload_keeps_ids_tables_and_marks_and_may_add_remove_and_reweight() {
        let running = config(
            "[[uplink]]\nname = \"a\"\ninterface = \"wan1\"\n[[uplink]]\nname = \"b\"\ninterface = \"wan2\"\n",
        );
        let reweighted = config(
            "[[uplink]]\nname = \"a\"\ninterface = \"wan1\"\nweight = 5\n[[uplink]]\nname = \"b\"\ninterface = \"wan2\"\n[[uplink]]\nname = \"c\"\ninterface = \"wan3\"\n",
        );
        assert_eq!(refuse_identity_changes(&running, &reweighted), Ok(()));
        let removed_first = config("[[uplink]]\nname = \"b\"\ninterface = \"wan2\"\n");
        let error = refuse_identity_changes(&running, &removed_first).unwrap_err();
        assert_eq!(error.key, "uplink[0].id", "{error}");
        assert!(error.message.contains("set `id` explicitly"), "{error}");
        let kept = config("[[uplink]]\nname = \"b\"\ninterface = \"wan2\"\nid = 2\n");
        assert_eq!(refuse_identity_changes(&running, &kept), Ok(()));
    }
}
