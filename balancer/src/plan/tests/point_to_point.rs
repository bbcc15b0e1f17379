//! Uplinks whose gateway is not a host of an Ethernet subnet: a point-to-point `A peer B` and
//! a /31 (RFC 3021).

use super::*;

/// A raw-IP uplink (PPPoE, LTE) has `A peer B`, a /32: its gateway is the peer, and its table
/// reaches the peer the way the kernel's connected route does.
#[test]
fn a_point_to_point_uplink_takes_its_peer_as_gateway() {
    let text = CONFIG.replace(
        "gateway = \"198.18.1.1\"\nsource = \"198.18.1.3\"",
        "gateway = \"198.19.23.1\"\nsource = \"198.19.23.2\"",
    );
    let config = Config::parse(&text).unwrap();
    let mut observed = observed();
    observed.links[3].raw_ip = true;
    observed.addresses[2] = Address {
        ifindex: 4,
        network: "198.19.23.2/32".parse().unwrap(),
        peer: Some("198.19.23.1".parse().unwrap()),
        primary: true,
    };
    let planned = desired(&config, &observed, Strictness::Strict).unwrap();
    let table_2002: Vec<String> = planned
        .routes
        .iter()
        .filter(|r| r.table == 2002)
        .map(|r| r.to_string())
        .collect();
    assert_eq!(
        table_2002[..2],
        [
            "default via 198.19.23.1 dev wan2 src 198.19.23.2 table 2002 proto 77",
            "198.19.23.1/32 dev wan2 scope link src 198.19.23.2 table 2002 proto 77",
        ]
    );
    // Any other gateway is refused, naming the peer.
    let wrong = Config::parse(&text.replace("198.19.23.1", "198.19.23.9")).unwrap();
    let error = desired(&wrong, &observed, Strictness::Strict)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("uplink[1].gateway") && error.contains("not the peer 198.19.23.1"),
        "{error}"
    );
}

/// RFC 3021: on a /31 the other address is the gateway, though it is the "broadcast" address of
/// a longer prefix.
#[test]
fn a_31_uplink_takes_the_other_address_as_gateway() {
    let text = CONFIG.replace(
        "gateway = \"198.18.1.1\"\nsource = \"198.18.1.3\"",
        "gateway = \"198.19.31.1\"\nsource = \"198.19.31.0\"",
    );
    let config = Config::parse(&text).unwrap();
    let mut observed = observed();
    observed.addresses[2] = address(4, "198.19.31.0/31");
    let planned = desired(&config, &observed, Strictness::Strict).unwrap();
    assert!(
        planned.routes.iter().any(|r| r.to_string()
            == "default via 198.19.31.1 dev wan2 src 198.19.31.0 table 2002 proto 77"),
        "{:?}",
        planned.routes
    );
    // On a /30 the other end's address may be the broadcast address: refused.
    let text = text
        .replace("198.19.31.1", "198.19.31.3")
        .replace("198.19.31.0", "198.19.31.2");
    observed.addresses[2] = address(4, "198.19.31.2/30");
    let broadcast = Config::parse(&text).unwrap();
    let error = desired(&broadcast, &observed, Strictness::Strict)
        .unwrap_err()
        .to_string();
    assert!(error.contains("is not a host in wan2's subnet"), "{error}");
}
