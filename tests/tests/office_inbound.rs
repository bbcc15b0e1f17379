//! Inbound connections leave the way they came, in the lab: a port forward (nftables DNAT on
//! the gateway to a LAN server) and a service of the gateway itself answer through every uplink,
//! by the uplink each connection came in on; a forwarded download runs straight through a
//! daemon restart; a spoofed datagram to a port not forwarded hijacks no LAN client's flows. (Office destinations and untranslatable traffic are in `office.rs`.)
//!
//! Root only. Each test builds its own lab.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use balancer_tests::{lab::LabSpec, process::ChildGuard};
use common::{office::*, transparent::*, *};

/// The port the gateway forwards (TCP and UDP) to client 1's whoami server.
const FORWARDED: u16 = 8080;

/// An nftables port forward on the gateway to client 1, reached from the internet host through
/// each uplink's address: 10 TCP and 10 UDP exchanges each, every reply back by the uplink it
/// came in on (any other would carry a source its ISP drops). A service of the gateway itself
/// answers through every uplink too.
#[test]
fn port_forwards_and_gateway_services_answer_through_every_uplink() {
    let gw = Gateway::up("ofb", |p| LabSpec::new(p, 3));
    let lab = &gw.lab;
    let tool = lab.labtool().to_string_lossy().into_owned();
    let client_addr = lab.client_addr(1).to_string();
    let _lan_server = lab
        .spawn(&lab.client(1), &[&tool, "serve", "--addr", &client_addr])
        .unwrap();
    // The gateway's own service, bound to each uplink address: a UDP reply goes out by the
    // address it is sent from (a wildcard-bound UDP socket must answer from the address it was
    // asked on, IP_PKTINFO; the kernel cannot know otherwise).
    let _gateway_servers: Vec<ChildGuard> = (1..=lab.uplinks())
        .map(|i| {
            let addr = lab.uplink_source(i).to_string();
            lab.spawn(&lab.gw(), &[&tool, "serve", "--addr", &addr])
                .unwrap()
        })
        .collect();
    let ruleset = format!(
        "table ip portforward {{\n chain prerouting {{\n type nat hook prerouting priority dstnat;\n\
         tcp dport {FORWARDED} dnat to {client_addr}:{WHOAMI}\n\
         udp dport {FORWARDED} dnat to {client_addr}:{WHOAMI}\n }}\n}}\n"
    );
    nft(lab, &lab.gw(), &ruleset);
    // UDP forwards are learnt from the ruleset every 30 s or at once on SIGHUP.
    reread_forwards(&gw);
    lab.labtool_exec(
        &lab.inet(),
        &["wait-tcp", &format!("{client_addr}:{WHOAMI}")],
    )
    .ok();

    let inet = lab.inet();
    for i in 1..=lab.uplinks() {
        let before = lab.isp_rx_packets(i).unwrap();
        for udp in [false, true] {
            for n in 0..10 {
                let forwarded = SocketAddrV4::new(lab.uplink_source(i), FORWARDED);
                let seen = whoami(lab, &inet, udp, forwarded).unwrap_or_else(|e| {
                    panic!(
                        "exchange {n} (udp={udp}) through uplink {i}'s port forward: {e}\n{}",
                        gw.diagnostics()
                    )
                });
                // The LAN server sees the internet host's own address: nothing was translated
                // on the way in but the forward's destination.
                assert!(
                    !gw.uplink_sources().contains(seen.ip()),
                    "the LAN server saw {seen}"
                );
            }
        }
        let carried = lab.isp_rx_packets(i).unwrap() - before;
        assert!(
            carried >= 40,
            "ISP {i} carried only {carried} packets of 20 exchanges"
        );
        // The gateway's own service.
        for udp in [false, true] {
            let service = SocketAddrV4::new(lab.uplink_source(i), WHOAMI);
            whoami(lab, &inet, udp, service).unwrap_or_else(|e| {
                panic!("the gateway's own service through uplink {i} (udp={udp}): {e}")
            });
        }
    }
    assert!(reason(lab, "pass_inbound_reply") >= 60);
    assert_eq!(flow_entries(lab), 0, "forwarded connections got flows");

    // Outbound traffic still works beside the forwards.
    let seen = lab
        .tcp_whoami(&lab.client(2), None, Duration::from_secs(3))
        .unwrap();
    assert!(gw.uplink_sources().contains(seen.ip()));
}

/// A port the gateway does not forward, where a spoofer aims its datagrams.
const NOT_FORWARDED: u16 = 5353;

/// Someone spoofs the internet server's whoami endpoint (198.18.9.1:9000, as one would spoof
/// 8.8.8.8:53) toward every uplink address, on a port the host does not forward. The LAN's own
/// UDP exchanges with that endpoint must stay ordinary translated flows: taken for replies to
/// an inbound exchange, they would leave untranslated with a private source and their ISP
/// would drop them.
#[test]
fn a_spoofed_datagram_to_a_port_not_forwarded_hijacks_no_lan_flow() {
    let gw = Gateway::up("ofs", |p| LabSpec::new(p, 3));
    let lab = &gw.lab;
    let server = balancer_tests::lab::SERVER_ADDR;
    let inet = lab.inet();
    for i in 1..=lab.uplinks() {
        let uplink: Ipv4Addr = lab.uplink_source(i);
        let out = lab
            .labtool_exec(
                &inet,
                &[
                    "raw-send",
                    &uplink.to_string(),
                    "--udp-from",
                    &WHOAMI.to_string(),
                    "--src",
                    &server.to_string(),
                    "--dst-port",
                    &NOT_FORWARDED.to_string(),
                    "--count",
                    "3",
                ],
            )
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for n in 0..10 {
        let client = lab.client(1 + n % 2);
        let seen =
            whoami(lab, &client, true, SocketAddrV4::new(server, WHOAMI)).unwrap_or_else(|e| {
                panic!(
                    "the LAN's UDP exchange {n} with {server}:{WHOAMI} after the spoof: {e}\n{}",
                    gw.diagnostics()
                )
            });
        assert!(
            gw.uplink_sources().contains(seen.ip()),
            "the server saw {seen}, not an uplink address"
        );
    }
    assert_eq!(
        reason(lab, "pass_inbound_reply"),
        0,
        "a LAN datagram was taken for a reply to the spoofer"
    );
}

/// A download from a LAN server through a port forward on uplink 2 runs straight through a
/// daemon restart: the inbound connection is pinned like the flows, so the server's data keeps
/// being steered back out of uplink 2 (had it been forgotten, its segments would be TCP of no
/// flow, dropped, and the download would stall).
#[test]
fn a_forwarded_download_survives_a_daemon_restart() {
    let mut gw = Gateway::up("ofe", |p| {
        let mut spec = LabSpec::new(p, 3);
        spec.rates_mbit = vec![10, 10, 10];
        spec
    });
    const BYTES: u64 = 6_000_000;
    let lab = &gw.lab;
    let tool = lab.labtool().to_string_lossy().into_owned();
    let client_addr = lab.client_addr(1).to_string();
    let _lan_server = lab
        .spawn(&lab.client(1), &[&tool, "serve", "--addr", &client_addr])
        .unwrap();
    nft(
        lab,
        &lab.gw(),
        &format!(
            "table ip portforward {{\n chain prerouting {{\n type nat hook prerouting priority dstnat;\n\
             tcp dport {FORWARDED} dnat to {client_addr}:8080\n }}\n}}\n"
        ),
    );
    let forwarded = SocketAddrV4::new(lab.uplink_source(2), FORWARDED).to_string();
    let path = format!("/bytes/{BYTES}");
    let config = gw.config.clone();
    let slot = &mut gw.daemon;
    let (transfer, replies_after) = std::thread::scope(|s| {
        let download = s.spawn(|| {
            lab.labtool_exec(
                &lab.inet(),
                &[
                    "http-get",
                    &forwarded,
                    "--path",
                    &path,
                    "--count",
                    "--timeout-ms",
                    "20000",
                ],
            )
            .unwrap()
        });
        std::thread::sleep(Duration::from_millis(1500));
        let mut daemon = slot.take().expect("a running daemon");
        let exit = daemon.terminate(Duration::from_secs(5)).unwrap();
        assert!(exit.success(), "daemon exit: {exit}\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(500));
        *slot = Some(start_daemon(lab, &config));
        wait_for_dataplane(lab);
        let replies_before = reason(lab, "pass_inbound_reply");
        std::thread::sleep(Duration::from_millis(700));
        let replies_after = reason(lab, "pass_inbound_reply") - replies_before;
        assert!(
            !download.is_finished(),
            "the download ended before the new daemon ran: the restart was not tested"
        );
        (download.join().unwrap(), replies_after)
    });
    assert!(
        transfer.status.success(),
        "the forwarded download across the restart failed: {}\n{}",
        String::from_utf8_lossy(&transfer.stderr),
        gw.diagnostics()
    );
    let summary: serde_json::Value = serde_json::from_slice(&transfer.stdout).unwrap();
    eprintln!("forwarded download across the restart: {summary}");
    assert_eq!(summary["bytes"].as_u64(), Some(BYTES));
    let gap = summary["max_gap_ms"].as_f64().unwrap();
    assert!(gap < 1500.0, "the download stalled for {gap:.0} ms");
    // Counted per skb: with GSO one is up to 64 KiB, so 0.7 s at 10 Mbit/s makes dozens.
    assert!(
        replies_after > 10,
        "the LAN server's data was not steered after the restart ({replies_after})"
    );
    assert_eq!(reason(&gw.lab, "drop_tcp_without_flow"), 0);
}
