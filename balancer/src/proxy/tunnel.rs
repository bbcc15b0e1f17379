//! CONNECT tunnels: only to `connect_ports`, through the policy's uplink, copied both ways until
//! either side ends or nothing moves for the idle timeout; logged when they end.

use std::sync::Arc;

use hyper::{Request, Response, StatusCode, body::Incoming};
use hyper_util::rt::TokioIo;

use super::{
    counters::UplinkCounters,
    http::{Body, ConnContext, Record, full, refuse, target, upstream_refusal},
    io::{Activity, Watched},
    upstream,
};

/// Each direction's copy buffer: 8 KiB (tokio's default) costs a system call pair per 8 KiB;
/// 64 KiB matches what a socket delivers per read at full rate.
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
        let mut client = TokioIo::new(upgraded);
        let activity = Activity::new();
        let mut server = Watched::upstream(connected.stream, activity.clone(), connected.counters);
        tokio::select! {
            _ = tokio::io::copy_bidirectional_with_sizes(
                &mut client, &mut server, TUNNEL_BUFFER, TUNNEL_BUFFER,
            ) => {}
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
