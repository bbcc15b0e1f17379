//! The bridge between the plan and the kernel: observes the current state, and applies a list
//! of operations so that either all of them take effect or, when one fails, the ones already
//! done are undone in reverse order.

use std::collections::BTreeMap;

use crate::{
    config::Config,
    netlink::{self, Netlink, NetlinkError},
    plan::{self, Observed, Operation},
    sysctl::{self, SysctlBackup, SysctlError},
};

#[derive(Debug, thiserror::Error)]
pub enum OperationError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Sysctl(#[from] SysctlError),
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("`{operation}` failed; {rolled_back} earlier change(s) rolled back{}", rollback_summary(.rollback_failures))]
    Failed {
        operation: String,
        rolled_back: usize,
        rollback_failures: Vec<String>,
        #[source]
        source: OperationError,
    },
}

fn rollback_summary(failures: &[String]) -> String {
    if failures.is_empty() {
        String::new()
    } else {
        format!(", but undoing these failed: {}", failures.join("; "))
    }
}

/// Reads everything the plan compares against.
pub async fn observe(netlink: &Netlink, config: &Config) -> Result<Observed, OperationError> {
    let links = netlink.links().await?;
    let addresses = netlink.ipv4_addresses().await?;
    let routes = netlink.routes(&links).await?;
    let rules = netlink.rules().await?;
    let local_port_range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((parts.next()??, parts.next()??))
        });
    let mut sysctls = BTreeMap::new();
    for (key, _) in plan::desired_sysctls(config, local_port_range) {
        // A setting of an interface that does not exist reads as empty; the plan reports the
        // missing interface itself with the config key.
        let value = sysctl::read(&key).unwrap_or_default();
        sysctls.insert(key, value);
    }
    Ok(Observed {
        down: Vec::new(),
        local_port_range,
        links,
        addresses,
        routes,
        rules,
        sysctls,
    })
}

/// Applies `operations` in order. On the first failure, undoes what was done and reports.
pub async fn apply(
    netlink: &Netlink,
    backup: &mut SysctlBackup,
    operations: &[Operation],
) -> Result<(), ApplyError> {
    for (done, operation) in operations.iter().enumerate() {
        if let Err(source) = execute(netlink, backup, operation).await {
            let mut rollback_failures = Vec::new();
            for earlier in operations[..done].iter().rev() {
                if let Some(inverse) = earlier.inverse()
                    && let Err(error) = execute(netlink, backup, &inverse).await
                {
                    rollback_failures.push(format!("{inverse}: {error}"));
                }
            }
            return Err(ApplyError::Failed {
                operation: operation.to_string(),
                rolled_back: done,
                rollback_failures,
                source,
            });
        }
        tracing::info!(%operation, "applied");
    }
    Ok(())
}

/// Applies every operation it can, in order, and returns the ones that failed with why: one
/// uplink the kernel refuses (its interface vanished a moment ago) never keeps the others
/// from being maintained. Nothing is rolled back; the next pass retries what failed.
pub async fn apply_best_effort(
    netlink: &Netlink,
    backup: &mut SysctlBackup,
    operations: &[Operation],
) -> Vec<(Operation, OperationError)> {
    let mut failures = Vec::new();
    for operation in operations {
        match execute(netlink, backup, operation).await {
            Ok(()) => tracing::info!(%operation, "applied"),
            Err(error) => failures.push((operation.clone(), error)),
        }
    }
    failures
}

/// Undoes operations that were applied, in reverse order, best effort; returns what failed.
pub async fn undo(
    netlink: &Netlink,
    backup: &mut SysctlBackup,
    operations: &[Operation],
) -> Vec<String> {
    let mut failures = Vec::new();
    for operation in operations.iter().rev() {
        if let Some(inverse) = operation.inverse()
            && let Err(error) = execute(netlink, backup, &inverse).await
        {
            failures.push(format!("{inverse}: {error}"));
        }
    }
    failures
}

async fn execute(
    netlink: &Netlink,
    backup: &mut SysctlBackup,
    operation: &Operation,
) -> Result<(), OperationError> {
    match operation {
        Operation::SetSysctl { key, from, to } => {
            backup.remember(key, from)?;
            sysctl::write(key, to)?;
        }
        Operation::AddRoute(route) => netlink.add_route(route).await?,
        Operation::ReplaceRoute { new, .. } => netlink.replace_route(new).await?,
        Operation::DeleteRoute(route) => match netlink.delete_route(route).await {
            Err(error) if !netlink::is_gone(&error) => return Err(error.into()),
            _ => {}
        },
        Operation::AddRule(rule) => netlink.add_rule(rule).await?,
        Operation::DeleteRule(rule) => match netlink.delete_rule(rule).await {
            Err(error) if !netlink::is_gone(&error) => return Err(error.into()),
            _ => {}
        },
        Operation::FlushNeighbours(interface) => {
            let removed = netlink.flush_neighbours(interface).await?;
            tracing::debug!(interface = %interface.name, removed, "flushed neighbours");
        }
    }
    Ok(())
}
