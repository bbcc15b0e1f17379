//! The field's uplinks coming, going and renumbering, in the lab, each configured by interface
//! name only: a raw-IP point-to-point uplink (TUN devices relayed by `labtool tun-relay`, what
//! `ppp0` or `wwan0` is to tc) absent at start, joining, deleted mid-transfer by ending its
//! relay (a dropped session) and back with another address; and a DHCP uplink (dnsmasq at the
//! ISP, udhcpc on the gateway) renumbered mid-transfer. Each ISP forwards only its customer's
//! address, so a connection that arrives proves the source; the NAT maps are read from the pins.
//!
//! Root only. Each test builds its own lab and daemon.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use balancer_tests::{
    lab::{Lab, LabSpec, SERVER_ADDR, SOURCE_PORT, Transfer},
    process::{check, run_bounded},
};
use common::{field::*, *};

/// The internet host every uplink probes, and the lab's DNS server (which the proxy needs).
const TRACK: &str = "track = [\"198.18.9.1\"]\ndns = [\"198.18.9.53\"]\n";

/// Longest a connection on a deleted uplink may live on at its client: the default
/// `health.reset_after_ms` (1 s) plus a pass and some scheduling slack.
const RESET_AFTER_DELETION: Duration = Duration::from_millis(2500);

/// Longest a connection on a renumbered uplink may live on at its client once the new address
/// is there: it is reset at once, within a pass (with scheduling slack).
const RESET_AT_ONCE: Duration = Duration::from_millis(1000);

/// Longest a connection on a line that went silent may live on at its client: passive detection
/// (nothing answered, about a second here) plus the same reset delay, with room for a loaded
/// machine (measured 2.0 s idle, 3.6 s under load). A connection left hanging is not an error
/// at all: it runs to the download's end and is caught by its peer and gap.
const RESET_AFTER_SILENCE: Duration = Duration::from_millis(5000);

/// What one download of [`downloads_through`] came to, and when it ended.
struct Ended {
    result: anyhow::Result<Transfer>,
    at: Instant,
}

/// Runs six 8 s downloads from client 2 (spread over the uplinks by the round robin), calls
/// `event` with the lab 800 ms in, and returns when the event happened, what `event` returned,
/// and how each download ended. The downloads run `labtool` themselves, so `event` may change
/// the lab (end a relay, renumber).
fn downloads_through<T>(
    lab: &mut Lab,
    event: impl FnOnce(&mut Lab) -> (Instant, T),
) -> (Instant, T, Vec<Ended>) {
    let (ns, tool) = (lab.client(2), lab.labtool().to_string_lossy().into_owned());
    let server = SocketAddrV4::new(SERVER_ADDR, SOURCE_PORT).to_string();
    thread::scope(|s| {
        let downloads: Vec<_> = (0..6)
            .map(|_| {
                let (ns, tool, server) = (&ns, &tool, &server);
                s.spawn(move || {
                    let output = run_bounded(
                        Command::new("ip").args([
                            "netns",
                            "exec",
                            ns,
                            tool,
                            "download",
                            server,
                            "--seconds",
                            "8",
                        ]),
                        Duration::from_secs(20),
                    );
                    let at = Instant::now();
                    let result = output.and_then(|output| {
                        check("download", &output)?;
                        Ok(serde_json::from_slice::<Transfer>(&output.stdout)?)
                    });
                    Ended { result, at }
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(800));
        let (at, value) = event(lab);
        let ended = downloads.into_iter().map(|d| d.join().unwrap()).collect();
        (at, value, ended)
    })
}

/// The downloads on uplink address `lost` were reset at their clients within `bound` of
/// `event` (a download that stalls is not an error: it runs to its end and reports the gap);
/// every other one ran to its end without a stall.
fn assert_reset_only_on(
    ended: &[Ended],
    lost: Ipv4Addr,
    event: Instant,
    bound: Duration,
    log: &str,
) {
    let mut reset = Vec::new();
    for (n, download) in ended.iter().enumerate() {
        match &download.result {
            Ok(transfer) => {
                let peer = transfer.peer.expect("download summaries name the peer");
                assert_ne!(
                    *peer.ip(),
                    lost,
                    "download {n} on {lost} outlived its address: {transfer:?}"
                );
                let gap = transfer.max_gap_ms.unwrap_or(f64::MAX);
                assert!(
                    gap < 2000.0,
                    "download {n} on {peer} stalled {gap} ms: {transfer:?}"
                );
            }
            Err(e) => {
                // A stalled download runs to its end and reports its gap; only a reset or a
                // refusal is an error, and the client names the address it was reading as.
                let text = format!("{e:#}");
                assert!(
                    text.contains(&format!("as {lost}:")),
                    "download {n} failed, but not on {lost}: {text}"
                );
                let after = download.at.saturating_duration_since(event);
                assert!(
                    after < bound,
                    "download {n} must be reset, not hang: it ended {after:?} after the event: {e:#}\n{log}"
                );
                reset.push(after);
            }
        }
    }
    eprintln!("downloads reset after the event: {reset:?}");
    assert!(
        !reset.is_empty(),
        "none of 6 downloads ran on {lost}: the test proves nothing"
    );
}

/// The gateway's own connection bound to `source` reaches the internet host as `source` (its
/// ISP drops any other source).
fn assert_own_traffic_from(lab: &Lab, source: Ipv4Addr) {
    let seen = lab
        .tcp_whoami(&lab.gw(), Some(source), Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("the gateway's own TCP from {source}: {e:#}"));
    assert_eq!(*seen.ip(), source);
}

/// The address the internet host sees for the gateway's own unbound TCP connection (the
/// balancer's routes pick the uplink and its source; each ISP drops any other source).
fn own_unbound_source(lab: &Lab) -> Ipv4Addr {
    let seen = lab
        .tcp_whoami(&lab.gw(), None, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("the gateway's own unbound TCP: {e:#}"));
    *seen.ip()
}

/// wan1 and wan3 Ethernet with explicit gateways; wan2 a raw-IP link, absent when the daemon
/// starts (hotplug, relay not started), then joining, dropping mid-transfer and redialling
/// with another address.
#[test]
fn a_raw_ip_uplink_named_by_interface_joins_drops_and_comes_back_with_another_address() {
    let mut spec = LabSpec::new(&prefix("fl"), 3);
    spec.rates_mbit.clear();
    spec.raw_ip = vec![2];
    let mut lab = Lab::up(spec).unwrap();
    let (source, peer) = (lab.uplink_source(2), lab.uplink_gateway(2));
    lab.disconnect_raw_ip(2).unwrap();
    let mut text = LAN.to_string();
    for i in [1, 3] {
        text.push_str(&format!(
            "\n[[uplink]]\nname = \"isp{i}\"\nid = {i}\ninterface = \"wan{i}\"\ngateway = \"{}\"\n{TRACK}",
            lab.uplink_gateway(i)
        ));
    }
    text.push_str(&format!(
        "\n[[uplink]]\nname = \"lte\"\nid = 2\ninterface = \"wan2\"\nhotplug = true\n{TRACK}\n[proxy]\nlisten = \"{PROXY}\"\n"
    ));
    let config = write_config(&lab, "balancer.toml", &text);
    let check = balancer(&lab, &["check", "-c", &config]);
    assert!(
        check.status.success()
            && String::from_utf8_lossy(&check.stdout).contains("there is no interface wan2"),
        "check accepts the absent uplink and says it waits: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let mut daemon = start_daemon(&lab, &config);
    let lte = |lab: &Lab| {
        status(lab)["uplinks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["name"] == "lte")
            .cloned()
            .unwrap()
    };
    assert_eq!(lte(&lab)["stages"]["present"]["ok"], false);

    // The session comes up: new flows from its address within 2 s, none lost meanwhile.
    lab.connect_raw_ip(2, source, peer).unwrap();
    let took = join_without_loss(&lab, source, Duration::from_secs(2));
    eprintln!("the raw-IP uplink carried new flows {took:?} after it appeared");
    let row = lte(&lab);
    assert_eq!(row["source"], source.to_string(), "{row:#}");
    assert_own_traffic_from(&lab, source);

    // The session drops mid-transfer: both TUN devices vanish with the relay.
    let (deleted, many, ended) = downloads_through(&mut lab, |lab| {
        lab.disconnect_raw_ip(2).unwrap();
        let deleted = Instant::now();
        thread::sleep(Duration::from_millis(200));
        let many = lab
            .tcp_many(&lab.client(1), 30, None, Duration::from_secs(1))
            .unwrap();
        (deleted, many)
    });
    assert_eq!(
        (many.succeeded, many.failed),
        (30, 0),
        "new connections 200 ms after the deletion: {many:?}\n{}",
        daemon.log()
    );
    assert!(!many.sources.contains_key(&source), "{many:?}");
    assert_reset_only_on(&ended, source, deleted, RESET_AFTER_DELETION, &daemon.log());

    // A black hole on isp1 afterwards is still routed around within a second.
    ip(
        &lab,
        &lab.isp(1),
        &["rule add iif down0 blackhole prio 50".into()],
    );
    let holed = Instant::now();
    thread::sleep(Duration::from_millis(1000));
    let many = lab
        .tcp_many(&lab.client(1), 20, None, Duration::from_secs(1))
        .unwrap();
    assert_eq!(
        (many.succeeded, many.failed),
        (20, 0),
        "{:?} after the black hole on isp1: {many:?}\n{}",
        holed.elapsed(),
        daemon.log()
    );
    // The gateway's own unbound traffic too: only wan3 is left to carry it.
    assert_eq!(own_unbound_source(&lab), lab.uplink_source(3));

    // Redialled with another address (the ISP now forwards only that one).
    let new = Ipv4Addr::new(198, 18, 2, 7);
    lab.set_isp_customer(2, new).unwrap();
    lab.connect_raw_ip(2, new, peer).unwrap();
    let took = join_without_loss(&lab, new, Duration::from_secs(2));
    eprintln!("back with {new}: new flows {took:?} after it appeared");
    let row = lte(&lab);
    assert_eq!(row["source"], new.to_string(), "{row:#}");
    assert_eq!(row["stages"]["usable"]["ok"], true, "{row:#}");
    assert_own_traffic_from(&lab, new);
    let unbound = own_unbound_source(&lab);
    assert!(
        [new, lab.uplink_source(3)].contains(&unbound),
        "the gateway's own unbound traffic left as {unbound}, with isp1 still black-holed"
    );
    // The proxy follows too: it reaches out from the new address, never the old one.
    let proxied = proxied_sources(&lab, 6);
    assert!(
        proxied.contains_key(&new.to_string()) && !proxied.contains_key(&source.to_string()),
        "proxied after the redial: {proxied:?}"
    );
    ip(&lab, &lab.isp(1), &["rule del prio 50".into()]);
    assert!(nat_addresses(&lab).contains(&new), "new flows in the maps");
    assert_gone(&lab, source);

    // Renumbered in place, as a modem that keeps wwan0 across a reconnect: the connections on
    // the old address are reset as soon as the new one appears, new flows take the new one.
    let newer = Ipv4Addr::new(198, 18, 2, 8);
    let (renumbered, took, ended) = downloads_through(&mut lab, |lab| {
        lab.set_isp_customer(2, newer).unwrap();
        ip(
            lab,
            &lab.isp(2),
            &[format!("addr replace {peer} peer {newer} dev down0")],
        );
        ip(
            lab,
            &lab.gw(),
            &[
                format!("addr del {new} peer {peer} dev wan2"),
                format!("addr add {newer} peer {peer} dev wan2"),
            ],
        );
        let renumbered = Instant::now();
        (
            renumbered,
            wait_for_new_flows_from(lab, newer, Duration::from_secs(2)),
        )
    });
    eprintln!("renumbered in place to {newer}: new flows {took:?} after");
    assert_reset_only_on(&ended, new, renumbered, RESET_AT_ONCE, &daemon.log());
    assert_eq!(lte(&lab)["source"], newer.to_string());
    assert_own_traffic_from(&lab, newer);
    let proxied = proxied_sources(&lab, 9);
    assert!(
        proxied.contains_key(&newer.to_string()) && !proxied.contains_key(&new.to_string()),
        "proxied after the renumbering: {proxied:?}"
    );
    assert_gone(&lab, new);
    daemon.terminate(Duration::from_secs(5)).unwrap();
    let down = balancer(&lab, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}

/// wan1 Ethernet with an explicit gateway; wan2 addressed by DHCP and configured by name only:
/// address and gateway come from the lease. The ISP renumbers it mid-transfer.
#[test]
fn a_dhcp_uplink_named_by_interface_follows_a_renumbering_mid_transfer() {
    let mut spec = LabSpec::new(&prefix("fd"), 2);
    spec.rates_mbit.clear();
    spec.dhcp = vec![2];
    let mut lab = Lab::up(spec).unwrap();
    let old = lab.uplink_source(2);
    let text = format!(
        "{LAN}\n[[uplink]]\nname = \"isp1\"\nid = 1\ninterface = \"wan1\"\ngateway = \"{}\"\n{TRACK}\n[[uplink]]\nname = \"cable\"\nid = 2\ninterface = \"wan2\"\n{TRACK}\n[proxy]\nlisten = \"{PROXY}\"\n",
        lab.uplink_gateway(1)
    );
    let config = write_config(&lab, "balancer.toml", &text);
    let mut daemon = start_daemon(&lab, &config);
    wait_for_dataplane(&lab);
    let row = status(&lab)["uplinks"][1].clone();
    assert_eq!(row["source"], old.to_string(), "{row:#}");
    assert_eq!(
        row["gateway"],
        lab.uplink_gateway(2).to_string(),
        "the lease's router: {row:#}"
    );
    let took = wait_for_new_flows_from(&lab, old, Duration::from_secs(2));
    eprintln!("the DHCP uplink carried new flows after {took:?}");

    let new = Ipv4Addr::new(198, 18, 2, 9);
    // The ISP stops forwarding the old address first, then leases the new one: the downloads
    // on the old address hear nothing from then on, and must be reset, not left hanging.
    let (began, (lease_after, took), ended) = downloads_through(&mut lab, |lab| {
        let began = Instant::now();
        // Returns once the gateway holds the new lease (polled every 50 ms).
        lab.renumber_dhcp(2, new).unwrap();
        let lease_after = began.elapsed();
        let took = wait_for_new_flows_from(lab, new, Duration::from_secs(2));
        (began, (lease_after, took))
    });
    eprintln!(
        "renumbered to {new}: the lease came {lease_after:?} after the renumbering began, new flows {took:?} after it"
    );
    assert_reset_only_on(&ended, old, began, RESET_AFTER_SILENCE, &daemon.log());
    let row = status(&lab)["uplinks"][1].clone();
    assert_eq!(row["source"], new.to_string(), "{row:#}");
    assert_own_traffic_from(&lab, new);
    let many = lab
        .tcp_many(&lab.client(1), 20, None, Duration::from_secs(1))
        .unwrap();
    assert_eq!(many.failed, 0, "{many:?}\n{}", daemon.log());
    assert!(many.sources.contains_key(&new), "{many:?}");
    let proxied = proxied_sources(&lab, 6);
    assert!(
        proxied.contains_key(&new.to_string()) && !proxied.contains_key(&old.to_string()),
        "proxied after the renumbering: {proxied:?}"
    );
    assert!(nat_addresses(&lab).contains(&new), "new flows in the maps");
    assert_gone(&lab, old);
    daemon.terminate(Duration::from_secs(5)).unwrap();
    let down = balancer(&lab, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}

/// A raw-IP session that drops and redials at once with the same address (a new device, a new
/// ifindex) keeps its connections: they stall for the moment the link is away, and are not
/// reset.
#[test]
fn a_raw_ip_uplink_redialled_with_the_same_address_keeps_its_connections() {
    let mut spec = LabSpec::new(&prefix("fk"), 2);
    spec.rates_mbit.clear();
    spec.raw_ip = vec![2];
    let mut lab = Lab::up(spec).unwrap();
    let (source, peer) = (lab.uplink_source(2), lab.uplink_gateway(2));
    let text = format!(
        "{LAN}\n[[uplink]]\nname = \"isp1\"\nid = 1\ninterface = \"wan1\"\ngateway = \"{}\"\n{TRACK}\n[[uplink]]\nname = \"lte\"\nid = 2\ninterface = \"wan2\"\nhotplug = true\n{TRACK}",
        lab.uplink_gateway(1)
    );
    let config = write_config(&lab, "balancer.toml", &text);
    let mut daemon = start_daemon(&lab, &config);
    wait_for_dataplane(&lab);
    join_without_loss(&lab, source, Duration::from_secs(2));
    let (redialled, away, ended) = downloads_through(&mut lab, |lab| {
        let dropped = Instant::now();
        lab.disconnect_raw_ip(2).unwrap();
        lab.connect_raw_ip(2, source, peer).unwrap();
        (Instant::now(), dropped.elapsed())
    });
    eprintln!("the link was away for {away:?}");
    let mut on_redialled = 0;
    for (n, download) in ended.iter().enumerate() {
        let transfer = download.result.as_ref().unwrap_or_else(|e| {
            panic!(
                "download {n} ended {:?} after the redial: {e:#}\n{}",
                download.at.saturating_duration_since(redialled),
                daemon.log()
            )
        });
        if transfer.peer.is_some_and(|peer| *peer.ip() == source) {
            on_redialled += 1;
        }
    }
    assert!(on_redialled > 0, "no download ran on the redialled link");
    let many = lab
        .tcp_many(&lab.client(1), 10, None, Duration::from_secs(1))
        .unwrap();
    assert_eq!(many.failed, 0, "{many:?}");
    assert!(many.sources.contains_key(&source), "{many:?}");
    daemon.terminate(Duration::from_secs(5)).unwrap();
    let down = balancer(&lab, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}
