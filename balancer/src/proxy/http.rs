//! Handling one request: what may be asked (framing, loops), the PAC file, dispatch to
//! `forward` or `tunnel`, refusals as proper HTTP responses with a short reason, and the access
//! log entry every request leaves.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode, Uri,
    body::Incoming,
    header::{self, HeaderValue},
};

use super::{
    Shared,
    access_log::{AccessLog, Entry, Logged},
    counters::UplinkCounters,
    forward::{self, Reusable},
    headers,
    io::Window,
    listener::Slot,
    pac, tunnel,
    upstream::UpstreamError,
};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Per-connection context handed to each request.
pub(super) struct ConnContext {
    pub shared: Arc<Shared>,
    pub client: SocketAddr,
    pub window: Arc<Mutex<Window>>,
    /// Held by tunnels too, so an upgraded connection still counts against the caps.
    pub slot: Arc<Slot>,
    /// The upstream connection this client connection used last, for its next request.
    pub upstream: Mutex<Option<Reusable>>,
}

impl Drop for ConnContext {
    /// The client is gone: its kept upstream connection may serve another client.
    fn drop(&mut self) {
        if let Some(kept) = self.upstream.get_mut().ok().and_then(Option::take) {
            self.shared
                .pool
                .put(kept.sender, kept.upstream, Instant::now());
        }
    }
}

/// What the access log will say about a request, filled in as it is handled.
pub(super) struct Record {
    pub entry: Entry,
    pub clock: Instant,
    /// The tunnel logs itself when it ends.
    pub deferred: bool,
}

impl Record {
    fn new(context: &ConnContext, request: &Request<Incoming>) -> Record {
        let text = |name: header::HeaderName| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Record {
            entry: Entry {
                started: SystemTime::now(),
                elapsed: Default::default(),
                client: context.client.ip(),
                method: request.method().to_string(),
                url: without_userinfo(request.uri()),
                host: request.uri().host().unwrap_or_default().to_string(),
                status: 0,
                bytes: 0,
                uplink: None,
                referer: text(header::REFERER),
                user_agent: text(header::USER_AGENT),
            },
            clock: Instant::now(),
            deferred: false,
        }
    }
}

/// The status logged for a request whose client went away before its answer (nginx's).
pub(super) const CLIENT_GONE: u16 = 499;

/// A request being handled: if the client goes away first (the handler is dropped), it is
/// still logged, as squid logs aborted requests.
struct Pending {
    log: Option<AccessLog>,
    record: Option<Record>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let (Some(log), Some(mut record)) = (&self.log, self.record.take())
            && !record.deferred
        {
            record.entry.status = CLIENT_GONE;
            record.entry.elapsed = record.clock.elapsed();
            log.record(&record.entry);
        }
    }
}

pub(super) async fn handle(
    context: Arc<ConnContext>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let mut pending = Pending {
        log: context.shared.access_log.clone(),
        record: Some(Record::new(&context, &request)),
    };
    let mut response = match pending.record.as_mut() {
        Some(record) => respond(&context, request, record).await,
        None => refuse(
            &context.shared,
            StatusCode::INTERNAL_SERVER_ERROR,
            "no record",
        ),
    };
    let version = response.version();
    headers::add_via(response.headers_mut(), version, &context.shared.via);
    let Some(mut record) = pending.record.take() else {
        return Ok(response);
    };
    let Some(log) = context.shared.access_log.clone() else {
        return Ok(response);
    };
    if record.deferred {
        return Ok(response);
    }
    record.entry.status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    let body = Logged::new(body, log, record.entry, record.clock).boxed();
    Ok(Response::from_parts(parts, body))
}

async fn respond(
    context: &Arc<ConnContext>,
    request: Request<Incoming>,
    record: &mut Record,
) -> Response<Body> {
    let shared = &context.shared;
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
        return response;
    }
    if request.uri().scheme().is_none()
        && (request.method() == Method::GET || request.method() == Method::HEAD)
        && pac::PATHS.contains(&request.uri().path())
    {
        return pac_file(shared);
    }
    if headers::looped(request.headers(), &shared.via) {
        return refuse(
            shared,
            StatusCode::LOOP_DETECTED,
            "this request already passed through this proxy (its Via names us): a forwarding loop",
        );
    }
    if request.method() == Method::CONNECT {
        return tunnel::tunnel(context.clone(), request, record).await;
    }
    forward::forward(context, request, record).await
}

fn pac_file(shared: &Shared) -> Response<Body> {
    let refused = shared.view.borrow().refused.clone();
    let mut response = Response::new(full(pac::file(shared.settings.listen, &refused)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(pac::CONTENT_TYPE),
    );
    response
}

/// A refusal by the proxy itself: the status and a one-line reason.
pub(super) fn refuse(shared: &Shared, status: StatusCode, reason: &str) -> Response<Body> {
    UplinkCounters::add(&shared.counters.refused, 1);
    let mut response = Response::new(full(format!("{reason}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

pub(super) fn full(text: String) -> Body {
    Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed()
}

pub(super) fn upstream_refusal(shared: &Shared, error: &UpstreamError) -> Response<Body> {
    let status = match error {
        UpstreamError::NoUplink => StatusCode::SERVICE_UNAVAILABLE,
        UpstreamError::Forbidden { .. } | UpstreamError::Refused { .. } | UpstreamError::Ipv6 => {
            StatusCode::FORBIDDEN
        }
        UpstreamError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        UpstreamError::Dns { .. } | UpstreamError::Connect { .. } => StatusCode::BAD_GATEWAY,
    };
    let mut reason = crate::daemon::error_chain(error);
    if let UpstreamError::Refused { .. } = error {
        reason.push_str(&format!(
            ".\nThe proxy connects from the gateway itself, so it does not reach the office's own \
             networks and modems, past the rules between them. Reach it directly (the PAC file \
             {} sends such addresses DIRECT), or open it with proxy.allow in the gateway's \
             config.",
            pac::url(shared.settings.listen)
        ));
    }
    refuse(shared, status, &reason)
}

/// The URL as text, without `user:password@`: credentials never reach the log.
fn without_userinfo(uri: &Uri) -> String {
    let text = uri.to_string();
    match uri.authority().map(|a| a.as_str()) {
        Some(authority) if authority.contains('@') => {
            let host = authority.rsplit('@').next().unwrap_or_default();
            text.replacen(authority, host, 1)
        }
        _ => text,
    }
}

/// Host and port of a request target, with the scheme's default port.
pub(super) fn target(uri: &Uri, default_port: Option<u16>) -> Option<(String, u16)> {
    let authority = uri.authority()?;
    let port = authority.port_u16().or(default_port)?;
    Some((authority.host().to_string(), port))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let uri: Uri = "http://example.com/x".parse().unwrap();
        assert_eq!(target(&uri, Some(80)), Some(("example.com".into(), 80)));
        let uri: Uri = "http://bob:pw@example.com:81/x".parse().unwrap();
        assert_eq!(target(&uri, Some(80)), Some(("example.com".into(), 81)));
        let uri: Uri = "example.com:443".parse().unwrap();
        assert_eq!(target(&uri, None), Some(("example.com".into(), 443)));
        let uri: Uri = "example.com".parse().unwrap();
        assert_eq!(target(&uri, None), None);
        let uri: Uri = "http://bob:pw@example.com:81/x?y".parse().unwrap();
        assert_eq!(without_userinfo(&uri), "http://example.com:81/x?y");
    }
}
