//! Uplinks as they are in the field, in the lab: an uplink configured by interface name only
//! (address and default route learned, then renumbered), an interface absent at start that
//! joins, one deleted mid-transfer, and reloads on SIGHUP. Real daemons, real connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use balancer_tests::{
    lab::{Lab, LabSpec},
    process::{ChildGuard, signal},
};
use common::*;

const LAN: &str = "[lan]\ninterfaces = [\"lan0\"]\nnetworks = [\"198.18.0.0/24\"]\n";

fn status(lab: &Lab) -> serde_json::Value {
    let output = balancer(lab, &["status", "--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Runs `ip -batch` lines in namespace `ns`.
fn ip(lab: &Lab, ns: &str, commands: &[String]) {
    for command in commands {
        let argv: Vec<&str> = std::iter::once("ip")
            .chain(command.split_whitespace())
            .collect();
        lab.exec_ok(ns, &argv)
            .unwrap_or_else(|e| panic!("in {ns}: ip {command}: {e:#}"));
    }
}

/// Repeats short batches of new connections from client 1 until one comes from `source`;
/// returns how long that took (panics after `within`).
fn wait_for_new_flows_from(lab: &Lab, source: Ipv4Addr, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let many = lab
            .tcp_many(&lab.client(1), 6, None, Duration::from_millis(500))
            .unwrap();
        if many.sources.contains_key(&source) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "no new flow from {source} within {within:?}: {many:?}"
        );
    }
}

/// The uplink addresses the gateway's NAT maps hold: every flow's translated address (`FLOWS`)
/// and every reverse entry's (`NAT_REVERSE`), read from the pins like `balancer stats` does.
fn nat_addresses(lab: &Lab) -> std::collections::BTreeSet<Ipv4Addr> {
    use std::os::unix::fs::MetadataExt;

    use aya::maps::HashMap;
    use balancer::dataplane::{address_of, bpffs::PinDir, open_pinned};
    use balancer_common::{
        flow::{FlowEntry, FlowKey, ReverseEntry, ReverseKey},
        maps::{ABI_VERSION, FLOWS, NAT_REVERSE},
    };

    let inode = std::fs::metadata(format!("/run/netns/{}", lab.gw()))
        .unwrap()
        .ino();
    let pins = PinDir {
        root: std::path::Path::new(balancer::dataplane::bpffs::BPFFS_ROOT)
            .join(format!("net-{inode}"))
            .join(format!("v{ABI_VERSION}")),
    };
    let flows: HashMap<_, FlowKey, FlowEntry> =
        HashMap::try_from(open_pinned(&pins, FLOWS).unwrap()).unwrap();
    let reverse: HashMap<_, ReverseKey, ReverseEntry> =
        HashMap::try_from(open_pinned(&pins, NAT_REVERSE).unwrap()).unwrap();
    flows
        .iter()
        .filter_map(Result::ok)
        .map(|(_, entry)| address_of(entry.uplink_addr))
        .chain(
            reverse
                .keys()
                .filter_map(Result::ok)
                .map(|key| address_of(key.uplink_addr)),
        )
        .collect()
}

/// Nothing of `old` may be left in the gateway's rules, routes or NAT maps.
fn assert_gone(lab: &Lab, old: Ipv4Addr) {
    let routing = routing_text(lab);
    let (exact, host) = (old.to_string(), format!("{old}/32"));
    assert!(
        !routing
            .split_whitespace()
            .any(|word| word == exact || word == host),
        "nothing of {old} may stay in rules or routes:\n{routing}"
    );
    let in_maps = nat_addresses(lab);
    assert!(
        !in_maps.contains(&old),
        "nothing of {old} may stay in the NAT maps: {in_maps:?}"
    );
}

/// The gateway's rules and routes, as `ip` prints them.
fn routing_text(lab: &Lab) -> String {
    let rules = lab.exec_ok(&lab.gw(), &["ip", "rule", "show"]).unwrap();
    let routes = lab
        .exec_ok(&lab.gw(), &["ip", "route", "show", "table", "all"])
        .unwrap();
    format!("{rules}{routes}")
}

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
    daemon.terminate(Duration::from_secs(5)).unwrap();
    let down = balancer(&lab, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}

fn create_wan3(lab: &Lab) {
    ip(
        lab,
        &lab.gw(),
        &[
            format!(
                "link add wan3 type veth peer name down0 netns {}",
                lab.isp(3)
            ),
            "addr add 198.18.3.2/24 dev wan3".into(),
            "link set wan3 up".into(),
        ],
    );
    ip(
        lab,
        &lab.isp(3),
        &[
            "addr add 198.18.3.1/24 dev down0".into(),
            "link set down0 up".into(),
        ],
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

    let appeared = Instant::now();
    create_wan3(&lab);
    let took = wait_for_new_flows_from(&lab, lab.uplink_source(3), Duration::from_secs(2));
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
    ip(
        &lab,
        &lab.gw(),
        &[
            format!(
                "link add wan3 type veth peer name down0 netns {}",
                lab.isp(3)
            ),
            format!("addr add {new}/24 dev wan3"),
            "link set wan3 up".into(),
        ],
    );
    ip(
        &lab,
        &lab.isp(3),
        &[
            "addr add 198.18.3.1/24 dev down0".into(),
            "link set down0 up".into(),
        ],
    );
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

fn weighted_config(lab: &Lab, weights: &[(usize, u32)]) -> String {
    let mut text = LAN.to_string();
    for (i, weight) in weights {
        text.push_str(&format!(
            "\n[[uplink]]\nname = \"isp{i}\"\nid = {i}\ninterface = \"wan{i}\"\ngateway = \"{}\"\nweight = {weight}\n",
            lab.uplink_gateway(*i)
        ));
    }
    text
}

fn reload(lab: &Lab, daemon: &ChildGuard, config_path: &str, text: &str) -> serde_json::Value {
    let before = status(lab)["last_reload"].clone();
    std::fs::write(config_path, text).unwrap();
    signal(daemon.pid(), nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reloaded = status(lab)["last_reload"].clone();
        if !reloaded.is_null() && reloaded != before {
            // Let the pass that applies it run.
            thread::sleep(Duration::from_millis(300));
            return reloaded;
        }
        assert!(
            Instant::now() < deadline,
            "no reload reported:\n{}",
            daemon.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn split(lab: &Lab) -> BTreeMap<Ipv4Addr, u32> {
    let (one, two) = thread::scope(|s| {
        let one = s.spawn(|| lab.tcp_many(&lab.client(1), 150, None, Duration::from_secs(1)));
        let two = s.spawn(|| lab.tcp_many(&lab.client(2), 150, None, Duration::from_secs(1)));
        (one.join().unwrap().unwrap(), two.join().unwrap().unwrap())
    });
    assert_eq!((one.failed, two.failed), (0, 0), "{one:?} {two:?}");
    let mut seen = one.sources.clone();
    for (address, n) in two.sources {
        *seen.entry(address).or_default() += n;
    }
    seen
}

/// SIGHUP: new weights hold within 10% over 300 new connections in the same process while an
/// established transfer goes on; an uplink added and one removed; a bad config and an id change
/// are refused and the running config stays.
#[test]
fn sighup_reloads_weights_and_uplinks_and_refuses_a_bad_config() {
    let mut spec = LabSpec::new(&prefix("upc"), 3);
    spec.rates_mbit = Vec::new();
    let lab = Lab::up(spec).unwrap();
    let path = write_config(
        &lab,
        "balancer.toml",
        &weighted_config(&lab, &[(1, 1), (2, 1)]),
    );
    let mut daemon = start_daemon(&lab, &path);
    wait_for_dataplane_rows(&lab, 2);
    let pid = status(&lab)["pid"].clone();

    let (transfer, seen) = thread::scope(|s| {
        let transfer = s.spawn(|| lab.download(&lab.client(2), None, 4.0));
        thread::sleep(Duration::from_millis(500));
        let reloaded = reload(
            &lab,
            &daemon,
            &path,
            &weighted_config(&lab, &[(1, 3), (2, 1), (3, 1)]),
        );
        assert_eq!(reloaded["ok"], true, "{reloaded:#}\n{}", daemon.log());
        let seen = split(&lab);
        (transfer.join().unwrap(), seen)
    });
    let transfer = transfer.unwrap_or_else(|e| panic!("the established transfer was lost: {e:#}"));
    eprintln!("transfer across the reload: {transfer:?}");
    eprintln!("300 connections after the reload: {seen:?}");
    for (i, share) in [(1, 0.6), (2, 0.2), (3, 0.2)] {
        let expected = 300.0 * share;
        let got = f64::from(seen.get(&lab.uplink_source(i)).copied().unwrap_or(0));
        assert!(
            (got - expected).abs() <= 0.1 * expected,
            "isp{i}: {got} of 300, expected {expected} (weights 3:1:1) within 10%: {seen:?}"
        );
    }
    assert_eq!(status(&lab)["pid"], pid, "the same process");

    // Removed by a reload: its rules and table go, and it takes no new flows.
    let reloaded = reload(
        &lab,
        &daemon,
        &path,
        &weighted_config(&lab, &[(1, 1), (3, 1)]),
    );
    assert_eq!(reloaded["ok"], true, "{reloaded:#}");
    let rules = owned_rules(&lab).join("\n");
    assert!(!rules.contains("lookup 2002"), "{rules}");
    let routes = owned_routes(&lab).join("\n");
    assert!(!routes.contains("table 2002"), "{routes}");
    let many = lab
        .tcp_many(&lab.client(1), 20, None, Duration::from_secs(1))
        .unwrap();
    assert_eq!(many.failed, 0, "{many:?}");
    assert!(
        !many.sources.contains_key(&lab.uplink_source(2)),
        "{many:?}"
    );

    // Track targets added by a reload: the uplink is probed from then on.
    let tracked = weighted_config(&lab, &[(1, 1), (3, 1)]).replace(
        "name = \"isp1\"\n",
        "name = \"isp1\"\ntrack = [\"198.18.9.1\"]\n",
    );
    let reloaded = reload(&lab, &daemon, &path, &tracked);
    assert_eq!(reloaded["ok"], true, "{reloaded:#}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let health = status(&lab)["uplinks"][0]["health"].clone();
        if health["tracked"] == true && health["state"] == "up" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "isp1 never probed up: {health:#}"
        );
        thread::sleep(Duration::from_millis(100));
    }

    // A bad config is refused with check's message; the running one stays.
    let bad = weighted_config(&lab, &[(1, 1), (3, 1)]).replace("weight = 1", "weight = 0");
    let refused = reload(&lab, &daemon, &path, &bad);
    assert_eq!(refused["ok"], false, "{refused:#}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("uplink[0].weight (line"),
        "{refused:#}"
    );
    // Changing a running uplink's id is refused, naming `id`.
    let moved = weighted_config(&lab, &[(1, 1), (3, 1)]).replace("id = 3", "id = 4");
    let refused = reload(&lab, &daemon, &path, &moved);
    assert_eq!(refused["ok"], false, "{refused:#}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("uplink[1].id"),
        "{refused:#}"
    );
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "the daemon must go on"
    );
    let names: Vec<String> = status(&lab)["uplinks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["isp1", "isp3"], "the running config stays");
    let many = lab
        .tcp_many(&lab.client(1), 10, None, Duration::from_secs(1))
        .unwrap();
    assert_eq!(many.failed, 0, "{many:?}");
    daemon.terminate(Duration::from_secs(5)).unwrap();
    let down = balancer(&lab, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}

/// Waits until `balancer stats --json` lists `rows` uplinks.
fn wait_for_dataplane_rows(lab: &Lab, rows: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = balancer(lab, &["stats", "--json"]);
        let count = serde_json::from_slice::<serde_json::Value>(&output.stdout)
            .ok()
            .and_then(|v| v["uplinks"].as_array().map(Vec::len));
        if count == Some(rows) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the data plane never showed {rows} uplinks"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// `curl` through the proxy at `proxy` from client 1: "<HTTP status> <bytes>".
fn curl_through(lab: &Lab, proxy: &str, path: &str, limit: Option<&str>) -> String {
    let url = format!("http://198.18.9.1:8080{path}");
    let mut argv = vec![
        "curl",
        "-sS",
        "--max-time",
        "8",
        "--proxy",
        proxy,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
    ];
    if let Some(rate) = limit {
        argv.extend(["--limit-rate", rate]);
    }
    argv.push(&url);
    let output = lab.exec(&lab.client(1), &argv).unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr).trim()
    )
}

/// SIGHUP with a changed `[proxy]` section binds the proxy anew (here: another port) in the
/// same process; a proxied download accepted before goes on to its end.
#[test]
fn sighup_applies_a_changed_proxy_section_and_keeps_accepted_connections() {
    let mut spec = LabSpec::new(&prefix("upd"), 2);
    spec.rates_mbit = Vec::new();
    let lab = Lab::up(spec).unwrap();
    let with_proxy = |port: u16| {
        format!(
            "{}\n[proxy]\nlisten = \"198.18.0.1:{port}\"\n",
            weighted_config(&lab, &[(1, 1), (2, 1)])
        )
    };
    let path = write_config(&lab, "balancer.toml", &with_proxy(3128));
    let mut daemon = start_daemon(&lab, &path);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !status(&lab)["proxy"].is_object() {
        assert!(Instant::now() < deadline, "the proxy never served");
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        curl_through(&lab, "http://198.18.0.1:3128", "/bytes/1000", None),
        "200 1000"
    );
    let pid = status(&lab)["pid"].clone();
    let (long, reloaded) = thread::scope(|s| {
        // About 2 s at 5 MB/s: accepted before the reload, it must end complete.
        let long = s.spawn(|| {
            curl_through(
                &lab,
                "http://198.18.0.1:3128",
                "/bytes/10000000",
                Some("5M"),
            )
        });
        thread::sleep(Duration::from_millis(500));
        let reloaded = reload(&lab, &daemon, &path, &with_proxy(3129));
        (long.join().unwrap(), reloaded)
    });
    assert_eq!(reloaded["ok"], true, "{reloaded:#}\n{}", daemon.log());
    assert_eq!(long, "200 10000000", "the accepted download goes on");
    assert_eq!(
        curl_through(&lab, "http://198.18.0.1:3129", "/bytes/1000", None),
        "200 1000",
        "{}",
        daemon.log()
    );
    assert!(
        !curl_through(&lab, "http://198.18.0.1:3128", "/bytes/1000", None).starts_with("200"),
        "the old listener is closed"
    );
    assert_eq!(status(&lab)["pid"], pid, "the same process");
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
