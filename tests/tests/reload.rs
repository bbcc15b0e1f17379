//! Reload on SIGHUP in the lab: new weights, uplinks added and removed, track targets and the
//! proxy section, in the same process with established connections going on; a bad config and
//! an id change refused while the running config stays.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use balancer_tests::lab::{Lab, LabSpec};
use common::{field::*, *};

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
    let threads = || proxy_threads(pid.as_u64().unwrap_or(0));
    let before = threads();
    assert!(before > 0, "no thread named proxy in the daemon");
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
    // The old proxy's runtime ended once its last connection had: its threads do not pile up
    // with every reload (tokio's blocking threads linger up to 10 s, hence the wait).
    let deadline = Instant::now() + Duration::from_secs(20);
    while threads() > before {
        assert!(
            Instant::now() < deadline,
            "{} proxy threads 20 s after a reload, {before} before",
            threads()
        );
        thread::sleep(Duration::from_millis(250));
    }
    daemon.terminate(Duration::from_secs(5)).unwrap();
    let down = balancer(&lab, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}

/// Threads of process `pid` named `proxy` (the proxy runtime's).
fn proxy_threads(pid: u64) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter(|task| {
                    std::fs::read_to_string(task.path().join("comm"))
                        .is_ok_and(|name| name.trim() == "proxy")
                })
                .count()
        })
        .unwrap_or(0)
}
