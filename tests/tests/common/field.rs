//! Helpers of the field-uplink and reload tests: `ip` in a lab namespace, the daemon's status,
//! waiting for new flows from an address, what the NAT maps hold, and SIGHUP reloads.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use balancer_tests::{
    lab::Lab,
    process::{ChildGuard, signal},
};

use super::*;

pub const LAN: &str = "[lan]\ninterfaces = [\"lan0\"]\nnetworks = [\"198.18.0.0/24\"]\n";

/// Where the field tests' configs put the forward proxy.
pub const PROXY: &str = "198.18.0.1:3128";

pub fn status(lab: &Lab) -> serde_json::Value {
    let output = balancer(lab, &["status", "--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Runs each `ip` command line in namespace `ns`.
pub fn ip(lab: &Lab, ns: &str, commands: &[String]) {
    for command in commands {
        let argv: Vec<&str> = std::iter::once("ip")
            .chain(command.split_whitespace())
            .collect();
        lab.exec_ok(ns, &argv)
            .unwrap_or_else(|e| panic!("in {ns}: ip {command}: {e:#}"));
    }
}

/// Creates uplink `i`'s interface again (a veth to its ISP), with the gateway's address
/// `source`, as a modem's session coming up does: the ISP's end is ready before the gateway's
/// end gets its address.
pub fn create_wan(lab: &Lab, i: usize, source: Ipv4Addr) {
    ip(
        lab,
        &lab.gw(),
        &[format!(
            "link add wan{i} type veth peer name down0 netns {}",
            lab.isp(i)
        )],
    );
    ip(
        lab,
        &lab.isp(i),
        &[
            format!("addr add {}/24 dev down0", lab.uplink_gateway(i)),
            "link set down0 up".into(),
        ],
    );
    ip(
        lab,
        &lab.gw(),
        &[
            format!("addr add {source}/24 dev wan{i}"),
            format!("link set wan{i} up"),
        ],
    );
}

/// Repeats short batches of new connections from client 1 until one comes from `source`;
/// returns how long that took (panics after `within`).
pub fn wait_for_new_flows_from(lab: &Lab, source: Ipv4Addr, within: Duration) -> Duration {
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

/// Like [`wait_for_new_flows_from`], and no connection may fail meanwhile: an uplink that joins
/// takes new flows only once it can carry them (its programs attached, its routes in place).
pub fn join_without_loss(lab: &Lab, source: Ipv4Addr, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let many = lab
            .tcp_many(&lab.client(1), 6, None, Duration::from_millis(500))
            .unwrap();
        assert_eq!(
            many.failed,
            0,
            "{:?} into the join of {source}: {many:?}",
            started.elapsed()
        );
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
pub fn nat_addresses(lab: &Lab) -> std::collections::BTreeSet<Ipv4Addr> {
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
pub fn assert_gone(lab: &Lab, old: Ipv4Addr) {
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
pub fn routing_text(lab: &Lab) -> String {
    let rules = lab.exec_ok(&lab.gw(), &["ip", "rule", "show"]).unwrap();
    let routes = lab
        .exec_ok(&lab.gw(), &["ip", "route", "show", "table", "all"])
        .unwrap();
    format!("{rules}{routes}")
}

pub fn weighted_config(lab: &Lab, weights: &[(usize, u32)]) -> String {
    let mut text = LAN.to_string();
    for (i, weight) in weights {
        text.push_str(&format!(
            "\n[[uplink]]\nname = \"isp{i}\"\nid = {i}\ninterface = \"wan{i}\"\ngateway = \"{}\"\nweight = {weight}\n",
            lab.uplink_gateway(*i)
        ));
    }
    text
}

pub fn reload(lab: &Lab, daemon: &ChildGuard, config_path: &str, text: &str) -> serde_json::Value {
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

/// `count` requests through the proxy from client 1: the addresses the internet host saw,
/// counted. The proxy serves once the first apply is done; early refusals are retried.
pub fn proxied_sources(lab: &Lab, count: u32) -> BTreeMap<String, u32> {
    let mut seen = BTreeMap::<String, u32>::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    for _ in 0..count {
        let body = loop {
            let out = lab
                .exec(
                    &lab.client(1),
                    &[
                        "curl",
                        "-sS",
                        "--max-time",
                        "5",
                        "--proxy",
                        &format!("http://{PROXY}"),
                        "http://198.18.9.1:8080/",
                    ],
                )
                .unwrap();
            if out.status.success() || Instant::now() > deadline {
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                break String::from_utf8_lossy(&out.stdout).into_owned();
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let address = body.trim().split(':').next().unwrap_or_default().to_owned();
        *seen.entry(address).or_default() += 1;
    }
    seen
}
