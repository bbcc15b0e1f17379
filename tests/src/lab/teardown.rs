//! Tearing a lab down: by namespace name (so also after an interrupted `up`), killing what runs
//! inside first, removing pinned data planes, namespaces and the state dir; and on drop.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::ensure;

use super::{BPFFS, Lab, find_namespaces, state::netns_pids, state_dir, validate_prefix};
use crate::process::{self, DEFAULT_TIMEOUT, run_ok};

impl Lab {
    /// Tears down every namespace of the lab with this prefix (found by name, so this works after
    /// an interrupted `up` or without the state dir), killing the processes inside them first,
    /// then removes the state dir. Succeeds when there is nothing to remove.
    pub fn down(prefix: &str) -> anyhow::Result<()> {
        validate_prefix(prefix)?;
        let namespaces = find_namespaces(prefix)?;
        let mut pids = Vec::new();
        for ns in &namespaces {
            pids.extend(netns_pids(ns).unwrap_or_default());
        }
        // SIGTERM first (dnsmasq and iperf3 clean up), then SIGKILL what is left after a second.
        for &pid in &pids {
            process::signal(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let left: Vec<u32> = namespaces
                .iter()
                .flat_map(|ns| netns_pids(ns).unwrap_or_default())
                .collect();
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for pid in left {
                    process::signal(pid, nix::sys::signal::Signal::SIGKILL);
                }
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let mut errors = Vec::new();
        // A daemon that was killed leaves its data plane pinned (by design: forwarding goes on).
        // Pins are per network namespace; once the namespace is gone nothing can use them, so
        // remove them with it rather than leave the maps' memory behind.
        for ns in &namespaces {
            if let Ok(meta) = fs::metadata(Path::new("/run/netns").join(ns)) {
                let pins = Path::new(BPFFS).join(format!("net-{}", meta.ino()));
                match fs::remove_dir_all(&pins) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => errors.push(format!("removing {}: {e}", pins.display())),
                }
            }
        }
        for ns in &namespaces {
            if let Err(e) = run_ok(
                Command::new("ip").args(["netns", "delete", ns]),
                DEFAULT_TIMEOUT,
            ) {
                errors.push(format!("{e:#}"));
            }
        }
        let dir = state_dir(prefix);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("removing {}: {e}", dir.display())),
        }
        ensure!(
            errors.is_empty(),
            "lab {prefix} teardown: {}",
            errors.join("; ")
        );
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(e) = Lab::down(&self.spec.prefix) {
            eprintln!("lab {}: teardown failed: {e:#}", self.spec.prefix);
        }
        // The servers were killed with their namespace; dropping the guards reaps them.
        self.servers.clear();
    }
}
