//! The multisourcing forward proxy: an HTTP/1.1 proxy (absolute-form requests and CONNECT
//! tunnels) whose upstream connections leave by the uplinks, each bound to an uplink's source
//! address so the `from <source>` policy rules carry it.
//!
//! One module per concern: `listener` (accepting, limits, timeouts), `http` (requests,
//! tunnels, refusals), `policy` (which uplink), `upstream` (resolve, check, connect, race),
//! `dns` (queries out of an uplink), `guard` (forbidden destinations), `io` (activity and raw
//! head window), `counters` (per-uplink counters for `balancer status`).
//!
//! The proxy only reports observations; it never writes routes. It learns which uplinks are
//! usable from a watch channel the daemon feeds after each reconcile.

mod counters;
mod dns;
mod guard;
mod http;
mod io;
mod listener;
mod policy;
mod upstream;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::Duration,
};

pub use counters::{ProxyStatus, ProxyUplinkStatus, table};
use ipnet::Ipv4Net;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    config::{Config, proxy::Proxy as Settings},
    state::Status,
    uplink::UplinkState,
};

/// How often the counters are copied into the status document.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(250);

/// What the proxy needs to know about an uplink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyUplink {
    pub id: u32,
    pub name: String,
    pub source: Ipv4Addr,
    pub weight: u32,
    /// May carry new upstream connections now.
    pub usable: bool,
    /// The uplink's resolvers (empty: the system's, asked from this uplink's address).
    pub dns: Vec<Ipv4Addr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("listening on {address} for the proxy")]
    Listen {
        address: SocketAddrV4,
        #[source]
        source: std::io::Error,
    },
}

/// State shared by every connection.
struct Shared {
    settings: Settings,
    lan: Vec<Ipv4Net>,
    uplinks: watch::Receiver<Vec<ProxyUplink>>,
    chooser: Mutex<policy::Chooser>,
    counters: counters::Counters,
    local: guard::LocalAddresses,
    names: BTreeMap<u32, String>,
}

/// A bound proxy, not yet serving.
pub struct Proxy {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Binds the listening socket, so a taken or missing address fails the daemon's start
    /// before anything is changed.
    pub async fn bind(
        config: &Config,
        settings: Settings,
        uplinks: watch::Receiver<Vec<ProxyUplink>>,
    ) -> Result<Proxy, ProxyError> {
        let listener = listener::bind(settings.listen, settings.limits.max_connections)?;
        let chooser = policy::Chooser::new(settings.policy, settings.sticky_timeout);
        let names = config
            .uplinks
            .iter()
            .map(|u| (u.id, u.name.clone()))
            .collect();
        Ok(Proxy {
            listener,
            shared: Arc::new(Shared {
                settings,
                lan: config.lan.networks.clone(),
                uplinks,
                chooser: Mutex::new(chooser),
                counters: counters::Counters::default(),
                local: guard::LocalAddresses::default(),
                names,
            }),
        })
    }

    /// Serves clients, and keeps `status.proxy` up to date, until the runtime ends or the
    /// returned handle stops it (a reload). Connections already accepted go on either way.
    pub fn spawn(self, status: Arc<Mutex<Status>>) -> ProxyHandle {
        tracing::info!(listen = %self.shared.settings.listen, policy = ?self.shared.settings.policy, "proxy serving");
        let shared = self.shared.clone();
        let publish = tokio::spawn(async move {
            let mut tick = tokio::time::interval(PUBLISH_INTERVAL);
            loop {
                tick.tick().await;
                let snapshot = shared.counters.snapshot(&shared.names);
                if let Ok(mut status) = status.lock() {
                    status.proxy = Some(snapshot);
                }
            }
        });
        let serve = tokio::spawn(listener::serve(self.listener, self.shared));
        ProxyHandle {
            tasks: vec![publish, serve],
        }
    }
}

/// A serving proxy's listener and publisher.
pub struct ProxyHandle {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ProxyHandle {
    /// Stops accepting and publishing, and waits until the listening socket is closed, so a new
    /// proxy can bind the same address.
    pub async fn stop(self) {
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
    }
}

/// The proxy's view of the uplinks after a reconcile, from the one uplink model: usable when
/// it takes new flows (the daemon ignores health verdicts when every uplink is down, so the
/// office is never cut off) and has an address to bind to.
pub fn uplinks_from(config: &Config, states: &[UplinkState]) -> Vec<ProxyUplink> {
    config
        .uplinks
        .iter()
        .zip(states)
        .map(|(uplink, state)| ProxyUplink {
            id: uplink.id,
            name: uplink.name.clone(),
            source: state.source.unwrap_or(Ipv4Addr::UNSPECIFIED),
            weight: uplink.weight,
            usable: state.usable && state.source.is_some(),
            dns: uplink.dns.clone(),
        })
        .collect()
}

/// Sends the uplinks' state to a running proxy, if there is one.
pub fn feed(
    feed: &Option<watch::Sender<Vec<ProxyUplink>>>,
    config: &Config,
    states: &[UplinkState],
) {
    if let Some(feed) = feed {
        feed.send_if_modified(|current| {
            let next = uplinks_from(config, states);
            let changed = *current != next;
            *current = next;
            changed
        });
    }
}
