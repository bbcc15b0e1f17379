//! Helpers of the office and inbound-connection tests: whoami through the lab, an nftables
//! ruleset loaded in a namespace, and counters of `balancer stats`.

use std::net::SocketAddrV4;

use balancer_tests::lab::Lab;

use super::*;

/// The lab servers' whoami port (TCP and UDP).
pub const WHOAMI: u16 = 9000;

/// `labtool tcp-whoami|udp-whoami addr` from `ns`: the address the server saw, or the error.
pub fn whoami(
    lab: &Lab,
    ns: &str,
    udp: bool,
    server: SocketAddrV4,
) -> Result<SocketAddrV4, String> {
    let cmd = if udp { "udp-whoami" } else { "tcp-whoami" };
    let server = server.to_string();
    let out = lab
        .labtool_exec(ns, &[cmd, &server, "--timeout-ms", "1500"])
        .map_err(|e| format!("{e:#}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .map_err(|e| format!("whoami answered {text:?}: {e}"))
}

/// Loads an nftables ruleset (`nft -f`) in `ns`.
pub fn nft(lab: &Lab, ns: &str, ruleset: &str) {
    static FILES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = lab.state_dir().join(format!("ruleset-{n}.nft"));
    std::fs::write(&path, ruleset).unwrap();
    lab.exec_ok(ns, &["nft", "-f", &path.display().to_string()])
        .unwrap();
}

/// Makes the daemon read the host's ruleset again at once (SIGHUP) after the test changed its
/// port forwards, and waits for the pass that applies it.
pub fn reread_forwards(gw: &transparent::Gateway) {
    let daemon = gw.daemon.as_ref().expect("the gateway's daemon runs");
    let before = field::status(&gw.lab)["last_reload"].clone();
    balancer_tests::process::signal(daemon.pid(), nix::sys::signal::Signal::SIGHUP);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while field::status(&gw.lab)["last_reload"] == before {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload reported:\n{}",
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Let the pass that follows the reload run.
    std::thread::sleep(std::time::Duration::from_millis(300));
}

/// A reason counter of `balancer stats --json`.
pub fn reason(lab: &Lab, name: &str) -> u64 {
    stats(lab).0["reasons"][name].as_u64().unwrap_or(0)
}

pub fn flow_entries(lab: &Lab) -> u64 {
    stats(lab).0["flow_entries"].as_u64().unwrap()
}
