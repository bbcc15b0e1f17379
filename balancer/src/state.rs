//! The per-instance state directory and what the daemon serves from it.
//!
//! One directory per network namespace (by default `/run/balancer/net-<namespace inode>`, so
//! daemons in several namespaces never collide, and any process in the same namespace finds it,
//! including one started by `ip netns exec`, which remounts /sys but not /run). It holds the
//! daemon's pid file, the record of original sysctl values and `state.sock`, a Unix socket
//! answering a one-line request (`status`) with a versioned JSON document.

use std::{
    io::{Read, Write},
    os::unix::{fs::MetadataExt, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Version of the JSON served on the socket. 2 only added fields to 1 (`stages`, `errors`,
/// `last_reload`); a consumer of 1 reads 2 unchanged.
pub const STATUS_VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("finding this process's network namespace")]
    Namespace(#[source] std::io::Error),
    #[error("creating the state directory {path}")]
    CreateDirectory {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("another balancer daemon (pid {pid}) already runs for {path}")]
    AlreadyRunning { pid: i32, path: String },
    #[error("writing {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no daemon answers on {path} (is `balancer run` running in this network namespace?)")]
    NotRunning {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the daemon's answer on {path}")]
    Query {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where an instance keeps its files.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub path: PathBuf,
}

impl StateDir {
    /// The explicit directory, or the default one for the current network namespace.
    pub fn resolve(explicit: Option<&Path>) -> Result<StateDir, StateError> {
        if let Some(path) = explicit {
            return Ok(StateDir {
                path: path.to_path_buf(),
            });
        }
        let inode = std::fs::metadata("/proc/self/ns/net")
            .map_err(StateError::Namespace)?
            .ino();
        Ok(StateDir {
            path: PathBuf::from(format!("/run/balancer/net-{inode}")),
        })
    }

    pub fn create(&self) -> Result<(), StateError> {
        std::fs::create_dir_all(&self.path).map_err(|source| StateError::CreateDirectory {
            path: self.path.display().to_string(),
            source,
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.path.join("state.sock")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.path.join("daemon.pid")
    }

    pub fn sysctl_backup(&self) -> PathBuf {
        self.path.join("sysctl-originals.json")
    }

    /// The pid of a live daemon of this instance, if one runs.
    pub fn running_daemon(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|cmdline| String::from_utf8_lossy(&cmdline).contains("balancer"))
            .unwrap_or(false);
        (alive && ours && pid != std::process::id() as i32).then_some(pid)
    }

    /// Claims the instance for this process.
    pub fn claim(&self) -> Result<(), StateError> {
        if let Some(pid) = self.running_daemon() {
            return Err(StateError::AlreadyRunning {
                pid,
                path: self.path.display().to_string(),
            });
        }
        let path = self.pid_file();
        std::fs::write(&path, format!("{}\n", std::process::id())).map_err(|source| {
            StateError::Write {
                path: path.display().to_string(),
                source,
            }
        })
    }

    /// Removes the pid file and socket of a daemon that is leaving.
    pub fn release(&self) {
        let _ = std::fs::remove_file(self.socket());
        let _ = std::fs::remove_file(self.pid_file());
    }

    /// Asks the daemon for its status document.
    pub fn query(&self, request: &str) -> Result<serde_json::Value, StateError> {
        let path = self.socket();
        let shown = path.display().to_string();
        let mut stream = UnixStream::connect(&path).map_err(|source| StateError::NotRunning {
            path: shown.clone(),
            source,
        })?;
        let query_error = |source| StateError::Query {
            path: shown.clone(),
            source,
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(query_error)?;
        stream
            .write_all(format!("{request}\n").as_bytes())
            .map_err(query_error)?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).map_err(query_error)?;
        serde_json::from_str(&answer).map_err(|e| query_error(std::io::Error::other(e)))
    }
}

/// What the daemon reports about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: u32,
    pub pid: u32,
    pub config: String,
    pub state_dir: String,
    pub started_unix: u64,
    pub reconciles: u64,
    pub last_reconcile_unix: u64,
    pub last_error: Option<String>,
    pub uplinks: Vec<UplinkStatus>,
    /// The outcome of the last reload (SIGHUP), if there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reload: Option<Reload>,
    /// The forward proxy's counters when `[proxy]` is configured (refreshed every 250 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<crate::proxy::ProxyStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UplinkStatus {
    pub id: u32,
    pub name: String,
    pub interface: String,
    pub source: String,
    pub gateway: String,
    pub weight: u32,
    pub table: u32,
    pub mark: String,
    pub carrier: bool,
    /// Why the kernel cannot carry this uplink now (interface down or gone, address missing).
    pub unavailable: Option<String>,
    /// What the health probes say (filled in when the status is served).
    #[serde(default)]
    pub health: Option<crate::health::UplinkHealth>,
    /// Every stage of the uplink (configured, present, addressed, carrier, health, usable),
    /// each with its reason; `source` and `gateway` above show the learned values.
    #[serde(default)]
    pub stages: crate::uplink::Stages,
    /// Whether it takes new flows now.
    #[serde(default)]
    pub usable: bool,
    /// What the kernel refused for this uplink in the last pass (retried every pass).
    #[serde(default)]
    pub errors: Vec<String>,
}

/// The outcome of a reload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reload {
    pub unix: u64,
    pub ok: bool,
    /// What changed, or why the new config was refused (the running one stays).
    pub message: String,
}
