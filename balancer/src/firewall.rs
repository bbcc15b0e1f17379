//! The host firewall beside balancer, read-only: finds nftables source NAT (masquerade, snat;
//! iptables-nft's rules included) that can act on an uplink. Such a rule allocates its own
//! ports on the uplink's address, which can collide with the data plane's NAT ports and send
//! replies to the wrong client, so `check` warns about it. DNAT (port forwards) and filtering
//! are the administrator's and fine.

use std::process::Command;

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
}
