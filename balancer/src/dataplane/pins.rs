//! Pins that survive real life: what an earlier daemon left in the bpffs may no longer fit. Pin
//! directories of older layout versions are removed (unpinning their links detaches their
//! programs), and a pinned map whose type, key, value or size no longer matches the object is
//! replaced rather than reused with a new meaning. Severed links are handled where links are
//! adopted (`Dataplane::apply`). Nothing here is fatal to a start that could otherwise go on.

use std::path::{Path, PathBuf};

use aya::{
    EbpfLoader,
    maps::{Map, MapData, MapInfo},
};
use balancer_common::maps::{self as names, ABI_VERSION};

use super::{DataplaneError, OBJECT, bpffs::PinDir, teardown};

/// Removes every pin directory of this namespace other than the current layout's
/// (`v<ABI_VERSION>`): their links (detaching the programs) and maps. Returns how many links and
/// maps were unpinned.
pub fn remove_older_versions(pins: &PinDir) -> Result<(usize, usize), DataplaneError> {
    let mut removed = (0, 0);
    for dir in older_versions(pins) {
        let (links, maps) = teardown(&PinDir { root: dir.clone() })?;
        removed.0 += links;
        removed.1 += maps;
        tracing::info!(
            path = %dir.display(),
            links,
            maps,
            "removed the pins of an older data plane layout; their programs are detached"
        );
    }
    Ok(removed)
}

/// The sibling directories `v<N>` of `pins.root` with N other than [`ABI_VERSION`].
fn older_versions(pins: &PinDir) -> Vec<PathBuf> {
    let Some(namespace_dir) = pins.root.parent() else {
        return Vec::new();
    };
    let current = format!("v{ABI_VERSION}");
    std::fs::read_dir(namespace_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name != current
                && name
                    .strip_prefix('v')
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|entry| entry.path())
        .collect()
}

/// Compares each pinned map with what the embedded object declares (type, key and value size,
/// and capacity except for the flow tables, whose size is a setting); if any differs, every
/// map pin is removed, so the maps are created afresh and consistently. A stale map means the
/// layout changed without a new version: its entries would be read with the wrong meaning.
pub fn remove_stale_maps(pins: &PinDir, pinned: &[&'static str]) -> Result<(), DataplaneError> {
    // Maps of the object, created small: only their shapes are compared.
    let probe = EbpfLoader::new()
        .map_max_entries(names::FLOWS, 1)
        .map_max_entries(names::NAT_REVERSE, 1)
        .map_max_entries(names::PENDING_FLOWS, 1)
        .map_max_entries(names::PENDING_REVERSE, 1)
        .load(OBJECT)
        .map_err(|error| DataplaneError::Object(Box::new(error)))?;
    let mut stale = Vec::new();
    for name in pinned {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let wanted = probe.map(name).and_then(map_data).map(MapData::info);
        let Some(Ok(wanted)) = wanted else {
            continue;
        };
        let resizable = [
            names::FLOWS,
            names::NAT_REVERSE,
            names::PENDING_FLOWS,
            names::PENDING_REVERSE,
        ]
        .contains(name);
        let fits = MapInfo::from_pin(&path).is_ok_and(|found| {
            found.map_type().ok() == wanted.map_type().ok()
                && found.key_size() == wanted.key_size()
                && found.value_size() == wanted.value_size()
                && (resizable || found.max_entries() == wanted.max_entries())
        });
        if !fits {
            stale.push(*name);
        }
    }
    if stale.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        stale = ?stale,
        "pinned maps do not match this build's layout; replacing all of them (flows are lost)"
    );
    for name in pinned {
        remove_pin(&pins.map(name))?;
    }
    Ok(())
}

fn remove_pin(path: &Path) -> Result<(), DataplaneError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DataplaneError::Unpin {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// The kernel map behind the kinds of map the object uses.
fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::Array(data)
        | Map::HashMap(data)
        | Map::LruHashMap(data)
        | Map::LpmTrie(data)
        | Map::PerCpuArray(data)
        | Map::PerCpuHashMap(data)
        | Map::PerCpuLruHashMap(data) => Some(data),
        _ => None,
    }
}
