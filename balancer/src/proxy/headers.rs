//! What RFC 9110 and RFC 9112 ask of a proxy's headers: hop-by-hop fields removed, Via added
//! (and our own Via seen again refused as a loop), Max-Forwards honoured for OPTIONS and TRACE,
//! Host rebuilt from the target without userinfo, and one framing per response.

use std::{
    hash::{Hash, Hasher},
    net::SocketAddrV4,
};

use hyper::{
    Method, Uri,
    header::{self, HeaderMap, HeaderName, HeaderValue},
};

/// Fields that describe one hop (RFC 9110 section 7.6.1), plus the proxy-only ones. `Trailer`
/// is not among them: it describes the message, and trailers are forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop fields, including those the Connection field names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in connection_options(headers) {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn connection_options(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

/// Whether the sender of a message means to keep its connection open afterwards (RFC 9112
/// section 9.3): HTTP/1.1 without `Connection: close`. HTTP/1.0 keep-alive is not trusted.
pub fn keeps_alive(version: hyper::Version, headers: &HeaderMap) -> bool {
    version == hyper::Version::HTTP_11
        && !headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("close"))
}

/// Whether the client accepts trailers (`TE: trailers`): then the proxy asks for them
/// upstream too, since it forwards them (TE itself is hop-by-hop).
pub fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("trailers"))
}

/// Asks the next hop for trailers (RFC 9110 section 10.1.4: TE is named in Connection).
pub fn ask_for_trailers(headers: &mut HeaderMap) {
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.append(header::CONNECTION, HeaderValue::from_static("te"));
}

/// Whether a request asks to switch protocols (a WebSocket handshake): `Upgrade` present and
/// named by `Connection`.
pub fn upgrade_requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let named = connection_options(headers).contains(&header::UPGRADE);
    headers.get(header::UPGRADE).filter(|_| named).cloned()
}

/// Our Via pseudonym (RFC 9110 section 7.6.3): not the host name or an address, which would
/// tell origins about the office, but stable for this gateway and listener so a loop through
/// it shows.
pub fn pseudonym(listen: SocketAddrV4) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (host, listen).hash(&mut hasher);
    format!("balancer-{:08x}", hasher.finish() as u32)
}

/// Whether a Via field already lists `pseudonym` as a recipient: the message came round.
pub fn looped(headers: &HeaderMap, pseudonym: &str) -> bool {
    headers
        .get_all(header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|entry| entry.split_whitespace().nth(1))
        .any(|received_by| received_by.eq_ignore_ascii_case(pseudonym))
}

/// Appends our entry to Via, after the ones already there.
pub fn add_via(headers: &mut HeaderMap, version: hyper::Version, pseudonym: &str) {
    let protocol = match version {
        hyper::Version::HTTP_10 => "1.0",
        hyper::Version::HTTP_2 => "2",
        _ => "1.1",
    };
    if let Ok(value) = HeaderValue::from_str(&format!("{protocol} {pseudonym}")) {
        headers.append(header::VIA, value);
    }
}

/// What Max-Forwards asks of an OPTIONS or TRACE request (RFC 9110 section 7.6.2).
#[derive(Debug, PartialEq, Eq)]
pub enum MaxForwards {
    /// Not OPTIONS or TRACE, or no (valid) Max-Forwards: forward as is.
    Forward,
    /// Zero: the proxy is the final recipient and answers itself.
    AnswerHere,
    /// Forwarded with the value decremented.
    Decremented,
}

pub fn max_forwards(method: &Method, headers: &mut HeaderMap) -> MaxForwards {
    if method != Method::OPTIONS && method != Method::TRACE {
        return MaxForwards::Forward;
    }
    let Some(value) = headers
        .get(header::MAX_FORWARDS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    else {
        return MaxForwards::Forward;
    };
    if value == 0 {
        return MaxForwards::AnswerHere;
    }
    headers.insert(header::MAX_FORWARDS, HeaderValue::from(value - 1));
    MaxForwards::Decremented
}

/// The Host value for a target: host and explicit port, never the userinfo that an
/// absolute-form `http://user:pass@host/` carries (RFC 9110 section 4.2.4 forbids sending it).
pub fn host_value(uri: &Uri) -> Option<HeaderValue> {
    let authority = uri.authority()?;
    let text = match authority.port() {
        Some(port) => format!("{}:{}", authority.host(), port.as_str()),
        None => authority.host().to_string(),
    };
    HeaderValue::from_str(&text).ok()
}

/// A response from a server with both Transfer-Encoding and Content-Length: the length is
/// wrong by definition and removed (RFC 9112 section 6.3), before the hop-by-hop strip drops
/// Transfer-Encoding and the proxy frames the body itself.
pub fn one_framing(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_trailer_stays() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        headers.insert("trailer", HeaderValue::from_static("x-checksum"));
        headers.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 2);
        assert!(headers.contains_key("accept") && headers.contains_key("trailer"));
    }

    #[test]
    fn via_and_loops() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::VIA,
            HeaderValue::from_static("1.0 fred, 1.1 p.example"),
        );
        assert!(!looped(&headers, "balancer-1"));
        add_via(&mut headers, hyper::Version::HTTP_11, "balancer-1");
        let all: Vec<_> = headers.get_all(header::VIA).iter().collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1], "1.1 balancer-1");
        assert!(looped(&headers, "balancer-1"));
        let name = pseudonym("198.18.0.1:3128".parse().unwrap());
        assert_eq!(name, pseudonym("198.18.0.1:3128".parse().unwrap()));
        assert_ne!(name, pseudonym("198.18.0.1:3129".parse().unwrap()));
    }

    #[test]
    fn max_forwards_counts_down_for_options_and_trace() {
        let mut headers = HeaderMap::new();
        headers.insert(header::MAX_FORWARDS, HeaderValue::from_static("2"));
        assert_eq!(
            max_forwards(&Method::GET, &mut headers),
            MaxForwards::Forward
        );
        assert_eq!(
            max_forwards(&Method::OPTIONS, &mut headers),
            MaxForwards::Decremented
        );
        assert_eq!(headers[header::MAX_FORWARDS], "1");
        headers.insert(header::MAX_FORWARDS, HeaderValue::from_static("0"));
        assert_eq!(
            max_forwards(&Method::TRACE, &mut headers),
            MaxForwards::AnswerHere
        );
    }

    #[test]
    fn host_has_no_userinfo() {
        let uri: Uri = "http://alice:secret@example.com:8080/x".parse().unwrap();
        assert_eq!(host_value(&uri).unwrap(), "example.com:8080");
        let uri: Uri = "http://alice@example.com/".parse().unwrap();
        assert_eq!(host_value(&uri).unwrap(), "example.com");
    }

    #[test]
    fn both_framings_lose_content_length() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        one_framing(&mut headers);
        assert!(!headers.contains_key(header::CONTENT_LENGTH));
        strip_hop_by_hop(&mut headers);
        assert!(headers.is_empty());
    }

    #[test]
    fn trailers_are_asked_for_when_the_client_accepts_them() {
        let mut headers = HeaderMap::new();
        headers.insert(header::TE, HeaderValue::from_static("gzip, Trailers"));
        assert!(accepts_trailers(&headers));
        strip_hop_by_hop(&mut headers);
        assert!(!accepts_trailers(&headers));
        ask_for_trailers(&mut headers);
        assert!(accepts_trailers(&headers));
        assert_eq!(headers[header::CONNECTION], "te");
    }

    #[test]
    fn upgrades_need_connection_upgrade() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(upgrade_requested(&headers).is_none());
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        assert_eq!(upgrade_requested(&headers).unwrap(), "websocket");
    }
}
