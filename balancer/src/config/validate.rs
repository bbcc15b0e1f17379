//! Turning the parsed TOML into a [`Config`]: the raw, spanned form serde fills, and every check
//! that needs no kernel, each reporting the key and line it is about.

use std::{collections::BTreeMap, net::Ipv4Addr, ops::Range};

use ipnet::Ipv4Net;
use serde::Deserialize;
use toml::Spanned;

mod tuning;

use self::tuning::{RawDataplane, RawHealth};
use super::{Config, ConfigError, Dataplane, Health, Lan, ProbeTarget, Uplink};
use crate::ownership;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    lan: Spanned<RawLan>,
    #[serde(default, rename = "uplink")]
    uplinks: Vec<Spanned<RawUplink>>,
    dataplane: Option<Spanned<RawDataplane>>,
    health: Option<Spanned<RawHealth>>,
    proxy: Option<Spanned<super::proxy::RawProxy>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLan {
    interfaces: Spanned<Vec<Spanned<String>>>,
    networks: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    route_tables: Vec<Spanned<i64>>,
    pass_untranslated: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUplink {
    name: Spanned<String>,
    interface: Spanned<String>,
    gateway: Option<Spanned<String>>,
    source: Option<Spanned<String>>,
    hotplug: Option<Spanned<bool>>,
    weight: Option<Spanned<i64>>,
    id: Option<Spanned<i64>>,
    table: Option<Spanned<i64>>,
    mark: Option<Spanned<i64>>,
    #[serde(default)]
    track: Vec<Spanned<String>>,
    #[serde(default)]
    dns: Vec<Spanned<String>>,
}

pub(super) fn line_of(text: &str, span: &Range<usize>) -> usize {
    let end = span.start.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The key an error at `offset` is about: the table it sits in (`lan`, `uplink[1]`) and, for an
/// unknown or invalid key, the key itself, so a misspelling is named as written.
pub(super) fn key_at(text: &str, offset: usize, message: &str) -> String {
    let before = &text[..offset.min(text.len())];
    let mut table = String::new();
    let mut uplinks = 0;
    for line in before.lines() {
        let line = line.trim();
        if line.starts_with("[[") {
            let name = line.trim_matches(|c| c == '[' || c == ']').trim();
            if name == "uplink" {
                uplinks += 1;
            }
            table = format!("{name}[{}]", uplinks.max(1) - 1);
        } else if line.starts_with('[') {
            table = line
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string();
        }
    }
    // "unknown field `wieght`, expected ..." names the key; otherwise take it from the line.
    let field = message
        .split('`')
        .nth(1)
        .filter(|_| message.starts_with("unknown field"))
        .map(str::to_string)
        .or_else(|| {
            let line = text[offset.min(text.len())..].lines().next().unwrap_or("");
            line.split_once('=')
                .map(|(key, _)| key.trim().to_string())
                .filter(|k| !k.is_empty())
        });
    match (table.is_empty(), field) {
        (true, Some(field)) => field,
        (true, None) => "config".into(),
        (false, Some(field)) => format!("{table}.{field}"),
        (false, None) => table,
    }
}

pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    pub(super) lines: BTreeMap<String, usize>,
}

impl Validator<'_> {
    fn note<T>(&mut self, key: &str, value: &Spanned<T>) -> usize {
        let line = line_of(self.text, &value.span());
        self.lines.insert(key.to_string(), line);
        line
    }

    fn error<T>(&self, key: &str, value: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            key: key.to_string(),
            line: Some(line_of(self.text, &value.span())),
            message: message.into(),
        }
    }

    pub(super) fn validate(mut self, raw: RawConfig) -> Result<Config, ConfigError> {
        self.note("lan", &raw.lan);
        let lan = self.validate_lan(raw.lan.into_inner())?;
        if raw.uplinks.is_empty() {
            return Err(ConfigError {
                key: "uplink".into(),
                line: None,
                message: "at least one [[uplink]] is required".into(),
            });
        }
        let mut uplinks = Vec::with_capacity(raw.uplinks.len());
        for (position, raw_uplink) in raw.uplinks.into_iter().enumerate() {
            let key = format!("uplink[{position}]");
            self.note(&key, &raw_uplink);
            uplinks.push(self.validate_uplink(&key, position, raw_uplink.into_inner(), &lan)?);
        }
        self.check_unique(&uplinks)?;
        let dataplane = match raw.dataplane {
            None => Dataplane::default(),
            Some(section) => {
                self.note("dataplane", &section);
                self.validate_dataplane(section.into_inner())?
            }
        };
        let health = match raw.health {
            None => Health::default(),
            Some(section) => {
                self.note("health", &section);
                self.validate_health(section.into_inner())?
            }
        };
        let proxy = match raw.proxy {
            None => None,
            Some(section) => {
                self.note("proxy", &section);
                let (text, lines) = (self.text, &mut self.lines);
                Some(super::proxy::validate(section, text, lines, &lan)?)
            }
        };
        Ok(Config {
            lan,
            uplinks,
            dataplane,
            health,
            proxy,
            lines: self.lines,
        })
    }

    fn validate_lan(&mut self, raw: RawLan) -> Result<Lan, ConfigError> {
        self.note("lan.interfaces", &raw.interfaces);
        self.note("lan.networks", &raw.networks);
        if raw.interfaces.get_ref().is_empty() {
            return Err(self.error(
                "lan.interfaces",
                &raw.interfaces,
                "list at least one interface",
            ));
        }
        if raw.networks.get_ref().is_empty() {
            return Err(self.error("lan.networks", &raw.networks, "list at least one network"));
        }
        if raw.networks.get_ref().len() > ownership::MAX_LAN_NETWORKS {
            return Err(self.error(
                "lan.networks",
                &raw.networks,
                format!("at most {} networks", ownership::MAX_LAN_NETWORKS),
            ));
        }
        let mut interfaces = Vec::new();
        for (index, name) in raw.interfaces.into_inner().into_iter().enumerate() {
            let key = format!("lan.interfaces[{index}]");
            self.note(&key, &name);
            check_interface_name(name.get_ref()).map_err(|m| self.error(&key, &name, m))?;
            if interfaces.contains(name.get_ref()) {
                return Err(self.error(&key, &name, format!("{} is listed twice", name.get_ref())));
            }
            interfaces.push(name.into_inner());
        }
        let mut networks: Vec<Ipv4Net> = Vec::new();
        for (index, text) in raw.networks.into_inner().into_iter().enumerate() {
            let key = format!("lan.networks[{index}]");
            self.note(&key, &text);
            let network: Ipv4Net = text.get_ref().parse().map_err(|_| {
                self.error(
                    &key,
                    &text,
                    format!(
                        "{:?} is not an IPv4 network like 198.18.0.0/24",
                        text.get_ref()
                    ),
                )
            })?;
            if network.trunc() != network {
                return Err(self.error(
                    &key,
                    &text,
                    format!(
                        "{network} has host bits set; did you mean {}?",
                        network.trunc()
                    ),
                ));
            }
            if network.prefix_len() == 0 {
                return Err(self.error(&key, &text, "a LAN network cannot be the whole internet"));
            }
            if let Some(other) = networks
                .iter()
                .find(|other| other.contains(&network) || network.contains(*other))
            {
                return Err(self.error(&key, &text, format!("{network} overlaps {other}")));
            }
            networks.push(network);
        }
        let mut route_tables = Vec::new();
        for (index, table) in raw.route_tables.into_iter().enumerate() {
            let key = format!("lan.route_tables[{index}]");
            self.note(&key, &table);
            let value = *table.get_ref();
            let id = u32::try_from(value)
                .ok()
                .filter(|id| *id >= 1)
                .ok_or_else(|| {
                    self.error(&key, &table, format!("{value} is not a routing table id"))
                })?;
            let refusal = if id == 254 {
                Some("the main table is always read; list only other tables".to_string())
            } else if id == 255 {
                Some("the local table holds the gateway's own addresses, not routes".to_string())
            } else if ownership::TABLE_RANGE.contains(&id) {
                Some(format!(
                    "tables {}-{} are the balancer's own",
                    ownership::TABLE_RANGE.start(),
                    ownership::TABLE_RANGE.end()
                ))
            } else if route_tables.contains(&id) {
                Some(format!("table {id} is listed twice"))
            } else {
                None
            };
            if let Some(message) = refusal {
                return Err(self.error(&key, &table, message));
            }
            route_tables.push(id);
        }
        let pass_untranslated = match &raw.pass_untranslated {
            Some(value) => {
                self.note("lan.pass_untranslated", value);
                *value.get_ref()
            }
            None => false,
        };
        Ok(Lan {
            interfaces,
            networks,
            route_tables,
            pass_untranslated,
        })
    }

    fn validate_uplink(
        &mut self,
        key: &str,
        position: usize,
        raw: RawUplink,
        lan: &Lan,
    ) -> Result<Uplink, ConfigError> {
        let field = |name: &str| format!("{key}.{name}");

        self.note(&field("name"), &raw.name);
        let name = raw.name.get_ref().trim();
        if name.is_empty()
            || name.len() > 32
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(self.error(
                &field("name"),
                &raw.name,
                "use 1 to 32 letters, digits, '-', '_' or '.'",
            ));
        }

        self.note(&field("interface"), &raw.interface);
        check_interface_name(raw.interface.get_ref())
            .map_err(|m| self.error(&field("interface"), &raw.interface, m))?;
        if lan.interfaces.contains(raw.interface.get_ref()) {
            return Err(self.error(
                &field("interface"),
                &raw.interface,
                "is also a LAN interface",
            ));
        }

        let gateway = match &raw.gateway {
            Some(text) => Some((self.address(&field("gateway"), text)?, text)),
            None => None,
        };
        let source = match &raw.source {
            Some(text) => Some((self.address(&field("source"), text)?, text)),
            None => None,
        };
        if let (Some((gateway, text)), Some((source, _))) = (&gateway, &source)
            && gateway == source
        {
            return Err(self.error(&field("gateway"), *text, "is the same address as source"));
        }
        for (value, name) in [(&source, "source"), (&gateway, "gateway")] {
            if let Some((address, spanned)) = value
                && let Some(network) = lan.networks.iter().find(|n| n.contains(address))
            {
                return Err(self.error(
                    &field(name),
                    *spanned,
                    format!("{address} is inside LAN network {network}"),
                ));
            }
        }
        let hotplug = match &raw.hotplug {
            Some(value) => {
                self.note(&field("hotplug"), value);
                *value.get_ref()
            }
            None => false,
        };

        let weight = match &raw.weight {
            None => 1,
            Some(weight) => {
                self.note(&field("weight"), weight);
                self.integer(
                    &field("weight"),
                    weight,
                    1..=1000,
                    "a weight from 1 to 1000 (0 would never be used)",
                )?
            }
        };
        let default_id = u32::try_from(position + 1).unwrap_or(u32::MAX);
        let id = match &raw.id {
            None => default_id,
            Some(id) => {
                self.note(&field("id"), id);
                self.integer(
                    &field("id"),
                    id,
                    ownership::UPLINK_ID_RANGE,
                    "an id from 1 to 254",
                )?
            }
        };
        if !ownership::UPLINK_ID_RANGE.contains(&id) {
            return Err(ConfigError {
                key: key.to_string(),
                line: None,
                message: "too many uplinks: ids run from 1 to 254".into(),
            });
        }
        let table = match &raw.table {
            None => ownership::default_table(id),
            Some(table) => {
                self.note(&field("table"), table);
                let range = (*ownership::TABLE_RANGE.start() + 1)..=*ownership::TABLE_RANGE.end();
                let message = format!(
                    "a table from the balancer's range {}-{}",
                    range.start(),
                    range.end()
                );
                self.integer(&field("table"), table, range, &message)?
            }
        };
        let mark = match &raw.mark {
            None => ownership::default_mark(id),
            Some(mark) => {
                self.note(&field("mark"), mark);
                let value = self.integer(&field("mark"), mark, 1..=u32::MAX, "a non-zero mark")?;
                if value & !ownership::MARK_MASK != 0 {
                    return Err(self.error(
                        &field("mark"),
                        mark,
                        format!(
                            "{value:#x} uses bits outside the balancer's mark mask {:#x}",
                            ownership::MARK_MASK
                        ),
                    ));
                }
                value
            }
        };
        let mut track = Vec::new();
        for (index, target) in raw.track.iter().enumerate() {
            let key = format!("{}[{index}]", field("track"));
            self.note(&key, target);
            track.push(self.probe_target(&key, target)?);
        }
        let mut dns = Vec::new();
        for (index, resolver) in raw.dns.iter().enumerate() {
            let key = format!("{}[{index}]", field("dns"));
            dns.push(self.address(&key, resolver)?);
        }
        Ok(Uplink {
            id,
            name: name.to_string(),
            interface: raw.interface.into_inner(),
            gateway: gateway.map(|(address, _)| address),
            source: source.map(|(address, _)| address),
            hotplug,
            weight,
            table,
            mark,
            track,
            dns,
        })
    }

    fn probe_target(&self, key: &str, text: &Spanned<String>) -> Result<ProbeTarget, ConfigError> {
        let value = text.get_ref().trim();
        let parsed = match value.strip_prefix("tcp:") {
            Some(rest) => rest
                .parse::<std::net::SocketAddrV4>()
                .ok()
                .map(ProbeTarget::Tcp),
            None => value.parse::<Ipv4Addr>().ok().map(ProbeTarget::Icmp),
        };
        parsed.ok_or_else(|| {
            self.error(
                key,
                text,
                format!("{value:?} is neither an IPv4 address (ICMP echo) nor tcp:ADDR:PORT"),
            )
        })
    }

    fn address(&mut self, key: &str, text: &Spanned<String>) -> Result<Ipv4Addr, ConfigError> {
        self.note(key, text);
        let address: Ipv4Addr = text.get_ref().parse().map_err(|_| {
            self.error(
                key,
                text,
                format!("{:?} is not an IPv4 address", text.get_ref()),
            )
        })?;
        if address.is_unspecified()
            || address.is_broadcast()
            || address.is_multicast()
            || address.is_loopback()
        {
            return Err(self.error(key, text, format!("{address} cannot be used here")));
        }
        Ok(address)
    }

    fn integer(
        &self,
        key: &str,
        value: &Spanned<i64>,
        range: std::ops::RangeInclusive<u32>,
        expected: &str,
    ) -> Result<u32, ConfigError> {
        u32::try_from(*value.get_ref())
            .ok()
            .filter(|v| range.contains(v))
            .ok_or_else(|| self.error(key, value, format!("{} is not {expected}", value.get_ref())))
    }

    fn check_unique(&self, uplinks: &[Uplink]) -> Result<(), ConfigError> {
        let mut seen: [BTreeMap<String, usize>; 6] = Default::default();
        for (position, uplink) in uplinks.iter().enumerate() {
            let values = [
                ("name", Some(uplink.name.clone())),
                ("id", Some(uplink.id.to_string())),
                ("table", Some(uplink.table.to_string())),
                ("mark", Some(format!("{:#x}", uplink.mark))),
                ("source", uplink.source.map(|s| s.to_string())),
                // Two uplinks learning their addresses from one interface would share them.
                ("interface", Some(uplink.interface.clone())),
            ];
            for (slot, (field, value)) in values.into_iter().enumerate() {
                let Some(value) = value else { continue };
                if let Some(first) = seen[slot].insert(value.clone(), position) {
                    let key = format!("uplink[{position}].{field}");
                    // A derived id, table or mark has no line of its own: point at the uplink.
                    let line = self
                        .lines
                        .get(&key)
                        .or_else(|| self.lines.get(&format!("uplink[{position}]")))
                        .copied();
                    return Err(ConfigError {
                        key,
                        line,
                        message: format!(
                            "{value} is already used by uplink[{first}] ({})",
                            uplinks[first].name
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

fn check_interface_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if valid {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid interface name"))
    }
}
