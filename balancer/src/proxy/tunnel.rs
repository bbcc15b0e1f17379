//! CONNECT tunnels: only to `connect_ports`, through the policy's uplink, moved both ways by
//! `splice` (or copied, should the client side not be a plain socket) until both sides end, or
//! nothing moves for the idle timeout, or the uplink is released; logged when they end.

use std::sync::Arc;

use hyper::{Request, Response, StatusCode, body::Incoming, upgrade::Upgraded};
use hyper_util::rt::TokioIo;
use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::{
    counters::UplinkCounters,
    http::{Body, ConnContext, Record, full, refuse, target, upstream_refusal},
    io::{Activity, Watched},
    splice, upstream,
};

/// What the client side of a CONNECT is underneath hyper's upgrade (see `listener`).
type ClientIo = TokioIo<Watched<TcpStream>>;

/// Each direction's copy buffer where bytes are copied (WebSocket upgrades): 8 KiB (tokio's
/// default) costs a system call pair per 8 KiB; 64 KiB matches what a socket delivers per read
/// at full rate.
pub(super) const TUNNEL_BUFFER: usize = 64 * 1024;

pub(super) async fn tunnel(
    context: Arc<ConnContext>,
    request: Request<Incoming>,
    record: &mut Record,
) -> Response<Body> {
    let shared = &context.shared;
    let Some((host, port)) = target(request.uri(), None) else {
        return refuse(
            shared,
            StatusCode::BAD_REQUEST,
            "CONNECT needs host:port as its target",
        );
    };
    if !shared.settings.connect_ports.contains(&port) {
        return refuse(
            shared,
            StatusCode::FORBIDDEN,
            &format!("CONNECT to port {port} is not allowed (proxy.connect_ports)"),
        );
    }
    let connected = match upstream::connect(shared, context.client.ip(), &host, port).await {
        Ok(connected) => connected,
        Err(error) => return upstream_refusal(shared, &error),
    };
    UplinkCounters::add(&connected.counters.tunnels, 1);
    if let Ok(mut window) = context.window.lock() {
        window.stop();
    }
    let idle = shared.settings.limits.idle_timeout;
    let slot = context.slot.clone();
    let log = shared.access_log.clone();
    let mut entry = record.entry.clone();
    entry.uplink = Some(connected.way());
    entry.status = 200;
    entry.host = host;
    let clock = record.clock;
    let doom = shared.reaper.subscribe(connected.uplink.id);
    record.deferred = true;
    tokio::spawn(async move {
        let _slot = slot;
        let Ok(upgraded) = hyper::upgrade::on(request).await else {
            return;
        };
        let activity = Activity::new();
        let moved = run(
            upgraded,
            connected.stream,
            activity.clone(),
            connected.counters,
        );
        tokio::select! {
            () = moved => {}
            () = activity.idle(idle) => {}
            () = doom.wait() => {}
        }
        if let Some(log) = log {
            // What came from the server, however the tunnel ended.
            entry.bytes = activity.bytes_read();
            entry.elapsed = clock.elapsed();
            log.record(&entry);
        }
    });
    Response::new(full(String::new()))
}

/// Moves the tunnel's bytes until both sides end or either fails; `activity` hears of every
/// chunk, and counts what came from the server.
async fn run(
    upgraded: Upgraded,
    mut server: TcpStream,
    activity: Arc<Activity>,
    counters: Arc<UplinkCounters>,
) {
    match upgraded.downcast::<ClientIo>() {
        Ok(parts) => {
            let client = parts.io.into_inner().into_inner();
            // What the client sent right behind its CONNECT head (a TLS hello, say).
            if !parts.read_buf.is_empty() {
                if server.write_all(&parts.read_buf).await.is_err() {
                    return;
                }
                activity.moved_up(parts.read_buf.len() as u64, &counters);
            }
            let up = |n: usize| activity.moved_up(n as u64, &counters);
            let down = |n: usize| activity.moved_down(n as u64, &counters);
            if let Err(error) = splice::join(&client, &server, &up, &down).await {
                tracing::debug!(%error, "tunnel ended");
            }
        }
        Err(upgraded) => {
            let mut client = TokioIo::new(upgraded);
            let mut server = Watched::upstream(server, activity, counters);
            let _ = tokio::io::copy_bidirectional_with_sizes(
                &mut client,
                &mut server,
                TUNNEL_BUFFER,
                TUNNEL_BUFFER,
            )
            .await;
        }
    }
}
