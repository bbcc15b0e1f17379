//! Filtering and hairpinning in the lab (RFC 4787 REQ-8 and REQ-9), with real UDP sockets:
//! - default (address-and-port-dependent) filtering: a second internet host's datagram to a
//!   LAN client's mapping does not reach the client; two LAN clients reach each other through
//!   their public mappings once both have sent (UDP hole punching), and not before;
//! - `filtering = "endpoint-independent"`: Debian's STUN client reports "Independent Filter"
//!   through each of three uplinks, a second host's unsolicited datagram reaches the client's
//!   mapped port with that host's address as its source, and one LAN client reaches another's
//!   mapping directly;
//! - reserved ports: a gateway service bound to an uplink address on a port in the NAT range
//!   keeps its traffic while a LAN client bound to the same port talks to the same remote, and
//!   `check` lists the port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{net::Ipv4Addr, time::Duration};

use balancer_tests::{
    lab::{Lab, LabSpec, SERVER_ADDR},
    process::ChildGuard,
};
use common::*;

/// A second internet host beside the lab's server: another address, never sent to.
const SECOND_HOST: &str = "198.18.9.3";
/// The STUN server's second address.
const STUN_ALTERNATE: &str = "198.18.9.2";
/// The internet server's UDP whoami port: answers with the source it saw.
const WHOAMI: u16 = 9000;

fn lab_with_filtering(tag: &str, uplinks: usize, filtering: Option<&str>) -> (Lab, ChildGuard) {
    let mut spec = LabSpec::new(&prefix(tag), uplinks);
    spec.rates_mbit = Vec::new();
    let lab = Lab::up(spec).unwrap();
    for extra in [SECOND_HOST, STUN_ALTERNATE] {
        lab.add_internet_address(extra).unwrap();
    }
    let mut text = lab.balancer_config_toml();
    if let Some(filtering) = filtering {
        text.push_str(&format!("\n[dataplane]\nfiltering = \"{filtering}\"\n"));
    }
    let config = write_config(&lab, "balancer.toml", &text);
    let check = balancer(&lab, &["check", "-c", &config]);
    let shown = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{shown}");
    assert!(
        shown.contains(&format!(
            "filtering {}",
            filtering.unwrap_or("address-and-port-dependent")
        )),
        "check shows the filtering: {shown}"
    );
    let daemon = start_daemon(&lab, &config);
    wait_for_dataplane(&lab);
    (lab, daemon)
}

/// `labtool udp-peer` in `ns`, bound to `bind`, sending to `send_to`; started, not awaited.
fn peer(lab: &Lab, ns: &str, bind: &str, send_to: &[String], sends: u32) -> ChildGuard {
    peer_with(lab, ns, bind, send_to, sends, &["--seconds", "4"])
}

/// [`peer`] with more arguments for `udp-peer`.
fn peer_with(
    lab: &Lab,
    ns: &str,
    bind: &str,
    send_to: &[String],
    sends: u32,
    extra: &[&str],
) -> ChildGuard {
    let labtool = lab.labtool().display().to_string();
    let sends = sends.to_string();
    let mut argv = vec![
        labtool.as_str(),
        "udp-peer",
        "--bind",
        bind,
        "--sends",
        &sends,
        "--interval-ms",
        "200",
    ];
    argv.extend(extra);
    for target in send_to {
        argv.extend(["--send-to", target.as_str()]);
    }
    lab.spawn(ns, &argv).unwrap()
}

/// What a peer received: (source, payload) pairs, once it has exited.
fn received(mut peer: ChildGuard) -> Vec<(String, String)> {
    let status = peer.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(status.is_some_and(|s| s.success()), "{}", peer.log());
    let log = peer.log();
    let line = log
        .lines()
        .find(|line| line.starts_with('{'))
        .unwrap_or_else(|| panic!("no summary from udp-peer:\n{log}"));
    let summary: serde_json::Value = serde_json::from_str(line).unwrap();
    summary["received"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["from"].as_str().unwrap().to_owned(),
                r["payload"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A LAN client bound to `port` talks to the whoami server while a second internet host
/// sends to `port` on every uplink address; returns what the client received and the public
/// endpoint the whoami server saw.
fn second_host_sends_to_the_mapping(lab: &Lab, port: u16) -> (Vec<(String, String)>, String) {
    let bind = format!("{}:{port}", lab.client_addr(1));
    let client = peer(
        lab,
        &lab.client(1),
        &bind,
        &[format!("{SERVER_ADDR}:{WHOAMI}")],
        3,
    );
    // The mapping exists once the first datagram left; the second host then sends.
    std::thread::sleep(Duration::from_millis(800));
    let targets: Vec<String> = (1..=lab.uplinks())
        .map(|i| format!("{}:{port}", lab.uplink_source(i)))
        .collect();
    let second = peer(
        lab,
        &lab.inet(),
        &format!("{SECOND_HOST}:7777"),
        &targets,
        3,
    );
    let got = received(client);
    received(second);
    let public = got
        .iter()
        .find(|(from, _)| *from == format!("{SERVER_ADDR}:{WHOAMI}"))
        .map(|(_, payload)| payload.trim().to_owned())
        .unwrap_or_else(|| panic!("no answer from the whoami server: {got:?}"));
    (got, public)
}

/// The STUN client's classification through a client endpoint on `port`.
fn stun(lab: &Lab, port: u16) -> String {
    let output = lab
        .exec_timeout(
            &lab.client(1),
            &[
                "stun",
                &SERVER_ADDR.to_string(),
                "-v",
                "-p",
                &port.to_string(),
            ],
            Duration::from_secs(30),
        )
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn default_filtering_keeps_a_second_hosts_datagram_out_and_hairpins_only_after_both_sent() {
    let (lab, _daemon) = lab_with_filtering("fd", 1, None);
    let uplink = lab.uplink_source(1);
    let (got, public) = second_host_sends_to_the_mapping(&lab, 62_001);
    assert_eq!(
        public,
        format!("{uplink}:62001"),
        "the mapping keeps the port"
    );
    assert!(
        got.iter().all(|(from, _)| !from.starts_with(SECOND_HOST)),
        "an unsolicited datagram got through address-and-port-dependent filtering: {got:?}"
    );

    // Hairpin, one side only: client 2 (mapped at uplink:62102 by talking to the server)
    // hears nothing from client 1, to whose public endpoint it never sent.
    let (a, b) = (lab.client_addr(1), lab.client_addr(2));
    let heard = client_1_to_client_2s_mapping(&lab, uplink, a, b);
    assert!(
        heard
            .iter()
            .all(|(from, _)| !from.starts_with(&uplink.to_string())),
        "client 2 heard client 1 before sending to it: {heard:?}"
    );

    // Both send to the other's public endpoint (hole punching): each hears the other, from
    // the other's public endpoint, not its private address.
    hole_punch(&lab, uplink, (a, 62_201), (b, 62_202));
}

/// Clients 1 and 2 (at `a` and `b`) send to each other's public endpoint on `uplink`; each must
/// hear the other with the other's public endpoint as source.
fn hole_punch(lab: &Lab, uplink: Ipv4Addr, a: (Ipv4Addr, u16), b: (Ipv4Addr, u16)) {
    let one = peer(
        lab,
        &lab.client(1),
        &format!("{}:{}", a.0, a.1),
        &[format!("{uplink}:{}", b.1)],
        10,
    );
    let two = peer(
        lab,
        &lab.client(2),
        &format!("{}:{}", b.0, b.1),
        &[format!("{uplink}:{}", a.1)],
        10,
    );
    let (heard_one, heard_two) = (received(one), received(two));
    let expect = |heard: &[(String, String)], from: (Ipv4Addr, u16)| {
        let public = format!("{uplink}:{}", from.1);
        let payload = format!("from {}:{}", from.0, from.1);
        assert!(
            heard.iter().any(|(src, p)| *src == public && *p == payload),
            "expected {payload:?} from {public}: {heard:?}"
        );
        assert!(
            heard
                .iter()
                .all(|(src, _)| !src.starts_with(&from.0.to_string())),
            "a private address leaked: {heard:?}"
        );
    };
    expect(&heard_one, b);
    expect(&heard_two, a);
}

#[test]
fn endpoint_independent_filtering_is_a_full_cone_through_each_uplink() {
    let (lab, _daemon) = lab_with_filtering("fe", 3, Some("endpoint-independent"));
    let _stund = lab
        .spawn(
            &lab.inet(),
            &[
                "stund",
                "-h",
                &SERVER_ADDR.to_string(),
                "-a",
                STUN_ALTERNATE,
            ],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut seen_uplinks = std::collections::BTreeSet::new();
    for port in 63_000u16..63_015 {
        if seen_uplinks.len() == 3 {
            break;
        }
        let text = stun(&lab, port);
        let verdict = text
            .lines()
            .rev()
            .find(|line| line.contains("Mapping"))
            .unwrap_or_else(|| panic!("no classification from stun -p {port}:\n{text}"));
        println!("stun -p {port}: {verdict}");
        assert!(
            verdict.contains("Independent Mapping") && verdict.contains("Independent Filter"),
            "port {port}: {verdict}\n{text}"
        );
        for uplink in 1..=3 {
            let mapped = format!("{}:{port}", lab.uplink_source(uplink));
            if text
                .lines()
                .any(|l| l.contains("MappedAddress") && l.contains(&mapped))
            {
                seen_uplinks.insert(uplink);
            }
        }
    }
    assert_eq!(
        seen_uplinks.len(),
        3,
        "full cone through every uplink: {seen_uplinks:?}"
    );

    // A second host, never sent to, reaches the mapped port; its address is the source.
    let (got, public) = second_host_sends_to_the_mapping(&lab, 62_001);
    assert!(public.ends_with(":62001"), "{public}");
    assert!(
        got.iter()
            .any(|(from, payload)| *from == format!("{SECOND_HOST}:7777")
                && payload.starts_with(&format!("from {SECOND_HOST}:7777"))),
        "the second host's datagram did not reach the client's mapping {public}: {got:?}"
    );
    assert!(
        balancer_stats_counter(&lab, "unsolicited_admitted") >= 1,
        "admitted flows are counted"
    );
}

#[test]
fn endpoint_independent_filtering_hairpins_to_a_mapping_directly() {
    let (lab, _daemon) = lab_with_filtering("fh", 1, Some("endpoint-independent"));
    let uplink = lab.uplink_source(1);
    let (a, b) = (lab.client_addr(1), lab.client_addr(2));
    // Client 2 has a mapping (it talked to the server) and never sends to client 1.
    let heard = client_1_to_client_2s_mapping(&lab, uplink, a, b);
    assert!(
        heard
            .iter()
            .any(|(from, p)| *from == format!("{uplink}:62101") && *p == format!("from {a}:62101")),
        "client 2 did not hear client 1 through its public endpoint: {heard:?}"
    );
    hole_punch(&lab, uplink, (a, 62_201), (b, 62_202));
    assert!(balancer_stats_counter(&lab, "hairpinned") >= 2);
}

/// Client 2 (LAN address `b`, port 62102) gets a mapping on `uplink` by talking to the server
/// and listens; client 1 (`a`, port 62101) then sends five datagrams to client 2's public
/// endpoint, `uplink`:62102. Returns what client 2 heard: (source, payload).
fn client_1_to_client_2s_mapping(
    lab: &Lab,
    uplink: Ipv4Addr,
    a: Ipv4Addr,
    b: Ipv4Addr,
) -> Vec<(String, String)> {
    let whoami = format!("{SERVER_ADDR}:{WHOAMI}");
    let listener = peer(lab, &lab.client(2), &format!("{b}:62102"), &[whoami], 1);
    std::thread::sleep(Duration::from_millis(500));
    let sender = peer(
        lab,
        &lab.client(1),
        &format!("{a}:62101"),
        &[format!("{uplink}:62102")],
        5,
    );
    let heard = received(listener);
    received(sender);
    heard
}

/// A LAN counter from `balancer stats --json`.
fn balancer_stats_counter(lab: &Lab, name: &str) -> u64 {
    let (value, _) = stats(lab);
    value[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in stats: {value}"))
}

#[test]
fn a_gateway_service_on_a_port_in_the_nat_range_keeps_its_traffic_beside_a_lan_client() {
    let mut spec = LabSpec::new(&prefix("rp"), 1);
    spec.rates_mbit = Vec::new();
    let lab = Lab::up(spec).unwrap();
    lab.add_internet_address(SECOND_HOST).unwrap();
    let uplink = lab.uplink_source(1);
    let service_addr = format!("{uplink}:62500");
    // The gateway's own UDP service (WireGuard on 51820 would be the same), there before the
    // daemon starts, as a service started at boot is.
    let service = peer_with(
        &lab,
        &lab.gw(),
        &service_addr,
        &[],
        0,
        &["--answer", "--seconds", "15"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let config = write_config(&lab, "balancer.toml", &lab.balancer_config_toml());
    let check = balancer(&lab, &["check", "-c", &config]);
    let warnings = String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success(), "{warnings}");
    assert!(
        warnings.contains("udp port 62500 is in the NAT range 32768-65535")
            && warnings.contains(&uplink.to_string())
            && warnings.contains("labtool")
            && warnings.contains("keeps it out of the mappings"),
        "check lists the service's port, address and process: {warnings}"
    );
    let _daemon = start_daemon(&lab, &config);
    wait_for_dataplane(&lab);

    // A LAN client bound to the same port talks to the same remote first, then the remote
    // talks to the service.
    let client_bind = format!("{}:62500", lab.client_addr(1));
    let remote_addr = format!("{SECOND_HOST}:7777");
    let client = peer(
        &lab,
        &lab.client(1),
        &client_bind,
        std::slice::from_ref(&remote_addr),
        10,
    );
    std::thread::sleep(Duration::from_millis(500));
    let remote = peer(
        &lab,
        &lab.inet(),
        &remote_addr,
        std::slice::from_ref(&service_addr),
        5,
    );
    let heard_remote = received(remote);
    let heard_client = received(client);
    drop(service);
    assert!(
        heard_remote.iter().any(|(from, p)| *from == service_addr
            && p.starts_with(&format!("answer from {service_addr}"))),
        "the service did not answer the remote: {heard_remote:?}"
    );
    let client_public = heard_remote
        .iter()
        .find(|(_, p)| *p == format!("from {client_bind}"))
        .map(|(from, _)| from.clone())
        .unwrap_or_else(|| {
            panic!("the client's datagrams never reached the remote: {heard_remote:?}")
        });
    assert!(
        client_public.starts_with(&format!("{uplink}:")) && client_public != service_addr,
        "the client's translated endpoint {client_public} must be another port of {uplink}"
    );
    assert!(
        heard_client
            .iter()
            .all(|(from, _)| !from.starts_with(SECOND_HOST)),
        "the remote's datagrams to the service reached the LAN client: {heard_client:?}"
    );
}
