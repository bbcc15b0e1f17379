//! The `[dataplane]` and `[health]` sections: tuning knobs with defaults, each range-checked.

use serde::Deserialize;
use toml::Spanned;

use super::{
    super::{ConfigError, Dataplane, Filtering, Health},
    Validator, line_of,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDataplane {
    enabled: Option<Spanned<bool>>,
    flow_entries: Option<Spanned<i64>>,
    nat_port_min: Option<Spanned<i64>>,
    nat_port_max: Option<Spanned<i64>>,
    tcp_syn_timeout: Option<Spanned<i64>>,
    tcp_established_timeout: Option<Spanned<i64>>,
    tcp_closing_timeout: Option<Spanned<i64>>,
    udp_timeout: Option<Spanned<i64>>,
    icmp_timeout: Option<Spanned<i64>>,
    filtering: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    interval_ms: Option<Spanned<i64>>,
    timeout_ms: Option<Spanned<i64>>,
    down_after: Option<Spanned<i64>>,
    up_after: Option<Spanned<i64>>,
    reset_after_ms: Option<Spanned<i64>>,
}

impl Validator<'_> {
    pub(super) fn validate_dataplane(
        &mut self,
        raw: RawDataplane,
    ) -> Result<Dataplane, ConfigError> {
        let mut dataplane = Dataplane::default();
        if let Some(enabled) = &raw.enabled {
            self.note("dataplane.enabled", enabled);
            dataplane.enabled = *enabled.get_ref();
        }
        let mut number = |name: &str,
                          value: &Option<Spanned<i64>>,
                          range: std::ops::RangeInclusive<u32>,
                          slot: &mut u32| {
            if let Some(value) = value {
                let key = format!("dataplane.{name}");
                self.note(&key, value);
                let expected = format!("a number from {} to {}", range.start(), range.end());
                *slot = self.integer(&key, value, range, &expected)?;
            }
            Ok::<(), ConfigError>(())
        };
        number(
            "flow_entries",
            &raw.flow_entries,
            1024..=16_777_216,
            &mut dataplane.flow_entries,
        )?;
        let (mut port_min, mut port_max) = (
            u32::from(dataplane.nat_port_min),
            u32::from(dataplane.nat_port_max),
        );
        number(
            "nat_port_min",
            &raw.nat_port_min,
            1024..=65_535,
            &mut port_min,
        )?;
        number(
            "nat_port_max",
            &raw.nat_port_max,
            1024..=65_535,
            &mut port_max,
        )?;
        let week = 7 * 24 * 3600;
        number(
            "tcp_syn_timeout",
            &raw.tcp_syn_timeout,
            1..=week,
            &mut dataplane.tcp_syn_timeout,
        )?;
        number(
            "tcp_established_timeout",
            &raw.tcp_established_timeout,
            1..=week,
            &mut dataplane.tcp_established_timeout,
        )?;
        number(
            "tcp_closing_timeout",
            &raw.tcp_closing_timeout,
            1..=week,
            &mut dataplane.tcp_closing_timeout,
        )?;
        number(
            "udp_timeout",
            &raw.udp_timeout,
            1..=week,
            &mut dataplane.udp_timeout,
        )?;
        number(
            "icmp_timeout",
            &raw.icmp_timeout,
            1..=week,
            &mut dataplane.icmp_timeout,
        )?;
        if let Some(filtering) = &raw.filtering {
            self.note("dataplane.filtering", filtering);
            dataplane.filtering = match filtering.get_ref().as_str() {
                "address-and-port-dependent" => Filtering::AddressAndPortDependent,
                "endpoint-independent" => Filtering::EndpointIndependent,
                other => {
                    return Err(self.error(
                        "dataplane.filtering",
                        filtering,
                        format!(
                            "unknown filtering {other:?}: expected \"address-and-port-dependent\" \
                             (the default) or \"endpoint-independent\""
                        ),
                    ));
                }
            };
        }
        // Both bounds were range-checked above, so they fit in u16.
        dataplane.nat_port_min = u16::try_from(port_min).unwrap_or(u16::MAX);
        dataplane.nat_port_max = u16::try_from(port_max).unwrap_or(u16::MAX);
        if port_max < port_min + 63 {
            let span = raw.nat_port_max.as_ref().or(raw.nat_port_min.as_ref());
            return Err(ConfigError {
                key: "dataplane.nat_port_max".into(),
                line: span.map(|s| line_of(self.text, &s.span())),
                message: format!(
                    "the NAT port range {port_min}-{port_max} needs at least 64 ports"
                ),
            });
        }
        Ok(dataplane)
    }

    pub(super) fn validate_health(&mut self, raw: RawHealth) -> Result<Health, ConfigError> {
        let mut health = Health::default();
        let fields = [
            (
                "interval_ms",
                &raw.interval_ms,
                20..=60_000,
                &mut health.interval_ms,
            ),
            (
                "timeout_ms",
                &raw.timeout_ms,
                20..=60_000,
                &mut health.timeout_ms,
            ),
            (
                "down_after",
                &raw.down_after,
                1..=100,
                &mut health.down_after,
            ),
            ("up_after", &raw.up_after, 1..=100, &mut health.up_after),
            (
                "reset_after_ms",
                &raw.reset_after_ms,
                0..=3_600_000,
                &mut health.reset_after_ms,
            ),
        ];
        for (name, value, range, slot) in fields {
            if let Some(value) = value {
                let key = format!("health.{name}");
                self.note(&key, value);
                let expected = format!("a number from {} to {}", range.start(), range.end());
                *slot = self.integer(&key, value, range, &expected)?;
            }
        }
        Ok(health)
    }
}
