//! Pins that survive real life, in the lab: a stopped daemon's pinned links can be severed (an
//! interface re-created) and its pin directory can be of an older layout version (an upgrade).
//! `run` replaces what no longer fits (a severed link, a map pin of another shape) and forwards;
//! `run` and `down` remove older versions and so detach their programs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{fs, os::unix::fs::MetadataExt, path::PathBuf, thread, time::Duration};

use aya::programs::{SchedClassifier, TcAttachType};
use balancer_common::maps::ABI_VERSION;
use balancer_tests::lab::{LAN_GATEWAY, LAN_INTERFACE, Lab, LabSpec};
use common::*;
use nix::sched::{CloneFlags, setns};

fn lab(tag: &str) -> (Lab, String) {
    let mut spec = LabSpec::new(&prefix(tag), 2);
    spec.rates_mbit = Vec::new();
    let lab = Lab::up(spec).unwrap();
    let config = write_config(&lab, "balancer.toml", &lab.balancer_config_toml());
    (lab, config)
}

/// A LAN client's new connection leaves translated to an uplink's address (the ISPs drop any
/// other source), so the data plane is attached and working.
fn assert_forwards(lab: &Lab, log: &str) {
    let seen = lab
        .udp_whoami(&lab.client(1), None, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("no translated answer: {e:#}\n{log}"));
    assert!(
        [lab.uplink_source(1), lab.uplink_source(2)].contains(seen.ip()),
        "translated: {seen}"
    );
}

/// `/run/balancer/bpffs/net-<gateway namespace inode>`.
fn namespace_pins(lab: &Lab) -> PathBuf {
    let inode = fs::metadata(format!("/run/netns/{}", lab.gw()))
        .unwrap()
        .ino();
    PathBuf::from(format!("/run/balancer/bpffs/net-{inode}"))
}

/// How many TCX programs run on the gateway's LAN ingress hook.
fn lan_ingress_programs(lab: &Lab) -> usize {
    let path = format!("/run/netns/{}", lab.gw());
    thread::spawn(move || {
        let file = fs::File::open(&path).unwrap();
        setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
        SchedClassifier::query_tcx(LAN_INTERFACE, TcAttachType::Ingress)
            .unwrap()
            .1
            .len()
    })
    .join()
    .unwrap()
}

#[test]
fn run_after_the_lan_interface_was_recreated_starts_and_forwards() {
    let (lab, config) = lab("pr");
    let mut daemon = start_daemon(&lab, &config);
    assert_forwards(&lab, &daemon.log());
    assert!(daemon.terminate(Duration::from_secs(5)).unwrap().success());

    // The LAN bridge deleted and made again with the same ifindex while no daemon runs: the
    // pinned ingress link (named by that ifindex) is now severed.
    let gw = lab.gw();
    let index = lab
        .exec_ok(
            &gw,
            &["cat", &format!("/sys/class/net/{LAN_INTERFACE}/ifindex")],
        )
        .unwrap();
    let index = index.trim();
    lab.exec_ok(&gw, &["ip", "link", "del", LAN_INTERFACE])
        .unwrap();
    lab.exec_ok(
        &gw,
        &[
            "ip",
            "link",
            "add",
            LAN_INTERFACE,
            "index",
            index,
            "type",
            "bridge",
        ],
    )
    .unwrap();
    let address = format!("{LAN_GATEWAY}/24");
    lab.exec_ok(&gw, &["ip", "addr", "add", &address, "dev", LAN_INTERFACE])
        .unwrap();
    for port in ["lanc1", "lanc2"] {
        lab.exec_ok(&gw, &["ip", "link", "set", port, "master", LAN_INTERFACE])
            .unwrap();
    }
    lab.exec_ok(&gw, &["ip", "link", "set", LAN_INTERFACE, "up"])
        .unwrap();
    let pinned = namespace_pins(&lab).join(format!("v{ABI_VERSION}/links/{index}-ingress"));
    assert!(pinned.exists(), "the severed link is still pinned");
    assert_eq!(
        lan_ingress_programs(&lab),
        0,
        "a new bridge has no programs"
    );

    let daemon = start_daemon(&lab, &config);
    // The bridge learns its ports' addresses again; give it a moment.
    thread::sleep(Duration::from_millis(500));
    assert_forwards(&lab, &daemon.log());
    assert_eq!(lan_ingress_programs(&lab), 1);
    assert!(
        daemon.log().contains("replacing a stale pinned link"),
        "{}",
        daemon.log()
    );
}

#[test]
fn pins_of_an_older_layout_are_removed_by_run_and_by_down() {
    let (lab, config) = lab("po");
    let pins = namespace_pins(&lab);
    let current = pins.join(format!("v{ABI_VERSION}"));
    let older = pins.join(format!("v{}", ABI_VERSION - 1));

    for (round, remover) in ["run", "down"].into_iter().enumerate() {
        let mut daemon = start_daemon(&lab, &config);
        assert_forwards(&lab, &daemon.log());
        assert!(daemon.terminate(Duration::from_secs(5)).unwrap().success());
        // As if the running build had an older layout version: its pins and attached
        // programs are under another directory (bpffs renames directories).
        fs::rename(&current, &older).unwrap();
        assert_eq!(
            lan_ingress_programs(&lab),
            1,
            "round {round}: still attached"
        );

        if remover == "run" {
            let daemon = start_daemon(&lab, &config);
            assert_forwards(&lab, &daemon.log());
            assert!(!older.exists(), "run removed the older pins");
            assert!(current.exists());
            assert_eq!(
                lan_ingress_programs(&lab),
                1,
                "the older program is detached, the new one attached"
            );
            drop(daemon);
        } else {
            let down = balancer(&lab, &["down"]);
            assert!(
                down.status.success(),
                "{}",
                String::from_utf8_lossy(&down.stderr)
            );
            assert!(!older.exists(), "down removed the older pins");
            assert_eq!(
                lan_ingress_programs(&lab),
                0,
                "down detached the older program"
            );
            assert!(!pins.exists(), "nothing of this namespace is left");
        }
    }
}

#[test]
fn a_pinned_map_of_another_shape_is_replaced() {
    let (lab, config) = lab("pm");
    let mut daemon = start_daemon(&lab, &config);
    assert_forwards(&lab, &daemon.log());
    assert!(daemon.terminate(Duration::from_secs(5)).unwrap().success());
    // As if a build changed a map's layout without a new version: the pin named SCHEDULE is
    // now a map of another type, key and value (the settings array).
    let maps = namespace_pins(&lab).join(format!("v{ABI_VERSION}/maps"));
    fs::remove_file(maps.join("SCHEDULE")).unwrap();
    fs::rename(maps.join("SETTINGS"), maps.join("SCHEDULE")).unwrap();

    let daemon = start_daemon(&lab, &config);
    assert_forwards(&lab, &daemon.log());
    assert!(
        daemon.log().contains("pinned maps do not match"),
        "{}",
        daemon.log()
    );
    assert!(
        maps.join("SETTINGS").exists(),
        "the maps were pinned afresh"
    );
}
