//! Talking to systemd as a `Type=notify` service: readiness once the first apply is done,
//! watchdog keep-alives from the daemon's main loop (so a hung loop gets the service restarted),
//! and "stopping" on exit. The sd_notify protocol is one datagram per message to the socket
//! named in `$NOTIFY_SOCKET`; outside systemd (no such variable) every call does nothing.

use std::{
    io,
    os::{linux::net::SocketAddrExt, unix::net::UnixDatagram},
    path::Path,
    time::Duration,
};

/// Sends `state` (e.g. `READY=1`) to systemd's notification socket, if there is one. A failure
/// is logged, never fatal: the daemon's job does not depend on systemd hearing it.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(error) = notify_to(Path::new(&socket), state) {
        tracing::warn!(%error, state, "telling systemd");
    }
}

/// Sends `state` to the notification socket at `socket`: a path, or an abstract address when
/// it starts with `@`.
pub fn notify_to(socket: &Path, state: &str) -> io::Result<()> {
    let sender = UnixDatagram::unbound()?;
    let bytes = socket.as_os_str().as_encoded_bytes();
    let address = match bytes.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)?,
        None => std::os::unix::net::SocketAddr::from_pathname(socket)?,
    };
    sender.send_to_addr(state.as_bytes(), &address)?;
    Ok(())
}

/// How often to send `WATCHDOG=1`: half of `WatchdogSec=` as systemd passes it
/// (`$WATCHDOG_USEC`, meant for this process when `$WATCHDOG_PID` is unset or ours). `None`
/// when no watchdog is asked for.
pub fn watchdog_interval() -> Option<Duration> {
    let pid = std::env::var("WATCHDOG_PID").ok();
    let usec = std::env::var("WATCHDOG_USEC").ok();
    keepalive_interval(usec.as_deref(), pid.as_deref(), std::process::id())
}

fn keepalive_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if pid.is_some_and(|pid| pid.parse::<u32>().ok() != Some(own_pid)) {
        return None;
    }
    let usec: u64 = usec?.parse().ok().filter(|&usec| usec > 0)?;
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("balancer-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path).unwrap();
        notify_to(&path, "READY=1\nSTATUS=applied").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=applied");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn messages_reach_an_abstract_socket() {
        let name = format!("balancer-notify-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&address).unwrap();
        notify_to(Path::new(&format!("@{name}")), "WATCHDOG=1").unwrap();
        let mut buf = [0u8; 16];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[test]
    fn the_watchdog_is_fed_at_half_its_timeout_and_only_by_its_process() {
        assert_eq!(
            keepalive_interval(Some("10000000"), None, 7),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            keepalive_interval(Some("10000000"), Some("7"), 7),
            Some(Duration::from_secs(5))
        );
        assert_eq!(keepalive_interval(Some("10000000"), Some("8"), 7), None);
        assert_eq!(keepalive_interval(None, None, 7), None);
        assert_eq!(keepalive_interval(Some("0"), None, 7), None);
        assert_eq!(keepalive_interval(Some("junk"), None, 7), None);
    }
}
