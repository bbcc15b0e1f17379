//! Accepting clients and the limits that keep one client from tying the proxy up: a cap on
//! connections served at once, a deadline for each request head (slowloris), a cap on head
//! size, and an idle timeout.

use std::{
    io::Write,
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
};

use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Semaphore,
};

use super::{
    ProxyError, Shared, counters::UplinkCounters, http::ConnContext, io::Activity, io::Watched,
    io::Window,
};

/// What a client whose head did not arrive in time gets before the connection closes.
const TIMEOUT_RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nContent-Length: 31\r\nConnection: close\r\n\r\nrequest head not read in time\r\n";

pub(super) fn bind(address: SocketAddrV4, max_connections: u32) -> Result<TcpListener, ProxyError> {
    let error = |source| ProxyError::Listen { address, source };
    let socket = TcpSocket::new_v4().map_err(error)?;
    // A restarted daemon must not wait for the old socket's TIME_WAIT connections.
    socket.set_reuseaddr(true).map_err(error)?;
    socket.bind(SocketAddr::V4(address)).map_err(error)?;
    socket.listen(max_connections.min(4096)).map_err(error)
}

pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(
        shared.settings.limits.max_connections as usize,
    ));
    loop {
        // Wait for a free slot before accepting: beyond the cap, clients wait in the kernel's
        // accept queue instead of costing memory here.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off a little instead of spinning.
                tracing::warn!(%error, "proxy accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        UplinkCounters::add(&shared.counters.connections, 1);
        let shared = shared.clone();
        tokio::spawn(async move {
            let permit = Arc::new(permit);
            if let Err(error) = connection(stream, peer, shared, permit).await {
                tracing::debug!(%peer, %error, "proxy connection setup failed");
            }
        });
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    permit: Arc<tokio::sync::OwnedSemaphorePermit>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    // A second handle on the socket: hyper owns the stream, and when it gives up on a slow head
    // it only closes; this handle lets the client hear why.
    let std_stream = stream.into_std()?;
    let spare = std_stream.try_clone()?;
    let stream = TcpStream::from_std(std_stream)?;
    let limits = &shared.settings.limits;
    let max_header = limits.max_header_bytes as usize;
    let activity = Activity::new();
    let window = Window::new(max_header);
    let io = TokioIo::new(Watched::client(stream, activity.clone(), window.clone()));
    let context = Arc::new(ConnContext {
        shared: shared.clone(),
        client: peer,
        window,
        permit,
        upstream: tokio::sync::Mutex::new(None),
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
