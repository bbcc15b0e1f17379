//! Issue 6, "no request reaches the gateway itself (by its addresses, loopback or a name that
//! resolves to them)": the name half. The lab's dnsmasq answers `gw.lab.example` with the
//! gateway's LAN address, `wan.lab.example` with uplink 1's source and `loop.lab.example` with
//! 127.0.0.1 (tests/src/lab/servers.rs); the proxy resolves each out of an uplink, checks the
//! answer and refuses with 403, for plain requests and for CONNECT. dnsmasq's log shows the name
//! was asked, so the refusal came after resolution, not from the name's text.
//!
//! Root only. The lab's prefix is `bal-pxn<pid>`; dropping the fixture stops the daemon, runs
//! `balancer down` and removes the lab.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
// Shared with tests/tests/proxy.rs, which uses more of it.
#[allow(dead_code)]
#[path = "proxy/support.rs"]
mod support;

use std::time::Duration;

use support::*;

#[test]
fn names_that_resolve_to_the_gateway_or_loopback_are_refused() {
    let gw = ProxyLab::up(
        "pxn",
        "listen = \"198.18.0.1:3128\"\nconnect_ports = [443, 3128, 8080]",
    );
    let lab = &gw.lab;

    // The control: a name the lab resolves to the internet host goes through.
    let ok = gw.curl(1, &["http://ok.lab.example:8080/"]);
    assert_eq!(ok.code, 200, "{ok:?}\n{}", gw.log());

    let gateway = balancer_tests::lab::LAN_GATEWAY.to_string();
    let uplink = lab.uplink_source(1).to_string();
    for (name, port, address) in [
        // The proxy's own listener, by name: a request loop if it were served.
        ("gw.lab.example", 3128, gateway.as_str()),
        ("gw.lab.example", 8080, &gateway),
        ("wan.lab.example", 8080, &uplink),
        ("loop.lab.example", 8080, "127.0.0.1"),
    ] {
        let url = format!("http://{name}:{port}/");
        let refused = gw.curl(1, &[&url]);
        assert_eq!(refused.code, 403, "{url}: {refused:?}\n{}", gw.log());
        assert!(
            refused.body.contains(&format!("{name} is {address}")),
            "{url}: the reason names the resolved address: {:?}",
            refused.body
        );
        assert!(
            !gw.dns_queries_from(name).is_empty(),
            "{name} was resolved by the proxy before the refusal"
        );

        // The same through a tunnel.
        let request = format!("CONNECT {name}:{port} HTTP/1.1\r\nHost: {name}:{port}\r\n\r\n");
        let (answer, _) = raw_exchange(&lab.client(2), request.as_bytes(), Duration::from_secs(3));
        assert!(
            answer.starts_with("HTTP/1.1 403"),
            "CONNECT {name}:{port}: {answer}"
        );
    }

    // The refusals were counted; nothing was tunnelled or fetched for them.
    wait_until(Duration::from_secs(2), || {
        gw.status()["proxy"]["refused"].as_u64().unwrap_or(0) >= 8
    });
}
