//! Per-uplink counters of the proxy, and the snapshot the daemon serves in `status`.
//!
//! Plain atomics: every request touches them from its own task, and the status socket only ever
//! needs a consistent-enough snapshot, never a lock against the data path.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::{Deserialize, Serialize};

/// Counters of one uplink.
#[derive(Debug, Default)]
pub struct UplinkCounters {
    pub requests: AtomicU64,
    pub tunnels: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub dns_queries: AtomicU64,
}

impl UplinkCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Counters of the whole proxy: per uplink id, plus refusals by reason.
#[derive(Debug, Default)]
pub struct Counters {
    uplinks: Mutex<BTreeMap<u32, std::sync::Arc<UplinkCounters>>>,
    pub connections: AtomicU64,
    pub refused: AtomicU64,
    /// Connections from outside the LAN networks, closed at accept.
    pub strangers: AtomicU64,
    /// Connections over `max_client_connections` or `max_connections`, closed at accept.
    pub over_limit: AtomicU64,
}

impl Counters {
    /// The counters of uplink `id`, created on first use.
    pub fn uplink(&self, id: u32) -> std::sync::Arc<UplinkCounters> {
        match self.uplinks.lock() {
            Ok(mut map) => map.entry(id).or_default().clone(),
            // A poisoned map only loses counting, never traffic.
            Err(_) => std::sync::Arc::default(),
        }
    }

    pub fn snapshot(&self, names: &BTreeMap<u32, String>) -> ProxyStatus {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let uplinks = self
            .uplinks
            .lock()
            .map(|map| {
                map.iter()
                    .map(|(id, c)| ProxyUplinkStatus {
                        id: *id,
                        name: names.get(id).cloned().unwrap_or_default(),
                        requests: load(&c.requests),
                        tunnels: load(&c.tunnels),
                        bytes_up: load(&c.bytes_up),
                        bytes_down: load(&c.bytes_down),
                        upstream_errors: load(&c.upstream_errors),
                        dns_queries: load(&c.dns_queries),
                    })
                    .collect()
            })
            .unwrap_or_default();
        ProxyStatus {
            connections: load(&self.connections),
            refused: load(&self.refused),
            strangers: load(&self.strangers),
            over_limit: load(&self.over_limit),
            uplinks,
        }
    }
}

/// The `proxy` object of the status document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProxyStatus {
    /// Client connections accepted since start.
    pub connections: u64,
    /// Requests refused with a 4xx/5xx by the proxy itself (not by a server).
    pub refused: u64,
    /// Connections from outside the LAN networks, closed at accept without an answer.
    #[serde(default)]
    pub strangers: u64,
    /// Connections over the per-client or total cap, closed at accept.
    #[serde(default)]
    pub over_limit: u64,
    pub uplinks: Vec<ProxyUplinkStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProxyUplinkStatus {
    pub id: u32,
    pub name: String,
    /// Plain HTTP requests forwarded through this uplink.
    pub requests: u64,
    /// CONNECT tunnels opened through this uplink.
    pub tunnels: u64,
    /// Body and tunnel bytes sent towards servers.
    pub bytes_up: u64,
    /// Body and tunnel bytes received from servers.
    pub bytes_down: u64,
    /// Failed DNS lookups and connects through this uplink.
    pub upstream_errors: u64,
    /// DNS queries sent out of this uplink.
    pub dns_queries: u64,
}

/// The proxy section of `balancer status`.
pub fn table(status: &ProxyStatus) -> String {
    use std::fmt::Write as _;
    let mut text = format!(
        "proxy: {} connection(s), {} refused, {} stranger(s) and {} over the limits closed\n{:<12} {:>3} {:>9} {:>8} {:>14} {:>14} {:>7} {:>6}\n",
        status.connections,
        status.refused,
        status.strangers,
        status.over_limit,
        "UPLINK",
        "ID",
        "REQUESTS",
        "TUNNELS",
        "BYTES UP",
        "BYTES DOWN",
        "ERRORS",
        "DNS"
    );
    for u in &status.uplinks {
        let _ = writeln!(
            text,
            "{:<12} {:>3} {:>9} {:>8} {:>14} {:>14} {:>7} {:>6}",
            u.name,
            u.id,
            u.requests,
            u.tunnels,
            u.bytes_up,
            u.bytes_down,
            u.upstream_errors,
            u.dns_queries
        );
    }
    text
}
