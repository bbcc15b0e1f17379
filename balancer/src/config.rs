//! The balancer's configuration: parsing the TOML file and every check that needs no kernel.
//!
//! Each error names the key (`uplink[2].gateway`) and, where the file has one, its line. Checks
//! against the live kernel (does the interface exist, is the source on it) live in `plan`, which
//! reports through the same [`ConfigError`] using the lines kept in [`Config::lines`].

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, path::Path};

use ipnet::Ipv4Net;
use serde::Serialize;

/// A configuration error: which key, on which line, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} (line {line}): {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// Failure to load a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {error}")]
    Invalid { path: String, error: ConfigError },
}

/// The LAN side: where transparent clients live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lan {
    pub interfaces: Vec<String>,
    pub networks: Vec<Ipv4Net>,
    /// Routing tables besides main whose routes through non-uplink interfaces are office
    /// destinations too (strongSwan's 220, a VPN daemon's own table).
    pub route_tables: Vec<u32>,
    /// Pass LAN traffic the data plane cannot translate (other protocols, TCP of no flow)
    /// untouched instead of dropping it: only for a LAN with public addresses.
    pub pass_untranslated: bool,
}

/// One internet line: the interface it leaves by, its modem or ISP router, and the address the
/// ISP accepts from us. `gateway` and `source` left out are learned from the kernel at run time
/// (see `uplink`), as a DHCP client, PPP or an LTE modem sets them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Uplink {
    pub id: u32,
    pub name: String,
    pub interface: String,
    pub gateway: Option<Ipv4Addr>,
    pub source: Option<Ipv4Addr>,
    /// The interface may be absent (PPP, LTE, USB modems): `check` and `run` accept that and the
    /// uplink joins when it appears. Without it an unknown interface is an error (a typo).
    pub hotplug: bool,
    pub weight: u32,
    pub table: u32,
    pub mark: u32,
    /// What health probes ask, out of this uplink only.
    pub track: Vec<ProbeTarget>,
    /// The ISP's resolvers, for name lookups of traffic leaving by this uplink (the proxy).
    pub dns: Vec<Ipv4Addr>,
}

/// One health probe target of an uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ProbeTarget {
    /// An ICMP echo to this address (written as a plain address).
    Icmp(Ipv4Addr),
    /// A TCP connect to this address and port (written `tcp:ADDR:PORT`).
    Tcp(std::net::SocketAddrV4),
}

impl std::fmt::Display for ProbeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeTarget::Icmp(address) => write!(f, "{address}"),
            ProbeTarget::Tcp(address) => write!(f, "tcp:{address}"),
        }
    }
}

/// How uplink health is judged (`[health]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    /// Time between probe rounds.
    pub interval_ms: u32,
    /// Shortest time a probe is given; the actual timeout grows with the measured RTT, so a
    /// loaded (bufferbloated) line is not mistaken for a dead one.
    pub timeout_ms: u32,
    /// Consecutive lost rounds before an uplink is down.
    pub down_after: u32,
    /// Consecutive good rounds before a down uplink is up again.
    pub up_after: u32,
    /// How long an uplink must stay down before its clients' TCP flows are reset.
    pub reset_after_ms: u32,
}

impl Default for Health {
    fn default() -> Self {
        // A silently dead line is down within about 0.9 s: three lost rounds 200 ms apart, the
        // last one given 300 ms. Five good rounds (1 s) bring it back without flapping.
        Health {
            interval_ms: 200,
            timeout_ms: 300,
            down_after: 3,
            up_after: 5,
            reset_after_ms: 1000,
        }
    }
}

/// Transparent balancing of LAN traffic by the eBPF data plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dataplane {
    /// Attach the programs (default true); false leaves only the policy routing.
    pub enabled: bool,
    /// Capacity of the flow and NAT tables.
    pub flow_entries: u32,
    /// Translated source ports, a range outside the gateway's `ip_local_port_range`.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// Timeouts in seconds.
    pub tcp_syn_timeout: u32,
    pub tcp_established_timeout: u32,
    pub tcp_closing_timeout: u32,
    pub udp_timeout: u32,
    pub icmp_timeout: u32,
    /// Which unsolicited packets reach a LAN endpoint's mapping (RFC 4787 REQ-8).
    pub filtering: Filtering,
}

/// `[dataplane] filtering`: who may send to a LAN endpoint's public mapping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// Only remotes the endpoint sent to, from the port it sent to (the default).
    #[default]
    AddressAndPortDependent,
    /// Anyone, over UDP ("full cone", for game consoles and peer-to-peer).
    EndpointIndependent,
}

impl Filtering {
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            Filtering::AddressAndPortDependent => "address-and-port-dependent",
            Filtering::EndpointIndependent => "endpoint-independent",
        }
    }

    /// `Settings::filtering` for the data plane.
    pub fn setting(self) -> u8 {
        match self {
            Filtering::AddressAndPortDependent => {
                balancer_common::uplink::FILTERING_ADDRESS_AND_PORT_DEPENDENT
            }
            Filtering::EndpointIndependent => {
                balancer_common::uplink::FILTERING_ENDPOINT_INDEPENDENT
            }
        }
    }
}

impl Default for Dataplane {
    fn default() -> Self {
        Dataplane {
            enabled: true,
            flow_entries: 262_144,
            nat_port_min: 32_768,
            nat_port_max: 65_535,
            // RFC 5382 REQ-5: transitory states (unanswered SYN, after FIN or RST) at least
            // 4 minutes, established TCP at least 2 h 4 min.
            tcp_syn_timeout: 240,
            tcp_established_timeout: 7_440,
            tcp_closing_timeout: 240,
            // RFC 4787: at least 2 minutes for UDP.
            udp_timeout: 120,
            icmp_timeout: 30,
            filtering: Filtering::default(),
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    pub lan: Lan,
    pub uplinks: Vec<Uplink>,
    pub dataplane: Dataplane,
    pub health: Health,
    /// The forward proxy, when the config has a `[proxy]` section.
    pub proxy: Option<proxy::Proxy>,
    /// The line of each key that has one, for errors found later against the kernel.
    #[serde(skip)]
    pub lines: BTreeMap<String, usize>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text).map_err(|error| LoadError::Invalid {
            path: path.display().to_string(),
            error,
        })
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: validate::RawConfig = toml::from_str(text).map_err(|error| {
            let message = error.message().trim().to_string();
            ConfigError {
                key: error
                    .span()
                    .map(|span| validate::key_at(text, span.start, &message))
                    .unwrap_or_else(|| "config".into()),
                line: error.span().map(|span| validate::line_of(text, &span)),
                message,
            }
        })?;
        validate::Validator {
            text,
            lines: BTreeMap::new(),
        }
        .validate(raw)
    }

    /// An error about `key`, with its line when the file had one.
    pub fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            key: key.to_string(),
            line: self.lines.get(key).copied(),
            message: message.into(),
        }
    }
}

pub mod proxy;
mod validate;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
