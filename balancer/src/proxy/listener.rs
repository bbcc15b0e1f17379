//! Accepting clients and the limits that keep one client from tying the proxy up: only LAN
//! clients on LAN interfaces, a cap on connections per client and in all, a deadline for each request head (slowloris), a cap on head
//! size, and an idle timeout.

use std::{
    collections::HashMap,
    io::Write,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
};

use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use super::{
    ProxyError, Shared, counters::UplinkCounters, http::ConnContext, io::Activity, io::Watched,
    io::Window,
};
use crate::config::proxy::Limits;

/// What a client whose head did not arrive in time gets before the connection closes.
const TIMEOUT_RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nContent-Length: 31\r\nConnection: close\r\n\r\nrequest head not read in time\r\n";

/// A listening socket on `address`, bound to LAN interface `interface` (SO_BINDTODEVICE): a
/// connection to the same address that arrives through an uplink finds no socket and is reset.
pub(super) fn bind(
    address: SocketAddrV4,
    interface: &str,
    max_connections: u32,
) -> Result<std::net::TcpListener, ProxyError> {
    let error = |source| ProxyError::Listen {
        address,
        interface: interface.to_string(),
        source,
    };
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).map_err(error)?;
    // A restarted daemon must not wait for the old socket's TIME_WAIT connections.
    socket.set_reuse_address(true).map_err(error)?;
    socket
        .bind_device(Some(interface.as_bytes()))
        .map_err(error)?;
    socket
        .bind(&SocketAddr::V4(address).into())
        .map_err(error)?;
    let backlog = i32::try_from(max_connections.min(4096)).unwrap_or(4096);
    socket.listen(backlog).map_err(error)?;
    socket.set_nonblocking(true).map_err(error)?;
    Ok(socket.into())
}

/// Who may take a connection slot: LAN clients only, at most `max_client_connections` each and
/// `max_connections` in all. Decided right after accept, before a byte is read, so strangers
/// and floods cost a close and nothing else.
pub(super) struct Admission {
    slots: Arc<Semaphore>,
    per_client: Mutex<HashMap<IpAddr, u32>>,
    max_per_client: u32,
}

/// A connection's place in [`Admission`], given back when the connection (or its tunnel) ends.
pub(super) struct Slot {
    _permit: OwnedSemaphorePermit,
    admission: Arc<Admission>,
    client: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut clients) = self.admission.per_client.lock()
            && let Some(count) = clients.get_mut(&self.client)
        {
            *count -= 1;
            if *count == 0 {
                clients.remove(&self.client);
            }
        }
    }
}

impl Admission {
    pub(super) fn new(limits: &Limits) -> Self {
        Admission {
            slots: Arc::new(Semaphore::new(limits.max_connections as usize)),
            per_client: Mutex::new(HashMap::new()),
            max_per_client: limits.max_client_connections,
        }
    }

    /// Whether no connection holds a slot: every accepted client, request and tunnel has ended.
    pub(super) fn is_idle(&self) -> bool {
        self.per_client
            .lock()
            .is_ok_and(|clients| clients.is_empty())
    }

    fn admit(self: &Arc<Self>, client: IpAddr) -> Option<Slot> {
        let mut clients = self.per_client.lock().ok()?;
        let count = clients.entry(client).or_insert(0);
        if *count >= self.max_per_client {
            return None;
        }
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        *count += 1;
        Some(Slot {
            _permit: permit,
            admission: self.clone(),
            client,
        })
    }
}

/// Whether `peer` is a LAN client: inside the LAN networks.
fn is_lan_client(shared: &Shared, peer: IpAddr) -> bool {
    match peer {
        IpAddr::V4(peer) => shared.lan.iter().any(|net| net.contains(&peer)),
        IpAddr::V6(_) => false,
    }
}

pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, admission: Arc<Admission>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off a little instead of spinning.
                tracing::warn!(%error, "proxy accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if !is_lan_client(&shared, peer.ip()) {
            // No HTTP answer: a stranger learns nothing and holds nothing.
            UplinkCounters::add(&shared.counters.strangers, 1);
            drop(stream);
            continue;
        }
        let Some(slot) = admission.admit(peer.ip()) else {
            UplinkCounters::add(&shared.counters.over_limit, 1);
            drop(stream);
            continue;
        };
        UplinkCounters::add(&shared.counters.connections, 1);
        let shared = shared.clone();
        tokio::spawn(async move {
            let slot = Arc::new(slot);
            if let Err(error) = connection(stream, peer, shared, slot).await {
                tracing::debug!(%peer, %error, "proxy connection setup failed");
            }
        });
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    slot: Arc<Slot>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    // A second handle on the socket: hyper owns the stream, and when it gives up on a slow head
    // it only closes; this handle lets the client hear why.
    // A dup of the descriptor, leaving the stream registered with the reactor (a round trip
    // through std would deregister and register it again: two system calls per client).
    let spare: std::net::TcpStream = socket2::SockRef::from(&stream).try_clone()?.into();
    let limits = &shared.settings.limits;
    let max_header = limits.max_header_bytes as usize;
    let activity = Activity::new();
    let window = Window::new(max_header);
    let io = TokioIo::new(Watched::client(stream, activity.clone(), window.clone()));
    let context = Arc::new(ConnContext {
        shared: shared.clone(),
        client: peer,
        window,
        slot,
        upstream: Mutex::new(None),
    });
    let service = service_fn(move |request| super::http::handle(context.clone(), request));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Also bounds how long an idle keep-alive connection waits for its next request.
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(max_header)
        .keep_alive(true);
    let served = builder.serve_connection(io, service).with_upgrades();
    tokio::select! {
        result = served => {
            if let Err(error) = result
                && error.is_timeout()
            {
                tracing::debug!(%peer, "request head not read in time");
                UplinkCounters::add(&shared.counters.refused, 1);
                let _ = (&spare).write(TIMEOUT_RESPONSE);
                let _ = spare.shutdown(std::net::Shutdown::Both);
            }
        }
        // A response stuck on a silent server: the client connection is closed.
        () = activity.idle(limits.idle_timeout) => {}
    }
    Ok(())
}
