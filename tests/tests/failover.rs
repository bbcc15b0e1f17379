//! Failover that never hurts, in the lab with real connections: a saturated line with a 1 s
//! modem queue is never reported down while a black hole elsewhere is still found within 1 s;
//! a carrier blip or a black hole shorter than the reset delay costs no connection; a longer
//! outage still resets its connections and leaves the others alone; a passive verdict resets
//! the connections stuck on its line and clears with ICMP-only `track` whose probe host drops
//! TCP; a daemon restarted after a line died resets what is stuck on it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    io::{BufRead, BufReader, Read},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::AsFd,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use balancer_tests::lab::{Lab, LabSpec};
use common::*;

fn tracked_config(lab: &Lab, target: &str) -> String {
    lab.balancer_config_toml()
        .replace("weight =", &format!("track = [\"{target}\"]\nweight ="))
}

fn health_of(lab: &Lab, uplink: usize) -> serde_json::Value {
    let output = balancer(lab, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    status["uplinks"][uplink - 1]["health"].clone()
}

fn wait_until_up(lab: &Lab, uplink: usize, within: Duration) {
    let started = Instant::now();
    loop {
        let health = health_of(lab, uplink);
        if health["state"] == "up" && health["passive"].is_null() {
            return;
        }
        assert!(
            started.elapsed() < within,
            "uplink {uplink} not up: {health:#}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Drops everything ISP `isp` would forward, both ways (a silent black hole), or lifts it.
fn black_hole(lab: &Lab, isp: usize, on: bool) {
    for (priority, interface) in [("50", "down0"), ("51", "up0")] {
        let argv: Vec<&str> = if on {
            vec![
                "ip",
                "rule",
                "add",
                "priority",
                priority,
                "iif",
                interface,
                "blackhole",
            ]
        } else {
            vec!["ip", "rule", "del", "priority", priority]
        };
        lab.exec_ok(&lab.isp(isp), &argv).unwrap();
    }
}

/// Replaces uplink 1's shaping with 8 Mbit/s and a 1 s queue each way, as a DSL or LTE modem.
fn deep_queue_on_uplink_1(lab: &Lab) {
    let tbf = |dev: &str| {
        format!("qdisc replace dev {dev} root tbf rate 8mbit burst 16384 latency 1000ms")
    };
    let gw_tbf = tbf(&lab.uplink_interface(1));
    let isp_tbf = tbf("down0");
    lab.exec_ok(
        &lab.gw(),
        &["tc"]
            .into_iter()
            .chain(gw_tbf.split(' '))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    lab.exec_ok(
        &lab.isp(1),
        &["tc"]
            .into_iter()
            .chain(isp_tbf.split(' '))
            .collect::<Vec<_>>(),
    )
    .unwrap();
}

/// Bytes queued in the root qdisc of `device` in `ns` now.
fn backlog_bytes(lab: &Lab, ns: &str, device: &str) -> u64 {
    let text = lab
        .exec_ok(ns, &["tc", "-s", "qdisc", "show", "dev", device])
        .unwrap();
    text.split_whitespace()
        .skip_while(|word| *word != "backlog")
        .nth(1)
        .and_then(|bytes| bytes.strip_suffix('b'))
        .and_then(|bytes| bytes.parse().ok())
        .unwrap_or(0)
}

/// What a loaded phase saw: the worst RTT status showed for uplink 1, the deepest queue each
/// way on it (bytes), and how long the black hole on the other uplink took to be found.
struct Phase {
    worst_rtt_ms: f64,
    worst_loss_percent: f64,
    worst_queue: (u64, u64),
    detected: Duration,
}

/// Watches uplink 1 under load for `duration`, asserting it is never reported down; half-way,
/// black-holes uplink `victim` and measures how long until that one is reported down.
fn watch_loaded_line(lab: &Lab, victim: usize, duration: Duration) -> Phase {
    let started = Instant::now();
    let mut cut: Option<Instant> = None;
    let mut detected: Option<Duration> = None;
    let mut worst_rtt = 0.0f64;
    let mut worst_loss = 0.0f64;
    let mut worst_queue = (0u64, 0u64);
    let mut next_queue_sample = Duration::ZERO;
    while started.elapsed() < duration {
        let output = balancer(lab, &["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let loaded = &status["uplinks"][0]["health"];
        assert!(
            loaded["state"] != "down" && loaded["passive"].is_null(),
            "the saturated uplink was reported down after {:?}: {loaded:#}",
            started.elapsed()
        );
        worst_rtt = worst_rtt.max(loaded["rtt_ms"].as_f64().unwrap_or(0.0));
        worst_loss = worst_loss.max(loaded["loss_percent"].as_f64().unwrap_or(0.0));
        if started.elapsed() >= next_queue_sample {
            next_queue_sample += Duration::from_millis(500);
            let upstream = backlog_bytes(lab, &lab.gw(), &lab.uplink_interface(1));
            let downstream = backlog_bytes(lab, &lab.isp(1), "down0");
            worst_queue.0 = worst_queue.0.max(upstream);
            worst_queue.1 = worst_queue.1.max(downstream);
        }
        if cut.is_none() && started.elapsed() >= duration / 2 {
            black_hole(lab, victim, true);
            cut = Some(Instant::now());
        }
        if let Some(cut) = cut
            && detected.is_none()
            && status["uplinks"][victim - 1]["health"]["state"] == "down"
        {
            detected = Some(cut.elapsed());
        }
        thread::sleep(Duration::from_millis(50));
    }
    black_hole(lab, victim, false);
    let detected = detected.expect("the black hole was never detected");
    Phase {
        worst_rtt_ms: worst_rtt,
        worst_loss_percent: worst_loss,
        worst_queue,
        detected,
    }
}

/// A phase's load really built a deep queue both ways, and the black hole was found in time.
fn check_phase(what: &str, phase: &Phase) {
    println!(
        "{what}: uplink 1 never down; worst RTT in status {} ms, probe loss {} %, deepest queue up {} B / down {} B; black hole found in {:?}",
        phase.worst_rtt_ms,
        phase.worst_loss_percent,
        phase.worst_queue.0,
        phase.worst_queue.1,
        phase.detected
    );
    // 8 Mbit/s is 1 MB/s: half a second of queue each way at least.
    assert!(
        phase.worst_queue.0 >= 500_000 && phase.worst_queue.1 >= 500_000,
        "{what}: the load did not fill the queues: {:?}",
        phase.worst_queue
    );
    assert!(
        phase.detected <= Duration::from_secs(1),
        "{what}: black hole found in {:?}",
        phase.detected
    );
}

#[test]
fn a_saturated_line_with_a_one_second_queue_is_never_down() {
    let mut spec = LabSpec::new(&prefix("fq"), 3);
    spec.rates_mbit = vec![8, 20, 20];
    let lab = Lab::up(spec).unwrap();
    deep_queue_on_uplink_1(&lab);
    let config = write_config(&lab, "balancer.toml", &tracked_config(&lab, "198.18.9.1"));
    let _daemon = start_daemon(&lab, &config);
    for uplink in 1..=3 {
        wait_until_up(&lab, uplink, Duration::from_secs(5));
    }
    // LAN clients saturate uplink 1 both ways (iperf3, 8 streams each way): the server runs on
    // ISP 1's router, in uplink 1's subnet, so these flows are forced onto uplink 1 and
    // translated like any flow.
    let _modem_server = lab
        .spawn(
            &lab.isp(1),
            &["iperf3", "-s", "-B", "198.18.1.1", "-p", "5201"],
        )
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    let load = ["-P", "8", "-t", "30", "--bidir", "-p", "5201"];
    let mut lan_load = lab
        .spawn(
            &lab.client(1),
            &[["iperf3", "-c", "198.18.1.1"].as_slice(), &load].concat(),
        )
        .unwrap();
    let phase = watch_loaded_line(&lab, 3, Duration::from_secs(30));
    check_phase("LAN clients' load", &phase);
    let exit = lan_load.wait_timeout(Duration::from_secs(15)).unwrap();
    assert!(exit.is_some_and(|e| e.success()), "{}", lan_load.log());
    wait_until_up(&lab, 3, Duration::from_secs(5));

    // The gateway itself saturates uplink 1 both ways, from sockets bound to its address.
    let source = lab.uplink_source(1).to_string();
    let mut own_load = lab
        .spawn(
            &lab.gw(),
            &[
                ["iperf3", "-c", "198.18.9.1", "-B", &source].as_slice(),
                &load,
            ]
            .concat(),
        )
        .unwrap();
    let phase = watch_loaded_line(&lab, 2, Duration::from_secs(30));
    check_phase("the gateway's own load", &phase);
    let exit = own_load.wait_timeout(Duration::from_secs(15)).unwrap();
    assert!(exit.is_some_and(|e| e.success()), "{}", own_load.log());
}

/// One long-lived connection to the source server, read slowly so that it keeps talking
/// without filling the lab: its translated source (which uplink), bytes so far, and how it
/// ended if it did.
#[derive(Debug, Clone, Default)]
struct Talk {
    uplink_addr: Option<Ipv4Addr>,
    bytes: u64,
    ended: Option<(Duration, String)>,
}

/// Opens `count` connections from `client` to the source server, each read 2 KiB every
/// 50 ms by its own thread until an error, with a receive buffer of a few KiB.
fn long_lived(client: &str, count: usize, since: Instant) -> Arc<Mutex<Vec<Talk>>> {
    let talks = Arc::new(Mutex::new(vec![Talk::default(); count]));
    let netns = format!("/run/netns/{client}");
    for index in 0..count {
        let talks = talks.clone();
        let netns = netns.clone();
        thread::spawn(move || {
            let namespace = std::fs::File::open(&netns).unwrap();
            nix::sched::setns(namespace.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let server: SocketAddr = "198.18.9.1:9001".parse().unwrap();
            // A small receive buffer: what is read after an event must have crossed the
            // network after it, not waited in the buffer from before.
            let socket = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            socket
                .connect_timeout(&server.into(), Duration::from_secs(3))
                .unwrap();
            let stream = TcpStream::from(socket);
            stream
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut reader = BufReader::new(stream);
            let mut first = String::new();
            reader.read_line(&mut first).unwrap();
            let seen: SocketAddr = first.trim().parse().unwrap();
            let SocketAddr::V4(seen) = seen else {
                panic!("{seen}")
            };
            talks.lock().unwrap()[index].uplink_addr = Some(*seen.ip());
            let mut buffer = [0u8; 2048];
            loop {
                match reader.read(&mut buffer) {
                    Ok(0) => {
                        talks.lock().unwrap()[index].ended =
                            Some((since.elapsed(), "closed".into()));
                        return;
                    }
                    Ok(n) => talks.lock().unwrap()[index].bytes += n as u64,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => {
                        talks.lock().unwrap()[index].ended = Some((since.elapsed(), e.to_string()));
                        return;
                    }
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while talks
        .lock()
        .unwrap()
        .iter()
        .any(|t| t.uplink_addr.is_none())
    {
        assert!(Instant::now() < deadline, "connections not set up");
        thread::sleep(Duration::from_millis(50));
    }
    talks
}

/// Every connection is alive and got data in the last `window`.
fn all_talking(talks: &Arc<Mutex<Vec<Talk>>>, window: Duration) -> Result<(), String> {
    let before: Vec<u64> = talks.lock().unwrap().iter().map(|t| t.bytes).collect();
    thread::sleep(window);
    let now = talks.lock().unwrap().clone();
    for (index, (talk, before)) in now.iter().zip(before).enumerate() {
        if let Some(ended) = &talk.ended {
            return Err(format!(
                "connection {index} ({:?}) ended: {ended:?}",
                talk.uplink_addr
            ));
        }
        if talk.bytes == before {
            return Err(format!(
                "connection {index} ({:?}) is stuck",
                talk.uplink_addr
            ));
        }
    }
    Ok(())
}

#[test]
fn blips_shorter_than_the_reset_delay_cost_no_connection() {
    let mut spec = LabSpec::new(&prefix("fb"), 3);
    spec.rates_mbit = Vec::new();
    let lab = Lab::up(spec).unwrap();
    let config = write_config(&lab, "balancer.toml", &tracked_config(&lab, "198.18.9.1"));
    let _daemon = start_daemon(&lab, &config);
    for uplink in 1..=3 {
        wait_until_up(&lab, uplink, Duration::from_secs(5));
    }
    let since = Instant::now();
    let talks = long_lived(&lab.client(1), 12, since);
    let on = |uplink: usize| {
        let addr = lab.uplink_source(uplink);
        talks
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t.uplink_addr == Some(addr))
            .count()
    };
    assert!(
        (1..=3).all(|u| on(u) >= 1),
        "every uplink carries some of the 12: {:?}",
        talks.lock().unwrap()
    );
    all_talking(&talks, Duration::from_millis(500)).unwrap();

    // A 300 ms carrier blip on uplink 2: the gateway's wan2 loses its link.
    lab.exec_ok(&lab.isp(2), &["ip", "link", "set", "down0", "down"])
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    lab.exec_ok(&lab.isp(2), &["ip", "link", "set", "down0", "up"])
        .unwrap();
    thread::sleep(Duration::from_secs(2));
    all_talking(&talks, Duration::from_secs(1)).unwrap_or_else(|e| panic!("after a blip: {e}"));

    // A 600 ms black hole on uplink 3: probably judged down, but back before the reset delay.
    black_hole(&lab, 3, true);
    thread::sleep(Duration::from_millis(600));
    black_hole(&lab, 3, false);
    thread::sleep(Duration::from_secs(2));
    all_talking(&talks, Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("after a 600 ms black hole: {e}"));
    wait_until_up(&lab, 3, Duration::from_secs(5));

    // A 3 s outage on uplink 1: its connections are reset within 2.5 s, the others go on.
    let cut = Instant::now();
    let cut_at = since.elapsed();
    black_hole(&lab, 1, true);
    thread::sleep(Duration::from_secs(3));
    black_hole(&lab, 1, false);
    let addr1 = lab.uplink_source(1);
    let now = talks.lock().unwrap().clone();
    for talk in &now {
        if talk.uplink_addr == Some(addr1) {
            let (at, why) = talk
                .ended
                .clone()
                .expect("a connection on the dead uplink was reset");
            assert!(why.contains("reset"), "ended by a reset: {why}");
            let after = at.saturating_sub(cut_at);
            assert!(
                after <= Duration::from_millis(2500),
                "reset {after:?} after the cut"
            );
        } else {
            assert!(
                talk.ended.is_none(),
                "a connection on a live uplink ended: {talk:?}"
            );
        }
    }
    println!("3 s outage handled in {:?}", cut.elapsed());
    let survivors_before: Vec<u64> = talks
        .lock()
        .unwrap()
        .iter()
        .filter(|t| t.uplink_addr != Some(addr1))
        .map(|t| t.bytes)
        .collect();
    thread::sleep(Duration::from_secs(1));
    let survivors_after: Vec<u64> = talks
        .lock()
        .unwrap()
        .iter()
        .filter(|t| t.uplink_addr != Some(addr1))
        .map(|t| t.bytes)
        .collect();
    assert!(
        survivors_before
            .iter()
            .zip(&survivors_after)
            .all(|(b, a)| a > b),
        "the other connections go on talking: {survivors_before:?} -> {survivors_after:?}"
    );
}

#[test]
fn a_passive_verdict_clears_with_icmp_only_track_whose_host_drops_tcp() {
    let mut spec = LabSpec::new(&prefix("fp"), 3);
    spec.rates_mbit = Vec::new();
    let lab = Lab::up(spec).unwrap();
    // The probe host answers pings but silently drops TCP to it: the old rejoin (a connect to
    // the probe address on port 443) could never succeed.
    for rule in [
        "add table ip bal",
        "add chain ip bal input { type filter hook input priority 0 ; }",
        "add rule ip bal input ip daddr 198.18.9.53 tcp dport 443 drop",
    ] {
        let argv: Vec<&str> = ["nft"].into_iter().chain(rule.split(' ')).collect();
        lab.exec_ok(&lab.inet(), &argv).unwrap();
    }
    let config = write_config(&lab, "balancer.toml", &tracked_config(&lab, "198.18.9.53"));
    let _daemon = start_daemon(&lab, &config);
    for uplink in 1..=3 {
        wait_until_up(&lab, uplink, Duration::from_secs(5));
    }
    let since = Instant::now();
    let talks = long_lived(&lab.client(2), 6, since);
    // ISP 3 passes ICMP but drops TCP; new connections keep coming.
    lab.exec_ok(
        &lab.isp(3),
        &[
            "ip",
            "rule",
            "add",
            "priority",
            "50",
            "iif",
            "down0",
            "ipproto",
            "tcp",
            "blackhole",
        ],
    )
    .unwrap();
    let client = lab.client(1);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let netns = format!("/run/netns/{client}");
        thread::spawn(move || {
            let namespace = std::fs::File::open(&netns).unwrap();
            nix::sched::setns(namespace.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let server: SocketAddr = "198.18.9.1:9000".parse().unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                thread::spawn(move || {
                    let _ = TcpStream::connect_timeout(&server, Duration::from_secs(2));
                });
                thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let cut = Instant::now();
    while health_of(&lab, 3)["passive"].is_null() {
        assert!(cut.elapsed() < Duration::from_secs(4), "never condemned");
        thread::sleep(Duration::from_millis(50));
    }
    println!("condemned {:?} after the fault", cut.elapsed());
    // Its probes answer, but its traffic does not: the connections stuck on it are reset
    // after the delay all the same, and the others go on.
    let condemned = Instant::now();
    let addr3 = lab.uplink_source(3);
    assert!(
        talks
            .lock()
            .unwrap()
            .iter()
            .any(|t| t.uplink_addr == Some(addr3)),
        "some of the connections use uplink 3: {:?}",
        talks.lock().unwrap()
    );
    while talks
        .lock()
        .unwrap()
        .iter()
        .any(|t| t.uplink_addr == Some(addr3) && t.ended.is_none())
    {
        assert!(
            condemned.elapsed() < Duration::from_secs(3),
            "connections stuck on the condemned uplink were not reset: {:?}",
            talks.lock().unwrap()
        );
        thread::sleep(Duration::from_millis(50));
    }
    for talk in talks.lock().unwrap().iter() {
        if talk.uplink_addr == Some(addr3) {
            let (_, why) = talk.ended.clone().unwrap();
            assert!(why.contains("reset"), "{why}");
        } else {
            assert!(talk.ended.is_none(), "{talk:?}");
        }
    }
    println!(
        "stuck connections reset {:?} after the verdict",
        condemned.elapsed()
    );
    all_talking_except(&talks, addr3);

    // The fault clears: the uplink rejoins within 5 s and stays in.
    lab.exec_ok(&lab.isp(3), &["ip", "rule", "del", "priority", "50"])
        .unwrap();
    let cleared = Instant::now();
    while !health_of(&lab, 3)["passive"].is_null() {
        assert!(
            cleared.elapsed() < Duration::from_secs(5),
            "not rejoined 5 s after the fault cleared: {:#}",
            health_of(&lab, 3)
        );
        thread::sleep(Duration::from_millis(100));
    }
    println!("rejoined {:?} after the fault cleared", cleared.elapsed());
    let rejoined = Instant::now();
    while rejoined.elapsed() < Duration::from_secs(3) {
        assert!(
            health_of(&lab, 3)["passive"].is_null(),
            "condemned again on old evidence: {:#}",
            health_of(&lab, 3)
        );
        thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.join().unwrap();
    let spread = lab
        .tcp_many(&client, 20, None, Duration::from_secs(3))
        .unwrap();
    assert!(
        spread.sources.contains_key(&lab.uplink_source(3)),
        "uplink 3 carries new flows again: {spread:?}"
    );
}

#[test]
fn connections_stuck_on_a_line_that_died_while_the_daemon_was_stopped_are_reset_after_its_restart()
{
    let mut spec = LabSpec::new(&prefix("fr"), 3);
    spec.rates_mbit = Vec::new();
    let lab = Lab::up(spec).unwrap();
    let config = write_config(&lab, "balancer.toml", &tracked_config(&lab, "198.18.9.1"));
    let mut daemon = start_daemon(&lab, &config);
    for uplink in 1..=3 {
        wait_until_up(&lab, uplink, Duration::from_secs(5));
    }
    let since = Instant::now();
    let talks = long_lived(&lab.client(1), 9, since);
    // The daemon stops (the data plane runs on), and meanwhile uplink 3 dies.
    assert!(daemon.terminate(Duration::from_secs(5)).unwrap().success());
    black_hole(&lab, 3, true);
    thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let started_at = since.elapsed();
    let _daemon = start_daemon(&lab, &config);
    let addr3 = lab.uplink_source(3);
    let on_3 = talks
        .lock()
        .unwrap()
        .iter()
        .filter(|t| t.uplink_addr == Some(addr3))
        .count();
    assert!(on_3 >= 1, "some connections use uplink 3");
    // Judged down within a second of the start, reset after the delay: within 3 s.
    while talks
        .lock()
        .unwrap()
        .iter()
        .any(|t| t.uplink_addr == Some(addr3) && t.ended.is_none())
    {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "connections on the dead uplink still hang: {:?}",
            talks.lock().unwrap()
        );
        thread::sleep(Duration::from_millis(50));
    }
    for talk in talks.lock().unwrap().iter() {
        match &talk.ended {
            Some((at, why)) => {
                assert_eq!(talk.uplink_addr, Some(addr3), "{talk:?}");
                assert!(why.contains("reset"), "{why}");
                println!(
                    "reset {:?} after the restart",
                    at.saturating_sub(started_at)
                );
            }
            None => assert_ne!(talk.uplink_addr, Some(addr3)),
        }
    }
    all_talking_except(&talks, addr3);
    black_hole(&lab, 3, false);
}

/// The connections not on the uplink with address `dead` still receive data.
fn all_talking_except(talks: &Arc<Mutex<Vec<Talk>>>, dead: Ipv4Addr) {
    let bytes = |talks: &Arc<Mutex<Vec<Talk>>>| -> Vec<u64> {
        talks
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t.uplink_addr != Some(dead))
            .map(|t| t.bytes)
            .collect()
    };
    let before = bytes(talks);
    thread::sleep(Duration::from_secs(1));
    let after = bytes(talks);
    assert!(
        before.iter().zip(&after).all(|(b, a)| a > b),
        "the other connections go on talking: {before:?} -> {after:?}"
    );
}
