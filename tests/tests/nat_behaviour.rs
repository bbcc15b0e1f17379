//! How applications see the NAT, in the lab with Debian's classic STUN client and server
//! (RFC 3489 classification): endpoint-independent mapping through each of three uplinks, and
//! the client's port kept when it lies in the NAT range (32768-65535 by default, so the
//! daemon moves the gateway's own ephemeral ports below it, and `down` puts them back).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use balancer_tests::lab::{Lab, LabSpec};
use common::*;

/// The STUN server's second address, beside the lab's server address on the internet host.
const STUN_ALTERNATE: &str = "198.18.9.2";

#[test]
fn a_stun_client_sees_independent_mapping_through_three_uplinks() {
    let mut spec = LabSpec::new(&prefix("st"), 3);
    spec.rates_mbit = Vec::new();
    let lab = Lab::up(spec).unwrap();
    lab.add_internet_address(STUN_ALTERNATE).unwrap();
    let _stund = lab
        .spawn(
            &lab.inet(),
            &["stund", "-h", "198.18.9.1", "-a", STUN_ALTERNATE],
        )
        .unwrap();
    let config = write_config(&lab, "balancer.toml", &lab.balancer_config_toml());
    let _daemon = start_daemon(&lab, &config);
    wait_for_dataplane(&lab);

    // Endpoints in the NAT range (32768-65535), until each uplink has carried one: new
    // endpoints are spread over the three uplinks (weights 1:1:1, each CPU its own walk).
    let mut seen_uplinks = std::collections::BTreeSet::new();
    for port in 62_000u16..62_012 {
        if seen_uplinks.len() == 3 {
            break;
        }
        let port_text = port.to_string();
        let output = lab
            .exec_timeout(
                &lab.client(1),
                &["stun", "198.18.9.1", "-v", "-p", &port_text],
                Duration::from_secs(30),
            )
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let verdict = text
            .lines()
            .rev()
            .find(|line| line.contains("Mapping"))
            .unwrap_or_else(|| panic!("no classification from stun -p {port}:\n{text}"));
        println!("stun -p {port}: {verdict}");
        assert!(
            verdict.contains("Independent Mapping"),
            "port {port}: {verdict}\n{text}"
        );
        assert!(
            verdict.contains("preserves ports"),
            "port {port}: {verdict}\n{text}"
        );
        // The mapped address the server reported: an uplink's address with the client's port.
        let mapped: Vec<&str> = text
            .lines()
            .filter(|line| line.contains("MappedAddress"))
            .collect();
        assert!(!mapped.is_empty(), "no mapped address in:\n{text}");
        for line in &mapped {
            assert!(
                line.contains(&format!(":{port}")),
                "port {port} not kept: {line}"
            );
        }
        for uplink in 1..=3 {
            let source = lab.uplink_source(uplink).to_string();
            if mapped
                .iter()
                .all(|line| line.contains(&format!("{source}:")))
            {
                seen_uplinks.insert(uplink);
            }
        }
    }
    assert_eq!(
        seen_uplinks.len(),
        3,
        "each uplink carried an endpoint, each with one address: {seen_uplinks:?}"
    );
}

/// The gateway's `ip_local_port_range`, as two numbers.
fn local_port_range(lab: &Lab) -> (u16, u16) {
    let text = lab
        .exec_ok(
            &lab.gw(),
            &["cat", "/proc/sys/net/ipv4/ip_local_port_range"],
        )
        .unwrap();
    let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

#[test]
fn run_moves_the_gateways_own_ports_below_the_nat_range_and_down_restores_them() {
    let mut spec = LabSpec::new(&prefix("lp"), 1);
    spec.rates_mbit = Vec::new();
    let lab = Lab::up(spec).unwrap();
    assert_eq!(local_port_range(&lab), (32_768, 60_999), "Linux's default");
    let config = write_config(&lab, "balancer.toml", &lab.balancer_config_toml());
    // `check` accepts the overlap that `run` removes.
    let check = balancer(&lab, &["check", "-c", &config]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let mut daemon = start_daemon(&lab, &config);
    wait_for_dataplane(&lab);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while local_port_range(&lab) != (16_384, 32_767) {
        assert!(
            std::time::Instant::now() < deadline,
            "not moved: {:?}",
            local_port_range(&lab)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The gateway's own connection leaves from a port below the NAT range.
    let seen = lab
        .tcp_whoami(&lab.gw(), None, Duration::from_secs(3))
        .unwrap();
    assert!(seen.port() < 32_768, "the gateway's own port {seen}");
    daemon.terminate(Duration::from_secs(5)).unwrap();
    let down = balancer(&lab, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert_eq!(local_port_range(&lab), (32_768, 60_999), "restored by down");

    // NAT ports too low to move the gateway's range below them: refused, naming the key.
    let low = write_config(
        &lab,
        "low.toml",
        &format!(
            "{}\n[dataplane]\nnat_port_min = 2000\n",
            lab.balancer_config_toml()
        ),
    );
    let refused = balancer(&lab, &["check", "-c", &low]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("dataplane.nat_port_min"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
