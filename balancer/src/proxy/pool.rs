//! Idle upstream HTTP/1.1 connections shared by every client: a response that leaves its
//! upstream connection reusable hands it here when its body has ended, and a later plain
//! request from any client, sent out of the same uplink to the same origin, takes it instead of
//! a TCP handshake and a TIME_WAIT on the gateway (squid's `server_persistent_connections`).
//!
//! Keyed by uplink, the uplink's reaper generation and source address, and the origin's socket
//! address: a connection of a released uplink (generation moved) or of an old address is never
//! handed out again, and the reaper closes it anyway. Capped per key and in all, and closed
//! after [`IDLE_TIMEOUT`] unused, shorter than typical servers' keep-alive, so a server rarely
//! closes one just as it is taken (and when it does, `forward` retries once).

use std::{
    collections::{HashMap, VecDeque},
    net::{Ipv4Addr, SocketAddrV4},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::{
    body::{Body as HttpBody, Frame, Incoming, SizeHint},
    client::conn::http1::SendRequest,
};

use super::{
    forward::{Reusable, Upstream},
    http::{Body, ConnContext},
};

/// How long a connection waits here unused before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Idle connections kept per key: enough for a burst of fresh clients to one origin.
const MAX_PER_KEY: usize = 16;
/// Idle connections kept in all (each holds a file descriptor).
pub const MAX_IDLE: usize = 256;
/// How often expired and closed connections are swept out.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Where an upstream connection leads and by which way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub uplink: u32,
    /// The reaper's generation of the uplink when the connection was opened.
    pub generation: u64,
    /// The source address it was bound to (`None`: an office destination by the main table).
    pub source: Option<Ipv4Addr>,
    pub origin: SocketAddrV4,
}

struct Idle {
    sender: SendRequest<Body>,
    upstream: Upstream,
    since: Instant,
}

#[derive(Default)]
struct Entries {
    by_key: HashMap<PoolKey, VecDeque<Idle>>,
    count: usize,
}

impl Entries {
    /// Drops expired and closed connections (dropping the sender closes an idle connection).
    fn sweep(&mut self, now: Instant) {
        let mut count = 0;
        self.by_key.retain(|_, idle| {
            idle.retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < IDLE_TIMEOUT);
            count += idle.len();
            !idle.is_empty()
        });
        self.count = count;
    }
}

#[derive(Default)]
pub struct Pool {
    entries: Mutex<Entries>,
}

impl Pool {
    /// The most recently pooled live connection for `key`, if any.
    pub fn take(&self, key: &PoolKey, now: Instant) -> Option<(SendRequest<Body>, Upstream)> {
        let mut entries = self.entries.lock().ok()?;
        let idle = entries.by_key.get_mut(key)?;
        let mut found = None;
        let mut removed = 0;
        while let Some(candidate) = idle.pop_back() {
            removed += 1;
            if !candidate.sender.is_closed() && now.duration_since(candidate.since) < IDLE_TIMEOUT {
                found = Some((candidate.sender, candidate.upstream));
                break;
            }
        }
        if idle.is_empty() {
            entries.by_key.remove(key);
        }
        entries.count = entries.count.saturating_sub(removed);
        found
    }

    /// Keeps a connection whose last response ended cleanly; over a cap it is closed instead.
    pub fn put(&self, sender: SendRequest<Body>, upstream: Upstream, now: Instant) {
        if sender.is_closed() {
            return;
        }
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.count >= MAX_IDLE {
            entries.sweep(now);
            if entries.count >= MAX_IDLE {
                return;
            }
        }
        let idle = entries.by_key.entry(upstream.key).or_default();
        if idle.len() >= MAX_PER_KEY {
            return;
        }
        idle.push_back(Idle {
            sender,
            upstream,
            since: now,
        });
        entries.count += 1;
    }

    /// Sweeps expired and closed connections out now and then, so an idle office does not keep
    /// upstream sockets open past [`IDLE_TIMEOUT`].
    pub async fn sweep_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tick.tick().await;
            if let Ok(mut entries) = self.entries.lock() {
                entries.sweep(Instant::now());
            }
        }
    }
}

/// Where a reusable upstream connection goes when its response has ended.
pub(super) enum Home {
    /// The client connection stays open: its next request to the same host takes it.
    Client(Arc<ConnContext>),
    /// The client connection closes after this response: any client may take it.
    Pool(Arc<Pool>),
}

/// A response body that hands its upstream connection back once the last byte has been read
/// from the server. A body dropped before its end leaves the connection mid-message, so it is
/// dropped (closed) instead.
pub(super) struct ReturnOnEnd {
    inner: Incoming,
    /// In a Mutex only to make the body `Sync` (the sender is not); never contended.
    kept: Mutex<Option<(Reusable, Home)>>,
}

impl ReturnOnEnd {
    pub fn new(inner: Incoming, kept: Reusable, home: Home) -> Self {
        let mut body = ReturnOnEnd {
            inner,
            kept: Mutex::new(Some((kept, home))),
        };
        // A body that has nothing to read (HEAD, 204, 304, an empty one) may never be polled.
        if body.inner.is_end_stream() {
            body.finish();
        }
        body
    }

    fn finish(&mut self) {
        let Some((kept, home)) = self.kept.get_mut().ok().and_then(Option::take) else {
            return;
        };
        match home {
            Home::Client(context) => {
                if let Ok(mut slot) = context.upstream.lock() {
                    *slot = Some(kept);
                }
            }
            Home::Pool(pool) => pool.put(kept.sender, kept.upstream, Instant::now()),
        }
    }

    fn abandon(&mut self) {
        if let Ok(kept) = self.kept.get_mut() {
            *kept = None;
        }
    }
}

impl HttpBody for ReturnOnEnd {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.finish(),
            Poll::Ready(Some(Err(_))) => this.abandon(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use hyper_util::rt::TokioIo;

    use super::*;

    fn key(uplink: u32, generation: u64) -> PoolKey {
        PoolKey {
            uplink,
            generation,
            source: Some(Ipv4Addr::new(198, 18, 1, 2)),
            origin: SocketAddrV4::new(Ipv4Addr::new(198, 18, 9, 1), 80),
        }
    }

    /// A client connection over an in-memory pipe: the sender, and the server end (dropping it
    /// closes the connection).
    async fn connection() -> (SendRequest<Body>, tokio::io::DuplexStream) {
        let (client, server) = tokio::io::duplex(1024);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client))
            .await
            .unwrap();
        tokio::spawn(connection);
        (sender, server)
    }

    #[tokio::test]
    async fn hands_out_live_connections_by_key_until_they_idle_out() {
        let pool = Pool::default();
        let now = Instant::now();
        let (sender, _server) = connection().await;
        pool.put(sender, Upstream::for_test(key(1, 0)), now);
        assert!(pool.take(&key(2, 0), now).is_none(), "another uplink");
        assert!(pool.take(&key(1, 1), now).is_none(), "a released uplink");
        assert!(pool.take(&key(1, 0), now).is_some());
        assert!(pool.take(&key(1, 0), now).is_none(), "taken once");

        let (sender, _server) = connection().await;
        pool.put(sender, Upstream::for_test(key(1, 0)), now);
        assert!(
            pool.take(&key(1, 0), now + IDLE_TIMEOUT).is_none(),
            "idled out"
        );

        let (sender, server) = connection().await;
        pool.put(sender, Upstream::for_test(key(1, 0)), now);
        drop(server);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(pool.take(&key(1, 0), now).is_none(), "closed by the server");
    }

    #[tokio::test]
    async fn keeps_at_most_the_cap_per_key() {
        let pool = Pool::default();
        let now = Instant::now();
        let mut servers = Vec::new();
        for _ in 0..MAX_PER_KEY + 2 {
            let (sender, server) = connection().await;
            servers.push(server);
            pool.put(sender, Upstream::for_test(key(1, 0)), now);
        }
        let mut taken = 0;
        while pool.take(&key(1, 0), now).is_some() {
            taken += 1;
        }
        assert_eq!(taken, MAX_PER_KEY);
    }
}
