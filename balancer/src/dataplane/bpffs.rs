//! Where the data plane pins its maps and links, so they outlive the daemon.
//!
//! Pins live in a bpffs at `/run/balancer/bpffs`, one directory per network namespace (the
//! programs are attached to that namespace's interfaces) and per map layout version:
//! `/run/balancer/bpffs/net-<namespace inode>/v<ABI_VERSION>/{maps,links}`. A changed layout gets
//! a new directory, so an old map is never reused with a new meaning.
//!
//! `ip netns exec` runs each command in a private mount namespace: a bpffs mounted there is gone
//! when the command exits. So the daemon mounts the bpffs only when none is there, and says so
//! when that mount cannot outlive it; labs and tests mount it beforehand in the host's mount
//! namespace, where every `ip netns exec` sees it.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use balancer_common::maps::ABI_VERSION;

pub const BPFFS_ROOT: &str = "/run/balancer/bpffs";

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("finding this process's network namespace")]
    Namespace(#[source] std::io::Error),
    #[error("mounting a bpf filesystem at {path}")]
    Mount {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("creating {path}")]
    Create {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The pin directories of this network namespace's data plane.
#[derive(Debug, Clone)]
pub struct PinDir {
    pub root: PathBuf,
}

impl PinDir {
    /// The pin directory for the current network namespace (nothing is created).
    pub fn for_this_namespace() -> Result<PinDir, BpffsError> {
        let inode = std::fs::metadata("/proc/self/ns/net")
            .map_err(BpffsError::Namespace)?
            .ino();
        Ok(PinDir {
            root: Path::new(BPFFS_ROOT)
                .join(format!("net-{inode}"))
                .join(format!("v{ABI_VERSION}")),
        })
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// `links/<ifindex>-<direction>`: the ifindex, not the name, because a renamed interface
    /// keeps its hooks.
    pub fn link(&self, ifindex: u32, direction: &str) -> PathBuf {
        self.links().join(format!("{ifindex}-{direction}"))
    }

    /// True when pins from an earlier run are there to adopt.
    pub fn exists(&self) -> bool {
        self.root.join("maps").is_dir()
    }

    /// Makes sure a bpffs is mounted and the directories exist.
    pub fn create(&self) -> Result<(), BpffsError> {
        ensure_mounted()?;
        for dir in [self.root.join("maps"), self.links()] {
            std::fs::create_dir_all(&dir).map_err(|source| BpffsError::Create {
                path: dir.display().to_string(),
                source,
            })?;
        }
        Ok(())
    }
}

/// True when `path` is the root of a bpf filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

fn ensure_mounted() -> Result<(), BpffsError> {
    let root = Path::new(BPFFS_ROOT);
    if is_bpffs(root) {
        return Ok(());
    }
    std::fs::create_dir_all(root).map_err(|source| BpffsError::Create {
        path: BPFFS_ROOT.into(),
        source,
    })?;
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| BpffsError::Mount {
        path: BPFFS_ROOT.into(),
        source: errno.into(),
    })?;
    let private =
        std::fs::read_link("/proc/self/ns/mnt").ok() != std::fs::read_link("/proc/1/ns/mnt").ok();
    if private {
        tracing::warn!(
            path = BPFFS_ROOT,
            "mounted a bpffs inside a private mount namespace (ip netns exec?): pinned programs and flows will not outlive this process; mount one at {BPFFS_ROOT} in the host's mount namespace first"
        );
    }
    Ok(())
}
