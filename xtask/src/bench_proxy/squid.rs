//! squid: installing Debian's package without starting its service, its configuration for the
//! lab, and starting it in the gateway namespace (it is stopped by PID through its `ChildGuard`).

use std::{
    fmt::Write as _,
    net::{SocketAddrV4, TcpStream},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context, bail};
use balancer_tests::{
    lab::{DNS_ADDR, LAN_GATEWAY, LAN_NETWORK, Lab},
    process::ChildGuard,
};

use super::{SQUID_PORT, load::in_namespace};
use crate::util;

/// squid's configuration: the LAN may use it, nothing is cached, no access log (ours keeps
/// none either), and upstream connections leave from the uplinks' addresses in equal shares:
/// the first `random` ACL takes 1/n, the next 1/(n-1) of the rest, ..., the last takes the rest.
pub(super) fn squid_conf(lab: &Lab) -> String {
    let dir = lab.state_dir().join("squid").display().to_string();
    let uplinks = lab.uplinks();
    let mut conf = format!(
        "# Written by cargo xtask bench-proxy.\n\
         http_port {LAN_GATEWAY}:{SQUID_PORT}\n\
         visible_hostname bench-proxy\n\
         acl lan src {LAN_NETWORK}\n\
         http_access allow lan\n\
         http_access deny all\n\
         cache deny all\n\
         cache_mem 0 MB\n\
         access_log none\n\
         cache_store_log none\n\
         cache_log {dir}/cache.log\n\
         pid_filename {dir}/squid.pid\n\
         coredump_dir {dir}\n\
         netdb_filename none\n\
         pinger_enable off\n\
         shutdown_lifetime 1 seconds\n\
         dns_nameservers {DNS_ADDR}\n\
         max_filedescriptors 4096\n"
    );
    for i in 1..uplinks {
        let _ = writeln!(conf, "acl uplink{i} random 1/{}", uplinks + 1 - i);
    }
    for i in 1..=uplinks {
        let source = lab.uplink_source(i);
        if i < uplinks {
            let _ = writeln!(conf, "tcp_outgoing_address {source} uplink{i}");
        } else {
            let _ = writeln!(conf, "tcp_outgoing_address {source}");
        }
    }
    conf
}

/// Writes the config under the lab's state dir (owned by squid's user, `proxy`, which squid
/// switches to), checks it with `squid -k parse`, starts `squid -N` in the gateway and waits
/// until it accepts.
pub(super) fn start_squid(lab: &Lab, conf: &str) -> anyhow::Result<ChildGuard> {
    let dir = lab.state_dir().join("squid");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let user = nix::unistd::User::from_name("proxy")
        .context("looking up user proxy")?
        .context("no user proxy (Debian's squid package creates it)")?;
    nix::unistd::chown(&dir, Some(user.uid), Some(user.gid))
        .with_context(|| format!("chown proxy {}", dir.display()))?;
    let path = dir.join("squid.conf");
    std::fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
    let path = path.display().to_string();
    lab.exec_ok(&lab.gw(), &["squid", "-k", "parse", "-f", &path])
        .context("squid -k parse")?;
    let mut squid = lab.spawn(&lab.gw(), &["squid", "-N", "-f", &path])?;
    let target = SocketAddrV4::new(LAN_GATEWAY, SQUID_PORT);
    let client = lab.client(1);
    for _ in 0..100 {
        let accepts = in_namespace(&client, move || {
            Ok(TcpStream::connect_timeout(&target.into(), Duration::from_millis(200)).is_ok())
        })?;
        if accepts {
            println!("bench-proxy: squid up (PID {}) on {target}", squid.pid());
            return Ok(squid);
        }
        if let Some(exit) = squid.try_wait()? {
            let log = std::fs::read_to_string(dir.join("cache.log")).unwrap_or_default();
            bail!("squid exited with {exit}:\n{}\n{log}", squid.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(dir.join("cache.log")).unwrap_or_default();
    bail!("squid never accepted on {target}:\n{}\n{log}", squid.log())
}

/// Installs Debian's squid if it is missing and returns its version line. The package's
/// service must not start: on Debian a package's postinst asks invoke-rc.d, which obeys
/// /usr/sbin/policy-rc.d; when there is none, one that refuses (exit 101) is in place for the
/// install and removed after.
pub(super) fn ensure_squid() -> anyhow::Result<String> {
    let version = || {
        Command::new("squid")
            .arg("-v")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
    };
    if let Some(version) = version() {
        return Ok(version);
    }
    println!(
        "bench-proxy: squid is missing; installing Debian's squid (its service is not started)"
    );
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let placed = !policy.exists();
    if placed {
        std::fs::write(
            policy,
            "#!/bin/sh\n# cargo xtask bench-proxy: no service starts.\nexit 101\n",
        )
        .context("writing /usr/sbin/policy-rc.d")?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .context("chmod /usr/sbin/policy-rc.d")?;
    }
    let installed = util::run(
        Command::new("apt-get")
            .args(["-q", "-o", "Dpkg::Use-Pty=0", "install", "-y"])
            .args(["--no-install-recommends", "squid"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    );
    if placed {
        std::fs::remove_file(policy).context("removing /usr/sbin/policy-rc.d")?;
    }
    installed.context("installing squid")?;
    version().context("squid -v after installing squid")
}
