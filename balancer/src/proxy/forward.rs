//! Plain (absolute-form) requests: only to `http_ports`, through a kept upstream connection when
//! the client's last request went to the same host, else an idle one from the shared `pool` on
//! the uplink the policy picked, retried once on a fresh connection when a kept or pooled one
//! turns out closed (idempotent requests without a body), and WebSocket upgrades spliced into a
//! tunnel after the server's 101.

use std::{sync::Arc, time::Instant};

use http_body_util::BodyExt;
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode, Uri,
    body::{Body as _, Incoming},
    client::conn::http1::SendRequest,
    header::{self, HeaderValue},
};
use hyper_util::rt::TokioIo;

use super::{
    ProxyUplink, Shared,
    counters::UplinkCounters,
    headers::{self, MaxForwards},
    http::{Body, ConnContext, Record, full, refuse, target, upstream_refusal},
    io::{Activity, Watched},
    pool::{Home, PoolKey, ReturnOnEnd},
    tunnel::TUNNEL_BUFFER,
    upstream,
};

/// Methods whose request may be sent twice (RFC 9110 section 9.2.2).
const IDEMPOTENT: [Method; 6] = [
    Method::GET,
    Method::HEAD,
    Method::OPTIONS,
    Method::TRACE,
    Method::PUT,
    Method::DELETE,
];

/// What the proxy answers itself to OPTIONS with Max-Forwards: 0.
const ALLOW: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH, CONNECT";

/// An upstream HTTP/1.1 connection kept for the client connection's next request to the same
/// host: keep-alive on both sides, as squid does, instead of a TCP handshake and a TIME_WAIT on
/// the gateway per request. A keep-alive client connection is one flow on one uplink; when it
/// closes, its kept connection goes to the shared pool.
pub(super) struct Reusable {
    pub host: String,
    pub port: u16,
    pub sender: SendRequest<Body>,
    pub upstream: Upstream,
}

/// The uplink an upstream connection leaves by, and where it leads.
#[derive(Clone)]
pub(super) struct Upstream {
    counters: Arc<UplinkCounters>,
    uplink: String,
    pub key: PoolKey,
}

impl Upstream {
    /// An upstream of no uplink in particular, for the pool's unit tests.
    #[cfg(test)]
    pub(super) fn for_test(key: PoolKey) -> Upstream {
        Upstream {
            counters: Arc::default(),
            uplink: "test".to_string(),
            key,
        }
    }
}

pub(super) async fn forward(
    context: &Arc<ConnContext>,
    request: Request<Incoming>,
    record: &mut Record,
) -> Response<Body> {
    let shared = &context.shared;
    let uri = request.uri().clone();
    if uri.scheme_str() != Some("http") {
        return refuse(
            shared,
            StatusCode::BAD_REQUEST,
            "this is a proxy: send absolute-form http:// requests (https goes through CONNECT)",
        );
    }
    let Some((host, port)) = target(&uri, Some(80)) else {
        return refuse(shared, StatusCode::BAD_REQUEST, "request without a host");
    };
    if !shared
        .settings
        .http_ports
        .iter()
        .any(|(low, high)| (*low..=*high).contains(&port))
    {
        return refuse(
            shared,
            StatusCode::FORBIDDEN,
            &format!("plain requests to port {port} are not allowed (proxy.http_ports)"),
        );
    }
    let (mut parts, body) = request.into_parts();
    match headers::max_forwards(&parts.method, &mut parts.headers) {
        MaxForwards::AnswerHere => return answer_here(&parts.method, &parts.uri, &parts.headers),
        MaxForwards::Forward | MaxForwards::Decremented => {}
    }
    let upgrade = headers::upgrade_requested(&parts.headers);
    let client_upgrade = upgrade.as_ref().map(|_| {
        let mut shell = Request::new(());
        *shell.extensions_mut() = std::mem::take(&mut parts.extensions);
        hyper::upgrade::on(shell)
    });
    let client_keeps_alive = headers::keeps_alive(parts.version, &parts.headers);
    let trailers = headers::accepts_trailers(&parts.headers);
    headers::strip_hop_by_hop(&mut parts.headers);
    if trailers {
        headers::ask_for_trailers(&mut parts.headers);
    }
    headers::add_via(&mut parts.headers, parts.version, &shared.via);
    if let Some(protocol) = &upgrade {
        parts.headers.insert(header::UPGRADE, protocol.clone());
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // RFC 9112 section 3.2.2: a proxy replaces Host with the target URI's authority, without
    // any userinfo.
    if let Some(value) = headers::host_value(&uri) {
        parts.headers.insert(header::HOST, value);
    }
    parts.uri = uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |p| Uri::from(p.clone()));
    parts.version = hyper::Version::HTTP_11;
    // A copy to send again, for a request that can be: idempotent and without a body.
    let again = (IDEMPOTENT.contains(&parts.method) && body.is_end_stream() && upgrade.is_none())
        .then(|| {
            (
                parts.method.clone(),
                parts.uri.clone(),
                parts.headers.clone(),
            )
        });

    let kept = if upgrade.is_none() {
        context
            .upstream
            .lock()
            .ok()
            .and_then(|mut kept| kept.take())
            .filter(|kept| kept.host == host && kept.port == port && !kept.sender.is_closed())
    } else {
        // An upgraded connection is the client's alone: never a kept one, never kept after.
        None
    };
    let mut reused = kept.is_some();
    let (mut sender, mut upstream) = match kept {
        Some(kept) => (kept.sender, kept.upstream),
        None => {
            let choice = match upstream::choose(shared, context.client.ip(), &host) {
                Ok(choice) => choice,
                Err(error) => return upstream_refusal(shared, &error),
            };
            // Only a request that may be sent again takes an idle connection: a server may
            // close one just as it goes out, and only such a request is then retried.
            let pooled = again
                .is_some()
                .then(|| pooled(shared, choice.uplink(), &host, port))
                .flatten();
            reused = pooled.is_some();
            match pooled {
                Some(pooled) => pooled,
                None => match open_upstream(context, &host, port, record, Some(choice)).await {
                    Ok(opened) => opened,
                    Err(refusal) => return refusal,
                },
            }
        }
    };
    record.entry.uplink = Some(upstream.uplink.clone());
    let outgoing = Request::from_parts(parts, body.boxed());
    if sender.ready().await.is_err() {
        // The kept connection closed meanwhile: a fresh one instead.
        match open_upstream(context, &host, port, record, None).await {
            Ok(opened) => (sender, upstream) = opened,
            Err(refusal) => return refusal,
        }
    }
    UplinkCounters::add(&upstream.counters.requests, 1);
    let mut response = match sender.send_request(outgoing).await {
        Ok(response) => response,
        Err(error) => {
            UplinkCounters::add(&upstream.counters.upstream_errors, 1);
            // A kept connection the server closed as the request went out: once more on a
            // fresh connection, when sending twice is harmless.
            let Some((method, path, headers)) = again.filter(|_| reused) else {
                return bad_gateway(context, &error);
            };
            tracing::debug!(%error, %host, "kept upstream connection closed; retrying once");
            match open_upstream(context, &host, port, record, None).await {
                Ok(opened) => (sender, upstream) = opened,
                Err(refusal) => return refusal,
            }
            UplinkCounters::add(&upstream.counters.requests, 1);
            match sender.send_request(rebuild(&method, &path, &headers)).await {
                Ok(response) => response,
                Err(error) => {
                    UplinkCounters::add(&upstream.counters.upstream_errors, 1);
                    return bad_gateway(context, &error);
                }
            }
        }
    };
    let mut reusable = None;
    if let (Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) =
        (client_upgrade, response.status())
    {
        if let Ok(mut window) = context.window.lock() {
            window.stop();
        }
        splice_upgrade(context, client_upgrade, &mut response);
    } else if upgrade.is_none() && headers::keeps_alive(response.version(), response.headers()) {
        reusable = Some(Reusable {
            host,
            port,
            sender,
            upstream,
        });
    }
    let (mut parts, body) = response.into_parts();
    headers::one_framing(&mut parts.headers);
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    headers::strip_hop_by_hop(&mut parts.headers);
    if parts.status == StatusCode::SWITCHING_PROTOCOLS
        && let Some(protocol) = protocol
    {
        parts.headers.insert(header::UPGRADE, protocol);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let body = match reusable {
        // Handed back when the server has sent the whole response, not before: until then the
        // connection is busy.
        Some(reusable) => {
            let home = if client_keeps_alive {
                Home::Client(context.clone())
            } else {
                Home::Pool(shared.pool.clone())
            };
            ReturnOnEnd::new(body, reusable, home).boxed()
        }
        None => body.boxed(),
    };
    Response::from_parts(parts, body)
}

/// An idle pooled connection out of `uplink` to where `host:port` leads now, if there is one.
fn pooled(
    shared: &Shared,
    uplink: &ProxyUplink,
    host: &str,
    port: u16,
) -> Option<(SendRequest<Body>, Upstream)> {
    let generation = shared.reaper.generation(uplink.id);
    let now = Instant::now();
    upstream::known_targets(shared, uplink, host, port)?
        .into_iter()
        .find_map(|(origin, source)| {
            shared.pool.take(
                &PoolKey {
                    uplink: uplink.id,
                    generation,
                    source,
                    origin,
                },
                now,
            )
        })
}

fn rebuild(method: &Method, uri: &Uri, headers: &HeaderMap) -> Request<Body> {
    let mut request = Request::new(full(String::new()));
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri.clone();
    *request.headers_mut() = headers.clone();
    request
}

fn bad_gateway(context: &ConnContext, error: &hyper::Error) -> Response<Body> {
    refuse(
        &context.shared,
        StatusCode::BAD_GATEWAY,
        &format!("upstream: {error}"),
    )
}

/// OPTIONS or TRACE with Max-Forwards: 0 ends here (RFC 9110 section 7.6.2).
fn answer_here(method: &Method, uri: &Uri, headers: &HeaderMap) -> Response<Body> {
    if method == Method::OPTIONS {
        let mut response = Response::new(full(String::new()));
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(ALLOW));
        return response;
    }
    // TRACE: the request as received, without credentials (RFC 9110 section 9.3.8).
    let mut echo = format!("TRACE {uri} HTTP/1.1\r\n");
    for (name, value) in headers {
        if [
            header::AUTHORIZATION,
            header::PROXY_AUTHORIZATION,
            header::COOKIE,
        ]
        .contains(name)
        {
            continue;
        }
        echo.push_str(&format!(
            "{name}: {}\r\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    let mut response = Response::new(full(echo));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("message/http"),
    );
    response
}

/// After a 101, both sides switch protocols: the client's and the server's connections are
/// joined by a plain copy until either ends or nothing moves for the idle timeout.
fn splice_upgrade(
    context: &ConnContext,
    client: hyper::upgrade::OnUpgrade,
    response: &mut Response<Incoming>,
) {
    let server = hyper::upgrade::on(response);
    let idle = context.shared.settings.limits.idle_timeout;
    let slot = context.slot.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let (Ok(client), Ok(server)) = (client.await, server.await) else {
            return;
        };
        let activity = Activity::new();
        let mut client = Watched::plain(TokioIo::new(client), activity.clone());
        let mut server = TokioIo::new(server);
        tokio::select! {
            _ = tokio::io::copy_bidirectional_with_sizes(
                &mut client, &mut server, TUNNEL_BUFFER, TUNNEL_BUFFER,
            ) => {}
            () = activity.idle(idle) => {}
        }
    });
}

/// A new upstream connection for `host:port` through the uplink already chosen, or else the
/// policy's, with its HTTP/1.1 handshake done; the connection is driven by its own task until
/// it closes, idles out or its uplink is released.
async fn open_upstream(
    context: &ConnContext,
    host: &str,
    port: u16,
    record: &mut Record,
    choice: Option<upstream::Choice>,
) -> Result<(SendRequest<Body>, Upstream), Response<Body>> {
    let shared = &context.shared;
    let client = context.client.ip();
    let connected = match choice {
        Some(choice) => upstream::connect_via(shared, client, host, port, &choice).await,
        None => upstream::connect(shared, client, host, port).await,
    }
    .map_err(|error| upstream_refusal(shared, &error))?;
    let doom = shared.reaper.subscribe(connected.uplink.id);
    let upstream = Upstream {
        counters: connected.counters.clone(),
        uplink: connected.way(),
        key: PoolKey {
            uplink: connected.uplink.id,
            generation: doom.generation(),
            source: (!connected.direct).then_some(connected.uplink.source),
            origin: connected.origin,
        },
    };
    record.entry.uplink = Some(upstream.uplink.clone());
    let activity = Activity::new();
    let io = TokioIo::new(Watched::upstream(
        connected.stream,
        activity.clone(),
        upstream.counters.clone(),
    ));
    let (sender, connection) =
        hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|error| {
                UplinkCounters::add(&upstream.counters.upstream_errors, 1);
                refuse(
                    shared,
                    StatusCode::BAD_GATEWAY,
                    &format!("upstream: {error}"),
                )
            })?;
    let idle = shared.settings.limits.idle_timeout;
    tokio::spawn(async move {
        tokio::select! {
            _ = connection.with_upgrades() => {}
            () = activity.idle(idle) => {}
            // Dropping the connection closes the socket; the client's next request opens a
            // fresh one on a live uplink.
            () = doom.wait() => {}
        }
    });
    Ok((sender, upstream))
}
