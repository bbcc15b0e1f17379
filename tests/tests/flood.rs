//! A flow table that survives a flood, in the lab with real connections: with
//! `flow_entries = 4096`, one LAN host opening 100,000 UDP flows in a few seconds costs none of
//! eight established TCP connections of another host, whose new connections succeed during
//! and right after the flood, and each table's forward and reverse entry counts agree after a
//! sweep.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use balancer_tests::lab::{Lab, LabSpec};
use common::*;

/// Flows the flood opens, and the time it may take at most.
const FLOOD_FLOWS: u32 = 100_000;
const FLOOD_LIMIT: Duration = Duration::from_secs(10);

/// Runs `work` on a thread of its own inside network namespace `ns` (setns is per thread).
fn in_netns<T: Send + 'static>(
    ns: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let namespace = std::fs::File::open(&path).unwrap();
        nix::sched::setns(namespace.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        work()
    })
}

/// A connection to the source server that reads a little every 50 ms; `bytes` grows while it
/// lives, and is set to `u64::MAX` when it ends.
fn long_lived(ns: &str) -> Arc<AtomicU64> {
    let bytes = Arc::new(AtomicU64::new(0));
    let counter = bytes.clone();
    in_netns(ns, move || {
        let server: SocketAddr = "198.18.9.1:9001".parse().unwrap();
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .unwrap();
        // A small receive buffer: bytes read after the flood crossed the network after it.
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
        let mut buffer = [0u8; 2048];
        loop {
            match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => {
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
            thread::sleep(Duration::from_millis(50));
        }
        counter.store(u64::MAX, Ordering::Relaxed);
    });
    bytes
}

/// Every connection is alive and got data within `window`.
fn all_talking(connections: &[Arc<AtomicU64>], window: Duration) -> Result<(), String> {
    let before: Vec<u64> = connections
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    thread::sleep(window);
    for (index, (connection, before)) in connections.iter().zip(before).enumerate() {
        let now = connection.load(Ordering::Relaxed);
        if now == u64::MAX {
            return Err(format!("connection {index} ended"));
        }
        if now == before {
            return Err(format!("connection {index} is stuck"));
        }
    }
    Ok(())
}

/// Sends one datagram on each of `FLOOD_FLOWS` distinct 5-tuples (four sockets, 25,000
/// destination ports each, none with a server behind it), within `FLOOD_LIMIT`. Returns how
/// many were sent and how long it took.
fn flood(ns: &str) -> thread::JoinHandle<(u32, Duration)> {
    in_netns(ns, || {
        let started = Instant::now();
        let sockets: Vec<UdpSocket> = (0..4)
            .map(|_| UdpSocket::bind("0.0.0.0:0").unwrap())
            .collect();
        let mut sent = 0;
        'flows: for port in 0..FLOOD_FLOWS / 4 {
            for socket in &sockets {
                if started.elapsed() > FLOOD_LIMIT {
                    break 'flows;
                }
                let target = SocketAddr::from(([198, 18, 9, 1], 20_000 + port as u16));
                // A full socket buffer only loses that datagram; the flow count stays bounded.
                if socket.send_to(b"flood", target).is_ok() {
                    sent += 1;
                }
            }
        }
        (sent, started.elapsed())
    })
}

#[test]
fn a_flood_of_new_flows_costs_no_established_connection() {
    let mut spec = LabSpec::new(&prefix("fl"), 3);
    spec.rates_mbit = Vec::new();
    let lab = Lab::up(spec).unwrap();
    let config = format!(
        "{}\n[dataplane]\nflow_entries = 4096\n",
        lab.balancer_config_toml()
    );
    let config = write_config(&lab, "balancer.toml", &config);
    let _daemon = start_daemon(&lab, &config);
    wait_for_dataplane(&lab);

    let connections: Vec<Arc<AtomicU64>> = (0..8).map(|_| long_lived(&lab.client(1))).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while connections.iter().any(|c| c.load(Ordering::Relaxed) == 0) {
        assert!(Instant::now() < deadline, "connections not set up");
        thread::sleep(Duration::from_millis(50));
    }
    all_talking(&connections, Duration::from_millis(500)).unwrap();

    let flooding = flood(&lab.client(2));
    // New connections from the other host while the flood runs.
    let mut during = 0;
    while !flooding.is_finished() {
        lab.tcp_whoami(&lab.client(1), None, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("a new connection during the flood: {e:#}"));
        during += 1;
    }
    let (sent, took) = flooding.join().unwrap();
    println!("flood: {sent} flows in {took:?}; {during} new connections meanwhile");
    assert!(
        sent >= FLOOD_FLOWS * 9 / 10,
        "the flood sent only {sent} of {FLOOD_FLOWS}"
    );
    assert!(during >= 1, "no new connection was tried during the flood");
    let (after, _) = stats(&lab);
    println!(
        "after the flood: flows {} reverse {} pending {} / {}, evictions {}, refused {}, takeovers {}",
        after["flow_entries"],
        after["reverse_entries"],
        after["pending_entries"],
        after["pending_reverse_entries"],
        after["evictions"],
        after["promotions_refused"],
        after["port_takeovers"]
    );
    assert!(
        after["pending_entries"].as_u64().unwrap() <= 4096,
        "the pending table holds at most its size: {after}"
    );

    // Right after the flood: new connections work, and none of the eight was lost.
    for _ in 0..5 {
        lab.tcp_whoami(&lab.client(1), None, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("a new connection after the flood: {e:#}"));
    }
    all_talking(&connections, Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("after the flood: {e}"));

    // The sweeper (every 10 s) leaves each table's two halves in step.
    let deadline = Instant::now() + Duration::from_secs(35);
    loop {
        let (now, _) = stats(&lab);
        let count = |name: &str| now[name].as_u64().unwrap();
        if count("flow_entries") == count("reverse_entries")
            && count("pending_entries") == count("pending_reverse_entries")
        {
            assert!(count("flow_entries") >= 8, "{now}");
            println!(
                "after sweeps: flows {} reverse {} pending {} / {}",
                count("flow_entries"),
                count("reverse_entries"),
                count("pending_entries"),
                count("pending_reverse_entries")
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "forward and reverse counts still differ after sweeps: {now}"
        );
        thread::sleep(Duration::from_secs(2));
    }
    all_talking(&connections, Duration::from_secs(1)).unwrap_or_else(|e| panic!("at the end: {e}"));
}
