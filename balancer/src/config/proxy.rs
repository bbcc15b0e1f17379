//! The `[proxy]` section: the multisourcing forward proxy's settings and their checks.

use std::{collections::BTreeMap, net::SocketAddrV4, path::PathBuf, time::Duration};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{ConfigError, Lan, validate::line_of};

/// How the proxy picks an uplink for an upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Policy {
    /// Weighted round robin over the usable uplinks.
    RoundRobin,
    /// One uplink per client address.
    StickyClient,
    /// One uplink per (client, site), where a site is a registrable domain or a literal address.
    StickySite,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Proxy {
    pub listen: SocketAddrV4,
    pub policy: Policy,
    pub sticky_timeout: Duration,
    pub connect_ports: Vec<u16>,
    /// Ports plain (absolute-form) requests may go to, as inclusive ranges: squid's Safe_ports
    /// idea, so the proxy cannot be used to talk SMTP or other low-port services.
    pub http_ports: Vec<(u16, u16)>,
    /// Networks opened although the proxy refuses them by default (LAN networks, office
    /// destinations, the uplinks' subnets).
    pub allow: Vec<Ipv4Net>,
    /// One line per request or tunnel, when set.
    pub access_log: Option<AccessLog>,
    /// Limits and timeouts that keep one client from tying the proxy up.
    pub limits: Limits,
}

/// `proxy.access_log*`: where and how requests are logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessLog {
    pub path: PathBuf,
    pub format: LogFormat,
    /// Keep query strings in logged URLs (off by default: they often carry tokens).
    pub query: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LogFormat {
    /// squid's native `access.log` format, plus the uplink as a last field.
    Squid,
    /// The web servers' combined format, plus the uplink as a last field.
    Combined,
}

/// Plain requests' ports by default: 80, 443 and the unprivileged ports.
pub const DEFAULT_HTTP_PORTS: [(u16, u16); 3] = [(80, 80), (443, 443), (1025, 65535)];

/// The proxy's limits (`[proxy]` keys of the same names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Client connections served at once; a connection over it is closed at accept.
    pub max_connections: u32,
    /// Connections one client address may hold at once; more are closed at accept.
    pub max_client_connections: u32,
    /// Largest request head (request line and headers) in bytes.
    pub max_header_bytes: u32,
    /// Deadline for a request's head once the proxy waits for it (slowloris; also how long an
    /// idle keep-alive connection is kept).
    pub header_timeout: Duration,
    /// A connection or tunnel with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// How long an upstream connect may take before a second uplink is raced (Happy Eyeballs).
    pub race_delay: Duration,
    /// Deadline for the whole upstream connect, racing included.
    pub connect_timeout: Duration,
    /// Deadline for one DNS query to one resolver.
    pub dns_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_client_connections: 256,
            max_header_bytes: 16 * 1024,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            // RFC 8305 recommends 250 ms as the connection attempt delay.
            race_delay: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(10),
            dns_timeout: Duration::from_millis(1500),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProxy {
    listen: Spanned<String>,
    policy: Option<Spanned<String>>,
    sticky_timeout: Option<Spanned<String>>,
    connect_ports: Option<Spanned<Vec<i64>>>,
    http_ports: Option<Spanned<Vec<PortItem>>>,
    allow: Option<Spanned<Vec<String>>>,
    access_log: Option<Spanned<String>>,
    access_log_format: Option<Spanned<String>>,
    access_log_query: Option<Spanned<bool>>,
    max_connections: Option<Spanned<i64>>,
    max_client_connections: Option<Spanned<i64>>,
    max_header_bytes: Option<Spanned<i64>>,
    header_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    race_delay: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    dns_timeout: Option<Spanned<String>>,
}

/// One entry of `http_ports`: a port, or a range written `"1025-65535"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum PortItem {
    Port(i64),
    Range(String),
}

fn port_range(item: &PortItem) -> Option<(u16, u16)> {
    let port = |n: i64| u16::try_from(n).ok().filter(|&p| p != 0);
    match item {
        PortItem::Port(n) => port(*n).map(|p| (p, p)),
        PortItem::Range(text) => {
            let (low, high) = text.split_once('-').unwrap_or((text, text));
            let low = port(low.trim().parse().ok()?)?;
            let high = port(high.trim().parse().ok()?)?;
            (low <= high).then_some((low, high))
        }
    }
}

pub(super) fn validate(
    section: Spanned<RawProxy>,
    text: &str,
    lines: &mut BTreeMap<String, usize>,
    _lan: &Lan,
) -> Result<Proxy, ConfigError> {
    let raw = section.into_inner();
    // Noted even when valid: `plan` checks it against the LAN interfaces' addresses.
    lines.insert(
        "proxy.listen".to_string(),
        line_of(text, &raw.listen.span()),
    );
    let mut error = |key: &str, span: std::ops::Range<usize>, message: String| {
        let line = line_of(text, &span);
        lines.insert(key.to_string(), line);
        ConfigError {
            key: key.to_string(),
            line: Some(line),
            message,
        }
    };
    let listen = raw.listen.get_ref().parse::<SocketAddrV4>().map_err(|_| {
        error(
            "proxy.listen",
            raw.listen.span(),
            format!("{:?} is not ADDRESS:PORT", raw.listen.get_ref()),
        )
    })?;
    if listen.ip().is_unspecified() {
        return Err(error(
            "proxy.listen",
            raw.listen.span(),
            "0.0.0.0 would also listen on the uplinks: give an address of a LAN interface".into(),
        ));
    }

    let policy = match raw.policy.as_ref().map(|p| p.get_ref().as_str()) {
        None | Some("round-robin") => Policy::RoundRobin,
        Some("sticky-client") => Policy::StickyClient,
        Some("sticky-site") => Policy::StickySite,
        Some(other) => {
            let span = raw.policy.as_ref().map(Spanned::span).unwrap_or_default();
            return Err(error(
                "proxy.policy",
                span,
                format!("{other:?} is not one of round-robin, sticky-client, sticky-site"),
            ));
        }
    };
    let sticky_timeout = match &raw.sticky_timeout {
        None => Duration::from_secs(600),
        Some(value) => parse_duration(value.get_ref()).ok_or_else(|| {
            error(
                "proxy.sticky_timeout",
                value.span(),
                format!("{:?} is not a duration like 90s or 10m", value.get_ref()),
            )
        })?,
    };
    let connect_ports = match &raw.connect_ports {
        None => vec![443],
        Some(ports) => ports
            .get_ref()
            .iter()
            .map(|&p| u16::try_from(p).ok().filter(|&p| p != 0))
            .collect::<Option<Vec<u16>>>()
            .ok_or_else(|| {
                error(
                    "proxy.connect_ports",
                    ports.span(),
                    "ports run from 1 to 65535".into(),
                )
            })?,
    };
    let http_ports = match &raw.http_ports {
        None => DEFAULT_HTTP_PORTS.to_vec(),
        Some(items) => items
            .get_ref()
            .iter()
            .map(port_range)
            .collect::<Option<Vec<_>>>()
            .filter(|ranges| !ranges.is_empty())
            .ok_or_else(|| {
                error(
                    "proxy.http_ports",
                    items.span(),
                    "give ports 1-65535 or ranges like \"1025-65535\"".into(),
                )
            })?,
    };
    let allow = match &raw.allow {
        None => Vec::new(),
        Some(list) => list
            .get_ref()
            .iter()
            .map(|text| text.parse::<Ipv4Net>().ok().map(|n| n.trunc()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                error(
                    "proxy.allow",
                    list.span(),
                    "give IPv4 networks like \"198.51.100.0/24\"".into(),
                )
            })?,
    };
    let format = match raw.access_log_format.as_ref().map(|f| f.get_ref().as_str()) {
        None | Some("squid") => LogFormat::Squid,
        Some("combined") => LogFormat::Combined,
        Some(other) => {
            let span = raw
                .access_log_format
                .as_ref()
                .map(Spanned::span)
                .unwrap_or_default();
            return Err(error(
                "proxy.access_log_format",
                span,
                format!("{other:?} is not one of squid, combined"),
            ));
        }
    };
    let access_log = match &raw.access_log {
        None => None,
        Some(path) if !path.get_ref().starts_with('/') => {
            return Err(error(
                "proxy.access_log",
                path.span(),
                format!("{:?} is not an absolute path", path.get_ref()),
            ));
        }
        Some(path) => Some(AccessLog {
            path: PathBuf::from(path.get_ref()),
            format,
            query: raw.access_log_query.as_ref().is_some_and(|q| *q.get_ref()),
        }),
    };
    let defaults = Limits::default();
    let mut duration = |key: &str, value: &Option<Spanned<String>>, default: Duration| match value {
        None => Ok(default),
        Some(value) => parse_duration(value.get_ref())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                error(
                    &format!("proxy.{key}"),
                    value.span(),
                    format!(
                        "{:?} is not a duration like 250ms, 10s or 2m",
                        value.get_ref()
                    ),
                )
            }),
    };
    let header_timeout = duration(
        "header_timeout",
        &raw.header_timeout,
        defaults.header_timeout,
    )?;
    let idle_timeout = duration("idle_timeout", &raw.idle_timeout, defaults.idle_timeout)?;
    let race_delay = duration("race_delay", &raw.race_delay, defaults.race_delay)?;
    let connect_timeout = duration(
        "connect_timeout",
        &raw.connect_timeout,
        defaults.connect_timeout,
    )?;
    let dns_timeout = duration("dns_timeout", &raw.dns_timeout, defaults.dns_timeout)?;
    let mut count =
        |key: &str, value: &Option<Spanned<i64>>, range: (u32, u32), default: u32| match value {
            None => Ok(default),
            Some(value) => u32::try_from(*value.get_ref())
                .ok()
                .filter(|v| (range.0..=range.1).contains(v))
                .ok_or_else(|| {
                    error(
                        &format!("proxy.{key}"),
                        value.span(),
                        format!("must be {} to {}", range.0, range.1),
                    )
                }),
        };
    let max_connections = count(
        "max_connections",
        &raw.max_connections,
        (1, 1_000_000),
        defaults.max_connections,
    )?;
    let max_client_connections = count(
        "max_client_connections",
        &raw.max_client_connections,
        (1, 1_000_000),
        defaults.max_client_connections,
    )?;
    // hyper's read buffer cannot be smaller than 8 KiB.
    let max_header_bytes = count(
        "max_header_bytes",
        &raw.max_header_bytes,
        (8192, 1 << 20),
        defaults.max_header_bytes,
    )?;
    Ok(Proxy {
        listen,
        policy,
        sticky_timeout,
        connect_ports,
        http_ports,
        allow,
        access_log,
        limits: Limits {
            max_connections,
            max_client_connections,
            max_header_bytes,
            header_timeout,
            idle_timeout,
            race_delay,
            connect_timeout,
            dns_timeout,
        },
    })
}

/// `250ms`, `90s`, `10m`, `1h` or a plain number of seconds.
fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let value: u64 = number.parse().ok()?;
    let seconds = match unit {
        "ms" => return Some(Duration::from_millis(value)),
        "" | "s" => value,
        "m" => value.checked_mul(60)?,
        "h" => value.checked_mul(3600)?,
        _ => return None,
    };
    Some(Duration::from_secs(seconds))
}

/// Why `listen` is not served, given the addresses of the LAN interfaces; `None` when it is
/// one of them. The proxy must never answer on an uplink, where the internet can reach it.
pub fn listen_problem(
    listen: SocketAddrV4,
    lan_addresses: &[std::net::Ipv4Addr],
) -> Option<String> {
    (!lan_addresses.contains(listen.ip())).then(|| {
        format!(
            "{} is not an address of a LAN interface (they have {lan_addresses:?})",
            listen.ip()
        )
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BASE: &str = "[lan]\ninterfaces = [\"lan0\"]\nnetworks = [\"198.18.0.0/24\"]\n\n[[uplink]]\nname = \"a\"\ninterface = \"wan1\"\ngateway = \"198.18.1.1\"\nsource = \"198.18.1.2\"\n\n[proxy]\nlisten = \"198.18.0.1:3128\"\n";

    #[test]
    fn limits_have_defaults_and_parse() {
        let config = Config::parse(BASE).unwrap();
        assert_eq!(config.proxy.unwrap().limits, Limits::default());
        let text = format!(
            "{BASE}race_delay = \"100ms\"\nheader_timeout = \"3s\"\nidle_timeout = \"1m\"\nmax_connections = 10\nmax_header_bytes = 8192\n"
        );
        let limits = Config::parse(&text).unwrap().proxy.unwrap().limits;
        assert_eq!(limits.race_delay, Duration::from_millis(100));
        assert_eq!(limits.header_timeout, Duration::from_secs(3));
        assert_eq!(limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(
            (limits.max_connections, limits.max_header_bytes),
            (10, 8192)
        );
    }

    #[test]
    fn ports_allow_and_log_parse() {
        let config = Config::parse(BASE).unwrap().proxy.unwrap();
        assert_eq!(config.http_ports, DEFAULT_HTTP_PORTS.to_vec());
        assert!(config.allow.is_empty() && config.access_log.is_none());
        let text = format!(
            "{BASE}http_ports = [80, \"8000-8100\"]\nallow = [\"198.18.0.12/32\"]\naccess_log = \"/var/log/x\"\naccess_log_format = \"combined\"\n"
        );
        let config = Config::parse(&text).unwrap().proxy.unwrap();
        assert_eq!(config.http_ports, vec![(80, 80), (8000, 8100)]);
        assert_eq!(config.allow, vec!["198.18.0.12/32".parse().unwrap()]);
        let log = config.access_log.unwrap();
        assert_eq!((log.format, log.query), (LogFormat::Combined, false));
        let error = Config::parse(&BASE.replace("198.18.0.1:3128", "0.0.0.0:3128")).unwrap_err();
        assert_eq!(error.key, "proxy.listen");
    }

    #[test]
    fn bad_limits_name_their_key() {
        for (line, key) in [
            ("race_delay = \"0ms\"", "proxy.race_delay"),
            ("dns_timeout = \"soon\"", "proxy.dns_timeout"),
            ("max_header_bytes = 100", "proxy.max_header_bytes"),
            ("max_connections = 0", "proxy.max_connections"),
            (
                "max_client_connections = -1",
                "proxy.max_client_connections",
            ),
            ("http_ports = [80, \"9-1\"]", "proxy.http_ports"),
            ("allow = [\"lan\"]", "proxy.allow"),
            ("access_log = \"log\"", "proxy.access_log"),
            ("access_log_format = \"json\"", "proxy.access_log_format"),
        ] {
            let error = Config::parse(&format!("{BASE}{line}\n")).unwrap_err();
            assert_eq!(error.key, key, "{line}: {error}");
            assert!(error.line.is_some());
        }
    }
}
