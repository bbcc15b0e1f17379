//! Failover that never hurts, in the lab with real connections (the saturated line is in
//! `failover_load.rs`): a carrier blip or a black hole shorter than the reset delay costs no
//! connection; a longer outage still resets its connections and leaves the others alone; a
//! passive verdict resets the connections stuck on its line and clears with ICMP-only `track`
//! whose probe host drops TCP; a daemon restarted after a line died resets what is stuck on it.
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
use common::{failover::*, *};

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
