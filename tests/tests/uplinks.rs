//! Uplinks as they are in the field, in the lab: an uplink configured by interface name only
//! (address and default route learned, then renumbered), a point-to-point uplink, an interface
//! absent at start that joins, one deleted mid-transfer and back with another address. Real
//! daemons, real connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use balancer_tests::{
    lab::{Lab, LabSpec},
    process::ChildGuard,
};
use common::{field::*, *};

/// A DHCP-like uplink: configured by interface name only, its address and default route put
/// there by "a DHCP client" (here: `ip`), then renumbered while a transfer runs.
#[test]
fn an_uplink_named_by_interface_only_learns_its_address_and_follows_a_renumbering() {
    let mut spec = LabSpec::new(&prefix("upa"), 1);
    spec.rates_mbit = Vec::new();
    let lab = Lab::up(spec).unwrap();
    let (old, new) = (lab.uplink_source(1), Ipv4Addr::new(198, 18, 1, 5));
    // What a DHCP client installs: the lease's address (already there) and a default route.
    ip(
        &lab,
        &lab.gw(),
        &["route add default via 198.18.1.1 dev wan1 metric 1024".into()],
    );
    // The ISP will hand out `new` next: it accepts it and the internet routes it back.
    ip(
        &lab,
        &lab.isp(1),
        &[format!(
            "rule add iif down0 from {new}/32 lookup main prio 99"
        )],
    );
    ip(
        &lab,
        &lab.inet(),
        &[format!("route add {new}/32 via 198.19.1.2 dev isp1")],
    );
    let config = write_config(
        &lab,
        "balancer.toml",
        &format!("{LAN}\n[[uplink]]\nname = \"cable\"\ninterface = \"wan1\"\n"),
    );
    let check = balancer(&lab, &["check", "-c", &config]);
    let shown = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        shown.contains(&format!("src {old} via 198.18.1.1")),
        "check shows the learned values: {shown}"
    );
    let mut daemon = start_daemon(&lab, &config);
    wait_for_dataplane(&lab);
    let row = status(&lab)["uplinks"][0].clone();
    assert_eq!(row["source"], old.to_string(), "{row:#}");
    assert_eq!(row["gateway"], "198.18.1.1", "{row:#}");
    assert_eq!(row["stages"]["usable"]["ok"], true, "{row:#}");
    // Transparent and the gateway's own traffic leave with the learned address.
    let many = lab
        .tcp_many(&lab.client(1), 10, None, Duration::from_secs(1))
        .unwrap();
    assert_eq!(
        many.sources.keys().copied().collect::<Vec<_>>(),
        [old],
        "{many:?}"
    );
    assert_leaves_by(&lab, None, 1, old);

    // A transfer on the old address, then the renumbering, as a new lease does it.
    let transfer = thread::scope(|s| {
        let download = s.spawn(|| {
            (
                lab.http_download(&lab.client(2), 1 << 30, Duration::from_secs(20)),
                Instant::now(),
            )
        });
        thread::sleep(Duration::from_millis(700));
        let renumbered = Instant::now();
        ip(
            &lab,
            &lab.gw(),
            &[
                "addr flush dev wan1".into(),
                format!("addr add {new}/24 dev wan1"),
                "route replace default via 198.18.1.1 dev wan1 metric 1024".into(),
            ],
        );
        let took = wait_for_new_flows_from(&lab, new, Duration::from_secs(2));
        eprintln!("new flows from {new} {took:?} after the renumbering");
        let (result, ended) = download.join().unwrap();
        (result, ended.saturating_duration_since(renumbered))
    });
    let (result, ended_after) = transfer;
    assert!(
        result.is_err(),
        "the transfer on the old address cannot go on: {result:?}"
    );
    assert!(
        ended_after < Duration::from_secs(2),
        "the client must be reset at once, not time out: it ended {ended_after:?} after the renumbering"
    );
    let many = lab
        .tcp_many(&lab.client(1), 10, None, Duration::from_secs(1))
        .unwrap();
    assert_eq!(
        many.sources.keys().copied().collect::<Vec<_>>(),
        [new],
        "{many:?}"
    );
    assert_leaves_by(&lab, None, 1, new);
    assert_gone(&lab, old);
    let row = status(&lab)["uplinks"][0].clone();
    assert_eq!(row["source"], new.to_string(), "{row:#}");
    assert!(
        nat_addresses(&lab).contains(&new),
        "the new flows are in the maps"
    );

    // The gateway is followed too: the DHCP client's default route moves to another router.
    ip(
        &lab,
        &lab.isp(1),
        &["addr add 198.18.1.254/24 dev down0".into()],
    );
    ip(
        &lab,
        &lab.gw(),
        &["route replace default via 198.18.1.254 dev wan1 metric 1024".into()],
    );
    let moved = Instant::now();
    loop {
        let table = lab
            .exec_ok(&lab.gw(), &["ip", "route", "show", "table", "2001"])
            .unwrap();
        if table.contains("default via 198.18.1.254 dev wan1") {
            break;
        }
        assert!(
            moved.elapsed() < Duration::from_secs(2),
            "the uplink's table must follow the new gateway:\n{table}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status(&lab)["uplinks"][0]["gateway"], "198.18.1.254");
    let many = lab
        .tcp_many(&lab.client(1), 10, None, Duration::from_secs(1))
        .unwrap();
    assert_eq!(
        many.sources.keys().copied().collect::<Vec<_>>(),
        [new],
        "{many:?}"
    );
    daemon.terminate(Duration::from_secs(5)).unwrap();
    let down = balancer(&lab, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}

fn hotplug_config(lab: &Lab) -> String {
    let mut text = LAN.to_string();
    for i in 1..=2 {
        text.push_str(&format!(
            "\n[[uplink]]\nname = \"isp{i}\"\ninterface = \"wan{i}\"\ngateway = \"198.18.{i}.1\"\ntrack = [\"198.18.9.1\"]\n"
        ));
    }
    // Like an LTE stick: absent at start, its address learned when it comes.
    text.push_str(
        "\n[[uplink]]\nname = \"lte\"\ninterface = \"wan3\"\ngateway = \"198.18.3.1\"\nhotplug = true\ntrack = [\"198.18.9.1\"]\n",
    );
    write_config(lab, "balancer.toml", &text)
}

/// An uplink absent at start joins when its interface appears; deleted mid-transfer, it is out
/// of the rotation within 200 ms, and a black hole on another uplink afterwards is still routed
/// around within a second.
#[test]
fn an_absent_uplink_joins_and_a_deleted_one_leaves_the_rotation_at_once() {
    let mut spec = LabSpec::new(&prefix("upb"), 3);
    spec.rates_mbit = Vec::new();
    let lab = Lab::up(spec).unwrap();
    ip(&lab, &lab.gw(), &["link del wan3".into()]);
    let config = hotplug_config(&lab);
    let check = balancer(&lab, &["check", "-c", &config]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("there is no interface wan3"),
        "check says the uplink waits: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let mut daemon: ChildGuard = start_daemon(&lab, &config);
    let row = status(&lab)["uplinks"][2].clone();
    assert_eq!(row["stages"]["present"]["ok"], false, "{row:#}");
    let text = balancer(&lab, &["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("present: there is no interface wan3 (hotplug: it joins when it appears)"),
        "`status` shows the stage the uplink waits at:\n{text}"
    );

    let appeared = Instant::now();
    create_wan(&lab, 3, lab.uplink_source(3));
    let took = join_without_loss(&lab, lab.uplink_source(3), Duration::from_secs(2));
    eprintln!(
        "the new uplink carried new flows {took:?} after it appeared ({:?})",
        appeared.elapsed()
    );

    // Deleted mid-transfer: new connections must not notice it from 200 ms on, and the
    // transfers it carried are reset at their clients (none hangs until its own timeout).
    let (transfers, deleted_at, many) = thread::scope(|s| {
        let transfers: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(|| {
                    let result = lab.download(&lab.client(2), None, 8.0);
                    (result.is_ok(), Instant::now())
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(800));
        ip(&lab, &lab.gw(), &["link del wan3".into()]);
        let deleted_at = Instant::now();
        thread::sleep(Duration::from_millis(200));
        let many = lab
            .tcp_many(&lab.client(1), 30, None, Duration::from_secs(1))
            .unwrap();
        let transfers: Vec<(bool, Instant)> =
            transfers.into_iter().map(|t| t.join().unwrap()).collect();
        (transfers, deleted_at, many)
    });
    assert_eq!(
        (many.succeeded, many.failed),
        (30, 0),
        "after the deletion: {many:?}\n{}",
        daemon.log()
    );
    assert!(
        !many.sources.contains_key(&lab.uplink_source(3)),
        "{many:?}"
    );
    let reset: Vec<Duration> = transfers
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, ended)| ended.saturating_duration_since(deleted_at))
        .collect();
    eprintln!("transfers ended by the deletion, after: {reset:?}");
    assert!(
        !reset.is_empty(),
        "some of 6 transfers ran on the deleted uplink"
    );
    assert!(
        reset.iter().all(|after| *after < Duration::from_secs(3)),
        "a transfer on the deleted uplink must be reset, not hang: {reset:?}"
    );

    // A black hole on isp2 afterwards: the probes still take it out within a second.
    ip(
        &lab,
        &lab.isp(2),
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
        "{:?} after the black hole: {many:?}\n{}",
        holed.elapsed(),
        daemon.log()
    );
    // Back with another address (a new session): new flows use it within 2 s, and nothing of
    // the old address is left in rules, routes or the NAT maps.
    let (old, new) = (lab.uplink_source(3), Ipv4Addr::new(198, 18, 3, 7));
    ip(
        &lab,
        &lab.isp(3),
        &[format!(
            "rule add iif down0 from {new}/32 lookup main prio 99"
        )],
    );
    ip(
        &lab,
        &lab.inet(),
        &[format!("route add {new}/32 via 198.19.3.2 dev isp3")],
    );
    create_wan(&lab, 3, new);
    let took = wait_for_new_flows_from(&lab, new, Duration::from_secs(2));
    eprintln!("back with {new}: new flows {took:?} after it appeared");
    assert_gone(&lab, old);
    daemon.terminate(Duration::from_secs(5)).unwrap();
    let down = balancer(&lab, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}

/// A point-to-point address (`ip addr add A/32 peer B`, what pppd sets), configured by
/// interface name only: the peer is the gateway, the peer's /32 the connected route, and
/// transparent and the gateway's own traffic leave with the right source.
#[test]
fn a_point_to_point_uplink_named_by_interface_only_uses_its_peer() {
    let mut spec = LabSpec::new(&prefix("upe"), 2);
    spec.rates_mbit = Vec::new();
    let lab = Lab::up(spec).unwrap();
    let (source, peer) = (lab.uplink_source(2), lab.uplink_gateway(2));
    ip(
        &lab,
        &lab.gw(),
        &[
            "addr flush dev wan2".into(),
            format!("addr add {source}/32 peer {peer}/32 dev wan2"),
        ],
    );
    ip(
        &lab,
        &lab.isp(2),
        &[
            "addr flush dev down0".into(),
            format!("addr add {peer}/32 peer {source}/32 dev down0"),
        ],
    );
    let config = write_config(
        &lab,
        "balancer.toml",
        &format!(
            "{LAN}\n[[uplink]]\nname = \"isp1\"\ninterface = \"wan1\"\ngateway = \"{}\"\n\n[[uplink]]\nname = \"dsl\"\ninterface = \"wan2\"\n",
            lab.uplink_gateway(1)
        ),
    );
    let check = balancer(&lab, &["check", "-c", &config]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let mut daemon = start_daemon(&lab, &config);
    wait_for_dataplane(&lab);
    let row = status(&lab)["uplinks"][1].clone();
    assert_eq!(row["source"], source.to_string(), "{row:#}");
    assert_eq!(row["gateway"], peer.to_string(), "{row:#}");
    let table = lab
        .exec_ok(&lab.gw(), &["ip", "route", "show", "table", "2002"])
        .unwrap();
    for expected in [
        format!("default via {peer} dev wan2 proto 77 src {source}"),
        format!("{peer} dev wan2 proto 77 scope link src {source}"),
    ] {
        assert!(table.contains(&expected), "{expected}:\n{table}");
    }
    assert_leaves_by(&lab, Some(source), 2, source);
    let many = lab
        .tcp_many(&lab.client(1), 20, None, Duration::from_secs(1))
        .unwrap();
    assert_eq!(many.failed, 0, "{many:?}\n{}", daemon.log());
    assert!(many.sources.contains_key(&source), "{many:?}");
    daemon.terminate(Duration::from_secs(5)).unwrap();
    let down = balancer(&lab, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}

/// `run` starts with none of its uplinks present (a gateway that boots before its modems), and
/// the uplink joins when its interface comes.
#[test]
fn run_starts_with_no_uplink_present_and_the_uplink_joins_when_it_comes() {
    let mut spec = LabSpec::new(&prefix("upf"), 1);
    spec.rates_mbit = Vec::new();
    let lab = Lab::up(spec).unwrap();
    ip(&lab, &lab.gw(), &["link del wan1".into()]);
    let config = write_config(
        &lab,
        "balancer.toml",
        &format!(
            "{LAN}\n[[uplink]]\nname = \"modem\"\ninterface = \"wan1\"\ngateway = \"{}\"\nhotplug = true\n",
            lab.uplink_gateway(1)
        ),
    );
    let mut daemon = start_daemon(&lab, &config);
    assert!(
        lab.tcp_whoami(&lab.client(1), None, Duration::from_millis(500))
            .is_err(),
        "nothing to carry the traffic yet"
    );
    create_wan(&lab, 1, lab.uplink_source(1));
    let took = wait_for_new_flows_from(&lab, lab.uplink_source(1), Duration::from_secs(2));
    eprintln!("the only uplink carried new flows {took:?} after it appeared");
    assert_leaves_by(&lab, None, 1, lab.uplink_source(1));
    daemon.terminate(Duration::from_secs(5)).unwrap();
    let down = balancer(&lab, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}
