//! `balancer down`: removes every rule and route tagged as the balancer's and puts back the
//! settings it changed, from the record in the state directory, so it needs no config. It keeps
//! going past failures and reports them all.

use crate::{
    netlink::Netlink,
    state::StateDir,
    sysctl::{self, SysctlBackup},
};

#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    #[error(
        "the balancer daemon (pid {pid}) is running; stop it first (it would put everything back)"
    )]
    DaemonRunning { pid: i32 },
    #[error("teardown left things behind:\n  {}", .failures.join("\n  "))]
    Incomplete { failures: Vec<String> },
}

#[derive(Debug, Default, Clone, Copy)]
pub struct TeardownReport {
    pub rules: usize,
    pub routes: usize,
    pub sysctls: usize,
    /// Pinned links removed (each detaches a program from an interface hook).
    pub links: usize,
    pub maps: usize,
}

pub async fn down(
    netlink: &Netlink,
    state_dir: &StateDir,
) -> Result<TeardownReport, TeardownError> {
    if let Some(pid) = state_dir.running_daemon() {
        return Err(TeardownError::DaemonRunning { pid });
    }
    let mut failures = Vec::new();
    let links = match netlink.links().await {
        Ok(links) => links,
        Err(error) => {
            failures.push(crate::daemon::error_chain(&error));
            Vec::new()
        }
    };
    // The data plane first: unpinning its links detaches the programs, so no packet is marked
    // for a table that is about to disappear.
    let (mut links_removed, mut maps_removed) = (0, 0);
    match crate::dataplane::bpffs::PinDir::for_this_namespace() {
        Ok(pins) => {
            match crate::dataplane::teardown(&pins) {
                Ok((links, maps)) => (links_removed, maps_removed) = (links, maps),
                Err(error) => failures.push(crate::daemon::error_chain(&error)),
            }
            // Pins an older build left under another layout version go too.
            match crate::dataplane::pins::remove_older_versions(&pins) {
                Ok((links, maps)) => {
                    links_removed += links;
                    maps_removed += maps;
                }
                Err(error) => failures.push(crate::daemon::error_chain(&error)),
            }
        }
        Err(error) => failures.push(crate::daemon::error_chain(&error)),
    }
    let _ = std::fs::remove_file(crate::stats::names_path(&state_dir.path));
    // Rules first, so no rule ever points at a table being emptied.
    let (rules, routes, errors) = netlink.delete_all_owned(&links).await;
    failures.extend(errors.iter().map(|e| crate::daemon::error_chain(e)));

    let mut sysctls = 0;
    match SysctlBackup::open(state_dir.sysctl_backup()) {
        Ok(mut backup) => {
            let originals: Vec<_> = backup
                .originals()
                .map(|(k, v)| (k, v.to_string()))
                .collect();
            for (key, value) in originals {
                let result = match sysctl::write(&key, &value) {
                    Ok(()) => {
                        sysctls += 1;
                        Ok(())
                    }
                    // The interface is gone, and its settings with it.
                    Err(sysctl::SysctlError::Write { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        Ok(())
                    }
                    Err(error) => Err(error),
                };
                match result.and_then(|()| backup.forget(&key)) {
                    Ok(()) => {}
                    Err(error) => failures.push(crate::daemon::error_chain(&error)),
                }
            }
        }
        Err(error) => failures.push(crate::daemon::error_chain(&error)),
    }
    if !failures.is_empty() {
        return Err(TeardownError::Incomplete { failures });
    }
    let _ = std::fs::remove_dir(&state_dir.path);
    Ok(TeardownReport {
        rules,
        routes,
        sysctls,
        links: links_removed,
        maps: maps_removed,
    })
}
