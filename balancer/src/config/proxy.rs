//! The `[proxy]` section: the multisourcing forward proxy's settings and their checks.

use std::{collections::BTreeMap, net::SocketAddrV4, time::Duration};

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
    /// Limits and timeouts that keep one client from tying the proxy up.
    pub limits: Limits,
}

/// The proxy's limits (`[proxy]` keys of the same names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Client connections served at once; more wait in the kernel's accept queue.
    pub max_connections: u32,
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
    max_connections: Option<Spanned<i64>>,
    max_header_bytes: Option<Spanned<i64>>,
    header_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    race_delay: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    dns_timeout: Option<Spanned<String>>,
}

pub(super) fn validate(
    section: Spanned<RawProxy>,
    text: &str,
    lines: &mut BTreeMap<String, usize>,
    _lan: &Lan,
) -> Result<Proxy, ConfigError> {
    let raw = section.into_inner();
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
        limits: Limits {
            max_connections,
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
    fn bad_limits_name_their_key() {
        for (line, key) in [
            ("race_delay = \"0ms\"", "proxy.race_delay"),
            ("dns_timeout = \"soon\"", "proxy.dns_timeout"),
            ("max_header_bytes = 100", "proxy.max_header_bytes"),
            ("max_connections = 0", "proxy.max_connections"),
        ] {
            let error = Config::parse(&format!("{BASE}{line}\n")).unwrap_err();
            assert_eq!(error.key, key, "{line}: {error}");
            assert!(error.line.is_some());
        }
    }
}
