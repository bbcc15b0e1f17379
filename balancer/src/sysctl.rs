//! Reads and writes kernel settings under /proc/sys, and keeps the record of the values the
//! balancer found before it changed them, so `down` can put them back even without a config.
//!
//! /proc/sys/net belongs to the network namespace of the process that opens it, so these act on
//! the namespace the balancer runs in, whatever mount namespace it was started from.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::routing::SysctlKey;

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("reading {key}")]
    Read {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setting {key} to {value}")]
    Write {
        key: String,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("saving the record of original settings to {path}")]
    SaveBackup {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the record of original settings at {path} is damaged")]
    LoadBackup {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

fn path_of(key: &SysctlKey) -> PathBuf {
    Path::new("/proc/sys").join(&key.0)
}

pub fn read(key: &SysctlKey) -> Result<String, SysctlError> {
    std::fs::read_to_string(path_of(key))
        .map(|value| value.trim().to_string())
        .map_err(|source| SysctlError::Read {
            key: key.dotted(),
            source,
        })
}

pub fn write(key: &SysctlKey, value: &str) -> Result<(), SysctlError> {
    std::fs::write(path_of(key), value).map_err(|source| SysctlError::Write {
        key: key.dotted(),
        value: value.to_string(),
        source,
    })
}

/// The original values of every setting the balancer changed, kept in the state directory.
/// A value is recorded only the first time, so a second `run` never mistakes the balancer's own
/// setting for the administrator's.
#[derive(Debug, Default)]
pub struct SysctlBackup {
    path: PathBuf,
    original: BTreeMap<String, String>,
}

impl SysctlBackup {
    pub fn open(path: PathBuf) -> Result<SysctlBackup, SysctlError> {
        let original = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|source| SysctlError::LoadBackup {
                path: path.display().to_string(),
                source,
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(SysctlError::Read {
                    key: path.display().to_string(),
                    source,
                });
            }
        };
        Ok(SysctlBackup { path, original })
    }

    /// Records `value` as the original of `key` unless one is already recorded, and saves the
    /// record before the caller changes the setting.
    pub fn remember(&mut self, key: &SysctlKey, value: &str) -> Result<(), SysctlError> {
        if self.original.contains_key(&key.0) {
            return Ok(());
        }
        self.original.insert(key.0.clone(), value.to_string());
        self.save()
    }

    pub fn originals(&self) -> impl Iterator<Item = (SysctlKey, &str)> {
        self.original
            .iter()
            .map(|(k, v)| (SysctlKey(k.clone()), v.as_str()))
    }

    pub fn forget(&mut self, key: &SysctlKey) -> Result<(), SysctlError> {
        if self.original.remove(&key.0).is_some() {
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> Result<(), SysctlError> {
        let error = |source| SysctlError::SaveBackup {
            path: self.path.display().to_string(),
            source,
        };
        if self.original.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(error(e)),
                _ => Ok(()),
            };
        }
        let text = serde_json::to_string_pretty(&self.original)
            .map_err(std::io::Error::other)
            .map_err(error)?;
        // Write then rename, so a crash never leaves half a record.
        let temporary = self.path.with_extension("tmp");
        std::fs::write(&temporary, text).map_err(error)?;
        std::fs::rename(&temporary, &self.path).map_err(error)
    }
}
