//! The host firewall beside balancer, read-only: finds nftables source NAT (masquerade, snat;
//! iptables-nft's rules included) that can act on an uplink. Such a rule allocates its own
//! ports on the uplink's address, which can collide with the data plane's NAT ports and send
//! replies to the wrong client, so `check` warns about it. DNAT (port forwards) and filtering
//! are the administrator's and fine; the ports they forward are read for the data plane, which
//! records unsolicited UDP as an inbound connection only on those ports and never maps a
//! forwarded port (`host_ports`).

use std::{collections::BTreeSet, process::Command};

use serde_json::Value;

/// One source NAT rule that can act on an uplink's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceNatRule {
    /// `family table chain`, as `nft list chain` takes them.
    pub chain: String,
    pub handle: Option<u64>,
    /// `masquerade` or `snat`.
    pub action: String,
    /// The uplink interfaces it can act on.
    pub interfaces: Vec<String>,
}

/// Why the ruleset could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("running `nft -j list ruleset`")]
    Run(#[source] std::io::Error),
    #[error("`nft -j list ruleset` failed: {0}")]
    Failed(String),
    #[error("parsing the output of `nft -j list ruleset`")]
    Parse(#[source] serde_json::Error),
}

/// The host's nftables ruleset as JSON; `Ok(None)` where nft is not installed (then there is
/// no nftables firewall to check either).
pub fn read_ruleset() -> Result<Option<String>, FirewallError> {
    let output = match Command::new("nft").args(["-j", "list", "ruleset"]).output() {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(FirewallError::Run(error)),
    };
    if !output.status.success() {
        return Err(FirewallError::Failed(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    Ok(Some(String::from_utf8_lossy(&output.stdout).into_owned()))
}

/// The source NAT rules of `ruleset` (`nft -j list ruleset`) that can act on any of
/// `uplinks`: those that match an uplink by `oifname`/`oif` (a name, a wildcard, a set), that
/// exclude other interfaces only (`!=`), or that do not match on the outgoing interface at all.
pub fn source_nat_on_uplinks(
    ruleset: &str,
    uplinks: &[String],
) -> Result<Vec<SourceNatRule>, FirewallError> {
    let value: Value = serde_json::from_str(ruleset).map_err(FirewallError::Parse)?;
    let mut found = Vec::new();
    for item in value["nftables"].as_array().into_iter().flatten() {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let family = rule["family"].as_str().unwrap_or_default();
        if family != "ip" && family != "inet" {
            continue;
        }
        let expressions = rule["expr"].as_array().cloned().unwrap_or_default();
        let Some(action) = expressions.iter().find_map(source_nat_action) else {
            continue;
        };
        let mut interfaces: Vec<String> = uplinks.to_vec();
        for expression in &expressions {
            if let Some((equal, names)) = outgoing_interface_match(expression) {
                interfaces.retain(|uplink| names.iter().any(|n| matches(n, uplink)) == equal);
            }
        }
        if !interfaces.is_empty() {
            found.push(SourceNatRule {
                chain: format!(
                    "{family} {} {}",
                    rule["table"].as_str().unwrap_or_default(),
                    rule["chain"].as_str().unwrap_or_default()
                ),
                handle: rule["handle"].as_u64(),
                action,
                interfaces,
            });
        }
    }
    Ok(found)
}

/// The ports the host's nftables DNAT forwards, by protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwards {
    pub udp: BTreeSet<u16>,
    pub tcp: BTreeSet<u16>,
}

/// The forwards of the host's nftables ruleset; none where nft is not installed.
pub fn read_forwards() -> Result<Forwards, FirewallError> {
    match read_ruleset()? {
        Some(ruleset) => Ok(Forwards {
            udp: forwarded_ports(&ruleset, "udp")?,
            tcp: forwarded_ports(&ruleset, "tcp")?,
        }),
        None => Ok(Forwards::default()),
    }
}

/// The UDP destination ports that DNAT rules of `ruleset` (`nft -j list ruleset`) forward:
/// rules with a `dnat` statement (or an iptables-nft `DNAT` target) that match `udp dport`, or
/// `th dport` beside `meta l4proto udp`, on a port, a range, an anonymous set or a named set.
/// A forward matched by a means not read here (e.g. iptables' `multiport`) is not found.
pub fn forwarded_udp_ports(ruleset: &str) -> Result<BTreeSet<u16>, FirewallError> {
    forwarded_ports(ruleset, "udp")
}

/// [`forwarded_udp_ports`] for `protocol` (`"udp"` or `"tcp"`).
pub fn forwarded_ports(ruleset: &str, protocol: &str) -> Result<BTreeSet<u16>, FirewallError> {
    let wanted = protocol;
    let value: Value = serde_json::from_str(ruleset).map_err(FirewallError::Parse)?;
    let items: Vec<&Value> = value["nftables"].as_array().into_iter().flatten().collect();
    let mut ports = BTreeSet::new();
    for rule in items.iter().filter_map(|item| item.get("rule")) {
        let family = rule["family"].as_str().unwrap_or_default();
        if family != "ip" && family != "inet" {
            continue;
        }
        let expressions = rule["expr"].as_array().cloned().unwrap_or_default();
        if !expressions.iter().any(is_destination_nat) {
            continue;
        }
        let protocol_only = expressions
            .iter()
            .any(|expression| matches_protocol(expression, wanted));
        for expression in &expressions {
            let Some(matching) = expression.get("match") else {
                continue;
            };
            let op = matching["op"].as_str().unwrap_or("==");
            if op != "==" && op != "in" {
                continue;
            }
            let payload = &matching["left"]["payload"];
            let protocol = payload["protocol"].as_str().unwrap_or_default();
            let is_dport = payload["field"].as_str() == Some("dport")
                && (protocol == wanted || (protocol == "th" && protocol_only));
            if is_dport {
                let right = &matching["right"];
                match right.as_str().and_then(|name| name.strip_prefix('@')) {
                    Some(name) => {
                        for elements in named_set(&items, rule, name) {
                            add_ports(elements, &mut ports);
                        }
                    }
                    None => add_ports(right, &mut ports),
                }
            }
        }
    }
    Ok(ports)
}

/// `dnat`, or an iptables-nft `DNAT` target.
fn is_destination_nat(expression: &Value) -> bool {
    expression.get("dnat").is_some()
        || expression["xt"]["name"]
            .as_str()
            .is_some_and(|name| name.eq_ignore_ascii_case("dnat"))
}

/// `meta l4proto <protocol>` (or `ip protocol <protocol>`), `protocol` being `udp` or `tcp`.
fn matches_protocol(expression: &Value, protocol: &str) -> bool {
    let number = if protocol == "tcp" { 6 } else { 17 };
    let matching = &expression["match"];
    let left = &matching["left"];
    let protocol_key = left["meta"]["key"].as_str() == Some("l4proto")
        || left["payload"]["field"].as_str() == Some("protocol");
    protocol_key && matching["op"].as_str().unwrap_or("==") == "==" && {
        let right = &matching["right"];
        right.as_str() == Some(protocol) || right.as_u64() == Some(number)
    }
}

/// The elements of the named set `name` in the rule's table.
fn named_set<'a>(items: &[&'a Value], rule: &Value, name: &str) -> Vec<&'a Value> {
    items
        .iter()
        .filter_map(|item| item.get("set"))
        .filter(|set| {
            set["name"].as_str() == Some(name)
                && set["table"] == rule["table"]
                && set["family"] == rule["family"]
        })
        .filter_map(|set| set.get("elem"))
        .collect()
}

/// Adds the ports a match's right-hand side names: a number, `{"range": [a, b]}`, an
/// anonymous `{"set": [...]}` or a named set's `elem` list of those.
fn add_ports(right: &Value, ports: &mut BTreeSet<u16>) {
    if let Some(port) = right.as_u64().and_then(|p| u16::try_from(p).ok()) {
        ports.insert(port);
    } else if let Some([low, high]) = right["range"].as_array().map(Vec::as_slice) {
        let bound = |v: &Value| v.as_u64().and_then(|p| u16::try_from(p).ok());
        if let (Some(low), Some(high)) = (bound(low), bound(high)) {
            ports.extend(low..=high);
        }
    } else if let Some(elements) = right
        .get("set")
        .and_then(Value::as_array)
        .or(right.as_array())
    {
        for element in elements {
            // A named set's element may be wrapped: {"elem": {"val": 53, ...}}.
            match element.get("elem") {
                Some(wrapped) => add_ports(&wrapped["val"], ports),
                None => add_ports(element, ports),
            }
        }
    }
}

/// `masquerade` or `snat` when the expression is one (native, or an iptables-nft target).
fn source_nat_action(expression: &Value) -> Option<String> {
    for action in ["masquerade", "snat"] {
        if expression.get(action).is_some() {
            return Some(action.to_string());
        }
    }
    let target = expression.get("xt")?;
    let name = target["name"].as_str()?.to_ascii_lowercase();
    (name == "masquerade" || name == "snat").then_some(name)
}

/// For `meta oifname`/`oif` matches: whether it is `==` (or `!=`) and the names it lists.
fn outgoing_interface_match(expression: &Value) -> Option<(bool, Vec<String>)> {
    let matching = expression.get("match")?;
    let key = matching["left"]["meta"]["key"].as_str()?;
    if key != "oifname" && key != "oif" {
        return None;
    }
    let equal = matching["op"].as_str() != Some("!=");
    let right = &matching["right"];
    let names: Vec<String> = match right.get("set").and_then(Value::as_array) {
        Some(set) => set
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        None => right.as_str().map(str::to_string).into_iter().collect(),
    };
    Some((equal, names))
}

/// nft interface name patterns: exact, or a trailing `*` wildcard.
fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rule(handle: u64, expressions: &str) -> String {
        format!(
            r#"{{"rule": {{"family": "ip", "table": "nat", "chain": "post", "handle": {handle}, "expr": [{expressions}]}}}}"#
        )
    }

    fn oifname(op: &str, right: &str) -> String {
        format!(
            r#"{{"match": {{"op": "{op}", "left": {{"meta": {{"key": "oifname"}}}}, "right": {right}}}}}"#
        )
    }

    #[test]
    fn finds_source_nat_that_acts_on_an_uplink() {
        let masquerade = r#"{"masquerade": null}"#;
        let snat = r#"{"snat": {"addr": "192.0.2.1"}}"#;
        let dnat = r#"{"dnat": {"addr": "198.18.0.11", "port": 80}}"#;
        let rules = [
            rule(1, &format!("{},{masquerade}", oifname("==", r#""wan1""#))),
            rule(
                2,
                &format!("{},{snat}", oifname("==", r#"{"set": ["wan2", "tun0"]}"#)),
            ),
            rule(3, &format!("{},{masquerade}", oifname("==", r#""wan*""#))),
            rule(4, &format!("{},{masquerade}", oifname("!=", r#""lan0""#))),
            rule(5, masquerade),
            rule(6, &format!("{},{masquerade}", oifname("==", r#""tun0""#))),
            rule(7, &format!("{},{masquerade}", oifname("!=", r#""wan1""#))),
            rule(8, dnat),
            rule(9, r#"{"xt": {"type": "target", "name": "MASQUERADE"}}"#),
        ];
        let ruleset = format!(
            r#"{{"nftables": [{{"metainfo": {{}}}}, {}]}}"#,
            rules.join(",")
        );
        let uplinks = ["wan1".to_string(), "wan2".to_string()];
        let found = source_nat_on_uplinks(&ruleset, &uplinks).unwrap();
        let summary: Vec<(u64, &str, Vec<&str>)> = found
            .iter()
            .map(|r| {
                (
                    r.handle.unwrap(),
                    r.action.as_str(),
                    r.interfaces.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (1, "masquerade", vec!["wan1"]),
                (2, "snat", vec!["wan2"]),
                (3, "masquerade", vec!["wan1", "wan2"]),
                (4, "masquerade", vec!["wan1", "wan2"]),
                (5, "masquerade", vec!["wan1", "wan2"]),
                (7, "masquerade", vec!["wan2"]),
                (9, "masquerade", vec!["wan1", "wan2"]),
            ]
        );
        assert_eq!(found[0].chain, "ip nat post");
    }

    #[test]
    fn an_empty_ruleset_or_garbage() {
        let none = source_nat_on_uplinks(r#"{"nftables": []}"#, &["wan1".into()]).unwrap();
        assert!(none.is_empty());
        assert!(source_nat_on_uplinks("not json", &["wan1".into()]).is_err());
    }

    fn udp_dport(right: &str) -> String {
        format!(
            r#"{{"match": {{"op": "==", "left": {{"payload": {{"protocol": "udp", "field": "dport"}}}}, "right": {right}}}}}"#
        )
    }

    #[test]
    fn finds_the_udp_ports_that_dnat_forwards() {
        let dnat = r#"{"dnat": {"addr": "198.18.0.11", "port": 9000}}"#;
        let th_dport = r#"{"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 5353}}"#;
        let l4proto_udp =
            r#"{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}}"#;
        let tcp_dport = r#"{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 8080}}"#;
        let rules = [
            rule(1, &format!("{},{dnat}", udp_dport("5060"))),
            rule(
                2,
                &format!("{},{dnat}", udp_dport(r#"{"range": [6000, 6002]}"#)),
            ),
            rule(
                3,
                &format!(
                    "{},{dnat}",
                    udp_dport(r#"{"set": [7000, {"range": [7100, 7101]}]}"#)
                ),
            ),
            rule(4, &format!("{l4proto_udp},{th_dport},{dnat}")),
            rule(5, &format!("{},{dnat}", udp_dport(r#""@forwards""#))),
            rule(
                6,
                &format!(
                    "{},{}",
                    udp_dport("8000"),
                    r#"{"xt": {"type": "target", "name": "DNAT"}}"#
                ),
            ),
            // Not forwards: TCP only, `th dport` without UDP, no DNAT, a negated port.
            rule(7, &format!("{tcp_dport},{dnat}")),
            rule(8, &format!("{th_dport},{dnat}").replace("5353", "5400")),
            rule(9, &format!("{},{{\"accept\": null}}", udp_dport("9999"))),
            rule(
                10,
                &format!("{},{dnat}", udp_dport("53").replace("==", "!=")),
            ),
        ];
        let named = r#"{"set": {"family": "ip", "table": "nat", "name": "forwards", "type": "inet_service", "elem": [4000, {"range": [4010, 4011]}, {"elem": {"val": 4020, "comment": "x"}}]}}"#;
        let other_table = r#"{"set": {"family": "ip", "table": "filter", "name": "forwards", "type": "inet_service", "elem": [4444]}}"#;
        let ruleset = format!(
            r#"{{"nftables": [{{"metainfo": {{}}}}, {named}, {other_table}, {}]}}"#,
            rules.join(",")
        );
        // The TCP forward only (a `th dport` needs its protocol named).
        assert_eq!(
            forwarded_ports(&ruleset, "tcp").unwrap(),
            BTreeSet::from([8080])
        );
        let found: Vec<u16> = forwarded_udp_ports(&ruleset).unwrap().into_iter().collect();
        assert_eq!(
            found,
            [
                4000, 4010, 4011, 4020, 5060, 5353, 6000, 6001, 6002, 7000, 7100, 7101, 8000
            ]
        );
        assert!(
            forwarded_udp_ports(r#"{"nftables": []}"#)
                .unwrap()
                .is_empty()
        );
        assert!(forwarded_udp_ports("not json").is_err());
    }
}
