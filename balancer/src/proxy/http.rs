//! Handling one request: who may ask, what may be asked, forwarding absolute-form requests,
//! CONNECT tunnels, and refusals as proper HTTP responses with a short reason.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode, Uri,
    body::Incoming,
    header::{self, HeaderMap, HeaderName, HeaderValue},
};
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedSemaphorePermit;

use super::{
    Shared,
    counters::UplinkCounters,
    io::{Activity, Watched, Window},
    upstream::{self, UpstreamError},
};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Per-connection context handed to each request.
pub(super) struct ConnContext {
    pub shared: Arc<Shared>,
    pub client: SocketAddr,
    pub window: Arc<Mutex<Window>>,
    /// Held by tunnels too, so an upgraded connection still counts against the cap.
    pub permit: Arc<OwnedSemaphorePermit>,
    /// The upstream connection this client connection used last, for its next request.
    pub upstream: tokio::sync::Mutex<Option<Reusable>>,
}

/// An upstream HTTP/1.1 connection kept for the client connection's next request to the same
/// host: keep-alive on both sides, as squid does, instead of a TCP handshake and a TIME_WAIT on
/// the gateway per request. A keep-alive client connection is one flow on one uplink.
pub(super) struct Reusable {
    host: String,
    port: u16,
    sender: hyper::client::conn::http1::SendRequest<Body>,
    counters: Arc<UplinkCounters>,
}

/// Headers that describe one hop, never forwarded (RFC 9110 section 7.6.1), plus the
/// proxy-only ones.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub(super) async fn handle(
    context: Arc<ConnContext>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let shared = &context.shared;
    let allowed = match context.client.ip() {
        IpAddr::V4(client) => shared.lan.iter().any(|net| net.contains(&client)),
        IpAddr::V6(_) => false,
    };
    if !allowed {
        return Ok(refuse(
            shared,
            StatusCode::FORBIDDEN,
            "clients outside the LAN networks are not served",
        ));
    }
    // hyper drops Content-Length when Transfer-Encoding is present, which is safe for us but
    // still a sign of a smuggling attempt against someone; such a request is refused outright.
    let conflict = context
        .window
        .lock()
        .ok()
        .and_then(|mut w| w.take_conflict(request.method().as_str()));
    if conflict == Some(true) {
        let mut response = refuse(
            shared,
            StatusCode::BAD_REQUEST,
            "both Content-Length and Transfer-Encoding: refusing an ambiguous body",
        );
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Ok(response);
    }
    if request.method() == Method::CONNECT {
        return Ok(tunnel(context.clone(), request).await);
    }
    Ok(forward(&context, request).await)
}

/// A refusal by the proxy itself: the status and a one-line reason.
fn refuse(shared: &Shared, status: StatusCode, reason: &str) -> Response<Body> {
    UplinkCounters::add(&shared.counters.refused, 1);
    let mut response = Response::new(full(format!("{reason}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn full(text: String) -> Body {
    Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed()
}

fn upstream_refusal(shared: &Shared, error: &UpstreamError) -> Response<Body> {
    let status = match error {
        UpstreamError::NoUplink => StatusCode::SERVICE_UNAVAILABLE,
        UpstreamError::Forbidden { .. } | UpstreamError::Ipv6 => StatusCode::FORBIDDEN,
        UpstreamError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        UpstreamError::Dns { .. } | UpstreamError::Connect { .. } => StatusCode::BAD_GATEWAY,
    };
    refuse(shared, status, &crate::daemon::error_chain(error))
}

/// Host and port of a request target, with the scheme's default port.
fn target(uri: &Uri, default_port: Option<u16>) -> Option<(String, u16)> {
    let authority = uri.authority()?;
    let port = authority.port_u16().or(default_port)?;
    Some((authority.host().to_string(), port))
}

async fn forward(context: &ConnContext, request: Request<Incoming>) -> Response<Body> {
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
    let cached = context
        .upstream
        .lock()
        .await
        .take()
        .filter(|kept| kept.host == host && kept.port == port && !kept.sender.is_closed());
    let (mut sender, mut counters) = match cached {
        Some(kept) => (kept.sender, kept.counters),
        None => match open_upstream(context, &host, port).await {
            Ok(opened) => opened,
            Err(refusal) => return refusal,
        },
    };
    if sender.ready().await.is_err() {
        // The kept connection closed meanwhile: one fresh connection instead.
        match open_upstream(context, &host, port).await {
            Ok(opened) => (sender, counters) = opened,
            Err(refusal) => return refusal,
        }
    }
    let (mut parts, body) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // RFC 9112 section 3.2.2: a proxy replaces Host with the target URI's authority.
    if let Some(authority) = uri.authority()
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, value);
    }
    parts.uri = uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |p| Uri::from(p.clone()));
    parts.version = hyper::Version::HTTP_11;
    let outgoing = Request::from_parts(parts, body.boxed());
    UplinkCounters::add(&counters.requests, 1);
    match sender.send_request(outgoing).await {
        Ok(response) => {
            *context.upstream.lock().await = Some(Reusable {
                host,
                port,
                sender,
                counters: counters.clone(),
            });
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.boxed())
        }
        Err(error) => {
            UplinkCounters::add(&counters.upstream_errors, 1);
            refuse(
                shared,
                StatusCode::BAD_GATEWAY,
                &format!("upstream: {error}"),
            )
        }
    }
}

/// A new upstream connection for `host:port` through the policy's uplink, with its HTTP/1.1
/// handshake done; the connection is driven by its own task until it closes or idles out.
async fn open_upstream(
    context: &ConnContext,
    host: &str,
    port: u16,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<Body>,
        Arc<UplinkCounters>,
    ),
    Response<Body>,
> {
    let shared = &context.shared;
    let connected = upstream::connect(shared, context.client.ip(), host, port)
        .await
        .map_err(|error| upstream_refusal(shared, &error))?;
    let counters = connected.counters.clone();
    let activity = Activity::new();
    let io = TokioIo::new(Watched::upstream(
        connected.stream,
        activity.clone(),
        counters.clone(),
    ));
    let (sender, connection) =
        hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|error| {
                UplinkCounters::add(&counters.upstream_errors, 1);
                refuse(
                    shared,
                    StatusCode::BAD_GATEWAY,
                    &format!("upstream: {error}"),
                )
            })?;
    let idle = shared.settings.limits.idle_timeout;
    tokio::spawn(async move {
        tokio::select! {
            _ = connection => {}
            () = activity.idle(idle) => {}
        }
    });
    Ok((sender, counters))
}

async fn tunnel(context: Arc<ConnContext>, request: Request<Incoming>) -> Response<Body> {
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
            &format!("CONNECT to port {port} is not allowed"),
        );
    }
    let connected = match upstream::connect(shared, context.client.ip(), &host, port).await {
        Ok(connected) => connected,
        Err(error) => return upstream_refusal(shared, &error),
    };
    UplinkCounters::add(&connected.counters.tunnels, 1);
    let idle = shared.settings.limits.idle_timeout;
    let permit = context.permit.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let Ok(upgraded) = hyper::upgrade::on(request).await else {
            return;
        };
        let mut client = TokioIo::new(upgraded);
        let activity = Activity::new();
        let mut server = Watched::upstream(connected.stream, activity.clone(), connected.counters);
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
            () = activity.idle(idle) => {}
        }
    });
    Response::new(full(String::new()))
}

/// Removes hop-by-hop headers, including those the Connection header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        headers.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("accept"));
    }

    #[test]
    fn targets() {
        let uri: Uri = "http://example.com/x".parse().unwrap();
        assert_eq!(target(&uri, Some(80)), Some(("example.com".into(), 80)));
        let uri: Uri = "example.com:443".parse().unwrap();
        assert_eq!(target(&uri, None), Some(("example.com".into(), 443)));
        let uri: Uri = "example.com".parse().unwrap();
        assert_eq!(target(&uri, None), None);
    }
}
