//! What a lab leaves behind to be found again: its state file under [`STATE_ROOT`] and its
//! namespaces, recognised by name.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{Lab, LabSpec, STATE_ROOT, servers::server_name};
use crate::process::{DEFAULT_TIMEOUT, run_ok};

/// What `STATE_ROOT/<prefix>/state.json` holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct LabState {
    pub spec: LabSpec,
    pub labtool: PathBuf,
    /// (name, pid) of each server started in the internet namespace.
    pub servers: Vec<(String, u32)>,
}

impl Lab {
    pub(super) fn write_state(&self) -> anyhow::Result<()> {
        let state = LabState {
            spec: self.spec.clone(),
            labtool: self.labtool.clone(),
            servers: self
                .servers
                .iter()
                .map(|s| (server_name(s), s.pid()))
                .collect(),
        };
        let path = self.state_dir.join("state.json");
        fs::write(&path, serde_json::to_string_pretty(&state)?)
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// The lab's state directory: `STATE_ROOT/<prefix>`.
pub fn state_dir(prefix: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(prefix)
}

/// Reads a lab's state file, if there is one.
pub fn read_state(prefix: &str) -> Option<LabState> {
    let text = fs::read_to_string(state_dir(prefix).join("state.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Whether `name` is one of the namespaces a lab with this prefix creates: exactly
/// `P-gw`, `P-inet`, `P-c<n>` or `P-isp<n>` (so `bal-lab` never matches `bal-lab-x-gw`).
pub fn is_lab_namespace(prefix: &str, name: &str) -> bool {
    let Some(role) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    let numbered = |tag: &str| {
        role.strip_prefix(tag)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    role == "gw" || role == "inet" || numbered("c") || numbered("isp")
}

/// The existing namespaces that belong to the lab with this prefix.
pub fn find_namespaces(prefix: &str) -> anyhow::Result<Vec<String>> {
    let list = run_ok(Command::new("ip").args(["netns", "list"]), DEFAULT_TIMEOUT)?;
    Ok(list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| is_lab_namespace(prefix, name))
        .map(str::to_owned)
        .collect::<Vec<_>>())
    .map(|mut names| {
        // Lab order (gw, clients, ISPs, inet) rather than the kernel's.
        names.sort_by_key(|n| role_order(prefix, n));
        names
    })
}

fn role_order(prefix: &str, name: &str) -> (u8, usize) {
    let role = name.get(prefix.len() + 1..).unwrap_or("");
    let number = |tag: &str| {
        role.strip_prefix(tag)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    match role {
        "gw" => (0, 0),
        "inet" => (3, 0),
        r if r.starts_with("isp") => (2, number("isp")),
        _ => (1, number("c")),
    }
}

pub(super) fn netns_pids(ns: &str) -> anyhow::Result<Vec<u32>> {
    let out = run_ok(
        Command::new("ip").args(["netns", "pids", ns]),
        DEFAULT_TIMEOUT,
    )?;
    Ok(out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}
