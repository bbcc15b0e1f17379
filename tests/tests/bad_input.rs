//! Bad configs are refused with the key and line named and the kernel left exactly as it was;
//! an apply that fails half way rolls back what it had done.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::AsFd;

use balancer::{
    config::Config,
    netlink::Netlink,
    plan::{self, Operation},
    reconcile::{self, ApplyError},
    routing::{Interface, Route, RouteKind, RouteScope},
    sysctl::SysctlBackup,
};
use balancer_tests::lab::{Lab, LabSpec};
use common::*;

/// The lab's config with `from` replaced by `to` in the second `[[uplink]]` only.
fn in_second_uplink(text: &str, from: &str, to: &str) -> String {
    let mut blocks: Vec<String> = text.split("[[uplink]]").map(str::to_string).collect();
    assert!(blocks[2].contains(from), "{from} not in {}", blocks[2]);
    blocks[2] = blocks[2].replacen(from, to, 1);
    blocks.join("[[uplink]]")
}

#[test]
fn each_bad_config_is_refused_naming_the_key_and_nothing_changes() {
    let mut spec = LabSpec::new(&prefix("bad"), 2);
    spec.servers = false;
    let lab = Lab::up(spec).unwrap();
    let good = lab.balancer_config_toml();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown interface",
            in_second_uplink(&good, "\"wan2\"", "\"wan9\""),
            "uplink[1].interface (line",
        ),
        (
            "source not on its interface",
            in_second_uplink(&good, "source = \"198.18.2.2\"", "source = \"198.18.2.9\""),
            "uplink[1].source (line",
        ),
        (
            "gateway outside the subnet",
            in_second_uplink(
                &good,
                "gateway = \"198.18.2.1\"",
                "gateway = \"198.18.7.1\"",
            ),
            "uplink[1].gateway (line",
        ),
        (
            "duplicate name",
            in_second_uplink(&good, "name = \"isp2\"", "name = \"isp1\""),
            "uplink[1].name (line",
        ),
        (
            "duplicate id",
            in_second_uplink(&good, "weight", "id = 1\nweight"),
            "uplink[1].id (line",
        ),
        (
            "duplicate table",
            good.replacen("weight", "table = 2002\nweight", 1),
            "uplink[1].table (line",
        ),
        (
            "duplicate mark",
            in_second_uplink(&good, "weight", "mark = 0x01000000\nweight"),
            "uplink[1].mark (line",
        ),
        (
            "weight of zero",
            in_second_uplink(&good, "weight = 1", "weight = 0"),
            "uplink[1].weight (line",
        ),
        (
            "invalid network",
            good.replace("198.18.0.0/24", "198.18.0.0/33"),
            "lan.networks[0] (line 3)",
        ),
        ("bad TOML", good.replacen("[lan]", "[lan", 1), "line 1"),
    ];
    let pristine = snapshot(&lab);
    for (what, text, expected) in cases {
        let config = write_config(&lab, "bad.toml", &text);
        for command in ["check", "run"] {
            let output = balancer(&lab, &[command, "-c", &config]);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{what}: `{command}` must fail");
            assert!(
                stderr.contains(expected),
                "{what}: `{command}` should name {expected:?}, said:\n{stderr}"
            );
            assert_eq!(
                stderr.trim().lines().count(),
                1,
                "{what}: one clear line, got:\n{stderr}"
            );
        }
        assert_eq!(
            snapshot(&lab),
            pristine,
            "{what}: the kernel must be left exactly as it was"
        );
    }
}

#[test]
fn an_apply_that_fails_half_way_rolls_back_everything() {
    let mut spec = LabSpec::new(&prefix("rb"), 2);
    spec.servers = false;
    let lab = Lab::up(spec).unwrap();
    let text = lab.balancer_config_toml();
    let backup_path = lab.state_dir().join("rollback-sysctl.json");
    let pristine = snapshot(&lab);

    let gw_netns = format!("/run/netns/{}", lab.gw());
    let result = std::thread::spawn(move || {
        // setns changes only this thread's namespace; sockets and /proc/sys opened here are the gateway's.
        let namespace = std::fs::File::open(&gw_netns).unwrap();
        nix::sched::setns(namespace.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let config = Config::parse(&text).unwrap();
            let netlink = Netlink::connect().unwrap();
            let observed = reconcile::observe(&netlink, &config).await.unwrap();
            let mut operations = plan::plan(&config, &observed, plan::Strictness::Strict).unwrap();
            // A route through an interface that does not exist: the kernel refuses it (ENODEV).
            let impossible = Operation::AddRoute(Route {
                table: 2001,
                destination: "198.18.77.0/24".parse().unwrap(),
                metric: 0,
                kind: RouteKind::Unicast,
                gateway: None,
                interface: Some(Interface {
                    index: 999_999,
                    name: "ghost".into(),
                }),
                preferred_source: None,
                scope: RouteScope::Link,
                protocol: balancer::ownership::PROTOCOL,
            });
            let middle = operations.len() - 6;
            operations.insert(middle, impossible);
            let mut backup = SysctlBackup::open(backup_path).unwrap();
            (
                middle,
                reconcile::apply(&netlink, &mut backup, &operations).await,
            )
        })
    })
    .join()
    .unwrap();

    let (middle, outcome) = result;
    match outcome {
        Err(ApplyError::Failed {
            rolled_back,
            rollback_failures,
            operation,
            ..
        }) => {
            assert_eq!(
                rolled_back, middle,
                "every operation before the failure was undone"
            );
            assert!(rollback_failures.is_empty(), "{rollback_failures:?}");
            assert!(operation.contains("ghost"), "{operation}");
        }
        Ok(()) => panic!("the impossible route must fail"),
    }
    assert!(
        middle > 10,
        "the failure must come after settings, routes and rules were applied"
    );
    assert_eq!(
        snapshot(&lab),
        pristine,
        "a failed apply must leave the kernel as it was"
    );
}
