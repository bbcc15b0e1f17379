//! The multisourcing forward proxy: an HTTP/1.1 proxy (absolute-form requests and CONNECT
//! tunnels) whose upstream connections leave by the uplinks, each bound to an uplink's source
//! address so the `from <source>` policy rules carry it.
//!
//! One module per concern: `listener` (accepting, who may connect, limits, timeouts), `http`
//! (dispatch and refusals), `forward` (plain requests and WebSocket upgrades), `tunnel`
//! (CONNECT), `splice` (a tunnel's bytes moved inside the kernel), `headers` (what RFC 9110/9112 ask of a proxy's headers), `policy` (which
//! uplink), `upstream` (resolve, check, connect, race), `pool` (idle upstream connections any
//! client may reuse), `dns` (queries out of an uplink), `dns_cache` (answers kept by TTL, per uplink),
//! `guard` (forbidden and refused destinations), `pac` (the proxy auto-config file),
//! `access_log` (one line per request), `reaper` (closing what runs on a dead uplink), `io` (activity and raw head window), `counters`
//! (per-uplink counters for `balancer status`).
//!
//! The proxy only reports observations; it never writes routes. It learns which uplinks are
//! usable, and which networks it refuses, from a watch channel the daemon feeds after each
//! reconcile. It runs on worker threads of its own, so its load never delays the control loop
//! or the health probes.

mod access_log;
mod counters;
mod dns;
mod dns_cache;
mod forward;
mod guard;
mod headers;
mod http;
mod io;
mod listener;
mod pac;
mod policy;
mod pool;
mod reaper;
mod splice;
mod tunnel;
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
    plan::Observed,
    state::Status,
    uplink::UplinkState,
};

/// How often the counters are copied into the status document.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(250);
/// The proxy's own worker threads: enough to use both cores of a small gateway, never so many
/// that it starves the daemon's.
const WORKER_THREADS: usize = 2;
/// How often a stopped proxy looks whether its last connection has ended.
const DRAIN_POLL: Duration = Duration::from_millis(500);
/// File descriptors per client: the client socket, the upstream socket and a spare handle on
/// the client socket (for the 408 answer) while a request head is awaited, or two pipes (four
/// descriptors) once it is a spliced tunnel.
const FDS_PER_CLIENT: u64 = 6;

/// What the daemon tells the proxy after each reconcile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub uplinks: Vec<ProxyUplink>,
    /// Destinations refused unless `proxy.allow` opens them: see [`refused_networks`].
    pub refused: Vec<Ipv4Net>,
    /// How many times each uplink's connections were given up (`health::release`): when the
    /// count moves, what runs on that uplink is closed.
    pub released: BTreeMap<u32, u64>,
}

/// The sending half the daemon keeps.
pub type Feed = watch::Sender<View>;

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
    #[error("listening on {address} on LAN interface {interface} for the proxy")]
    Listen {
        address: SocketAddrV4,
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the proxy's access log {path}")]
    AccessLog {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the proxy's worker threads")]
    Runtime(#[source] std::io::Error),
}

/// State shared by every connection.
struct Shared {
    settings: Settings,
    lan: Vec<Ipv4Net>,
    view: watch::Receiver<View>,
    /// Our Via pseudonym; a request that already carries it has looped back to us.
    via: String,
    access_log: Option<access_log::AccessLog>,
    reaper: Arc<reaper::Reaper>,
    dns_cache: dns_cache::DnsCache,
    pool: Arc<pool::Pool>,
    chooser: Mutex<policy::Chooser>,
    counters: counters::Counters,
    local: guard::LocalAddresses,
    names: BTreeMap<u32, String>,
}

/// A bound proxy, not yet serving.
pub struct Proxy {
    /// One per LAN interface, each bound to its interface, so nothing that arrives through an
    /// uplink reaches the proxy even when it is addressed to the LAN address.
    listeners: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Binds the listening socket, so a taken or missing address fails the daemon's start
    /// before anything is changed.
    pub async fn bind(
        config: &Config,
        settings: Settings,
        view: watch::Receiver<View>,
    ) -> Result<Proxy, ProxyError> {
        let listeners = config
            .lan
            .interfaces
            .iter()
            .map(|interface| {
                listener::bind(settings.listen, interface, settings.limits.max_connections)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let access_log = settings
            .access_log
            .clone()
            .map(access_log::AccessLog::open)
            .transpose()?;
        raise_file_limit(settings.limits.max_connections);
        let chooser = policy::Chooser::new(settings.policy, settings.sticky_timeout);
        let names = config
            .uplinks
            .iter()
            .map(|u| (u.id, u.name.clone()))
            .collect();
        let via = headers::pseudonym(settings.listen);
        Ok(Proxy {
            listeners,
            shared: Arc::new(Shared {
                settings,
                lan: config.lan.networks.clone(),
                view,
                via,
                access_log,
                reaper: Arc::default(),
                dns_cache: dns_cache::DnsCache::default(),
                pool: Arc::default(),
                chooser: Mutex::new(chooser),
                counters: counters::Counters::default(),
                local: guard::LocalAddresses::default(),
                names,
            }),
        })
    }

    /// Serves clients on the proxy's own worker threads, and keeps `status.proxy` up to date,
    /// until the process ends or the returned handle stops it (a reload). Connections already
    /// accepted go on after a stop, still watched by the reaper (a dead uplink's tunnels are
    /// closed as before); once the last of them has ended, the runtime and its threads end.
    pub fn spawn(self, status: Arc<Mutex<Status>>) -> Result<ProxyHandle, ProxyError> {
        tracing::info!(listen = %self.shared.settings.listen, policy = ?self.shared.settings.policy, "proxy serving");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name("proxy")
            .enable_all()
            .build()
            .map_err(ProxyError::Runtime)?;
        let shared = self.shared.clone();
        let admission = Arc::new(listener::Admission::new(&shared.settings.limits));
        // Stopped by the handle: the listeners and the status publisher. The reaper, the
        // pool's sweep and the log's reopening serve the accepted connections until they end.
        let mut tasks = Vec::new();
        for listener in self.listeners {
            let shared = shared.clone();
            let admission = admission.clone();
            tasks.push(runtime.spawn(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => listener::serve(listener, shared, admission).await,
                    Err(error) => tracing::error!(%error, "proxy listener lost"),
                }
            }));
        }
        runtime.spawn(reaper::run(shared.reaper.clone(), shared.view.clone()));
        runtime.spawn(shared.pool.clone().sweep_forever());
        if let Some(log) = &shared.access_log {
            runtime.spawn(log.clone().reopen_on_sighup());
        }
        let stopped = Arc::new(tokio::sync::Notify::new());
        let drained = {
            let stopped = stopped.clone();
            async move {
                stopped.notified().await;
                while !admission.is_idle() {
                    tokio::time::sleep(DRAIN_POLL).await;
                }
            }
        };
        std::thread::Builder::new()
            .name("proxy".into())
            .spawn(move || {
                runtime.block_on(drained);
                tracing::info!("stopped proxy: its last connection ended, its threads end");
                // Dropping the runtime ends its worker threads and drops the tasks above,
                // and with them the pool's idle upstream connections.
                drop(runtime);
            })
            .map_err(ProxyError::Runtime)?;
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
        tasks.push(publish);
        Ok(ProxyHandle { tasks, stopped })
    }
}

/// A serving proxy's listener and publisher.
pub struct ProxyHandle {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Tells the runtime's thread to end the runtime once no connection is left.
    stopped: Arc<tokio::sync::Notify>,
}

impl ProxyHandle {
    /// Stops accepting and publishing, and waits until the listening socket is closed, so a new
    /// proxy can bind the same address. The runtime ends once its accepted connections have.
    pub async fn stop(self) {
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
        self.stopped.notify_one();
    }
}

/// Raises the soft (and if need be the hard) limit on open files so `max_connections` clients
/// fit: under systemd's default of 1,024 the proxy would fail near 330 clients.
fn raise_file_limit(max_connections: u32) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let wanted = u64::from(max_connections) * FDS_PER_CLIENT + pool::MAX_IDLE as u64 + 1024;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= wanted {
        return;
    }
    let hard = hard.max(wanted);
    if let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, wanted, hard)
        .or_else(|_| setrlimit(Resource::RLIMIT_NOFILE, hard.min(wanted), hard))
    {
        tracing::warn!(%error, wanted, soft, "cannot raise the open file limit for the proxy");
    }
}

/// The destinations the proxy refuses unless `proxy.allow` opens them: the LAN networks and
/// each uplink's subnet (the modems' admin pages), so the proxy, which connects from the
/// gateway itself, is no way around the firewall between office segments; and the office
/// destinations (routes through non-uplink interfaces: a branch office, a VPN).
pub fn refused_networks(config: &Config, observed: &Observed) -> Vec<Ipv4Net> {
    let mut refused = config.lan.networks.clone();
    refused.extend(
        crate::office::office_routes(config, observed)
            .iter()
            .map(|route| route.destination.trunc()),
    );
    for uplink in &config.uplinks {
        let Some(link) = observed
            .links
            .iter()
            .find(|l| l.interface.name == uplink.interface)
        else {
            continue;
        };
        refused.extend(
            observed
                .addresses
                .iter()
                .filter(|a| a.ifindex == link.interface.index)
                .map(|a| a.network.trunc()),
        );
    }
    refused.sort();
    refused.dedup();
    refused
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

/// Sends the uplinks' state and the refused networks to a running proxy, if there is one.
pub fn feed(
    feed: &Option<Feed>,
    config: &Config,
    states: &[UplinkState],
    refused: Vec<Ipv4Net>,
    released: &BTreeMap<u32, u64>,
) {
    if let Some(feed) = feed {
        feed.send_if_modified(|current| {
            let next = View {
                uplinks: uplinks_from(config, states),
                refused,
                released: released.clone(),
            };
            let changed = *current != next;
            *current = next;
            changed
        });
    }
}

/// Tells a running proxy that uplinks' connections were given up, between reconciles.
pub fn released(feed: &Option<Feed>, released: &BTreeMap<u32, u64>) {
    if let Some(feed) = feed {
        feed.send_if_modified(|current| {
            let changed = current.released != *released;
            current.released = released.clone();
            changed
        });
    }
}
