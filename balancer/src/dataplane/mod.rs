//! The eBPF data plane: loads the embedded `balancer-ebpf` object, attaches its programs and
//! writes and reads its maps. This is the only module that touches aya; the rest of the
//! balancer sees typed calls and [`DataplaneError`].
//!
//! The daemon loads it pinned ([`Dataplane::load_pinned`]): maps and TCX links live in a bpffs
//! (see `bpffs`), so forwarding and flows continue while the daemon is stopped, and a new daemon
//! adopts them, swapping its freshly loaded programs into the existing links atomically.
//! Unpinned, attached programs live only as long as the [`Dataplane`] value (tests).

pub mod bpffs;
pub mod desired;
mod forwards;
mod maps;
pub mod pins;
mod renumber;
mod reset;

use std::{
    collections::{BTreeSet, HashSet},
    io,
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{MapError, PerCpuArray},
    programs::{
        ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
    },
};
use balancer_common::{
    counters::{COUNTER_BYTES, COUNTER_IPV4, COUNTER_PACKETS, COUNTERS_MAP},
    flow::{FlowKey, ReverseKey},
    maps as names,
};

pub use self::maps::{address_of, open_pinned, reverse_key};
use self::{
    bpffs::{BpffsError, PinDir},
    desired::{DataplaneDesired, Direction},
};

/// Built by `build.rs` with Debian's rustc for bpfel-unknown-none. Aligned because aya parses the
/// ELF in place.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/balancer-ebpf"));

/// The embedded eBPF object, for tests that load it themselves (BPF_PROG_TEST_RUN).
pub fn object() -> &'static [u8] {
    OBJECT
}

/// The classifier on the LAN interface's ingress hook.
pub const LAN_INGRESS: &str = names::PROGRAM_LAN_INGRESS;

/// What went wrong, and where: every variant names the program, map or interface involved.
/// aya's errors are boxed because they are large and these travel up through every caller.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("parsing the embedded eBPF object")]
    Object(#[source] Box<EbpfError>),

    #[error("eBPF program `{program}` is missing from the object")]
    MissingProgram { program: &'static str },

    #[error("eBPF program `{program}` is not a tc classifier")]
    WrongProgramType {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },

    /// The kernel refused the program; `log` is the verifier's explanation, verbatim.
    #[error("the verifier rejected eBPF program `{program}`:\n{log}")]
    Verifier {
        program: &'static str,
        log: String,
        #[source]
        source: io::Error,
    },

    #[error("loading eBPF program `{program}`")]
    Load {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },

    #[error("attaching eBPF program `{program}` to {interface} ({direction})")]
    Attach {
        program: &'static str,
        interface: String,
        direction: &'static str,
        #[source]
        source: Box<ProgramError>,
    },

    #[error("eBPF map `{map}` is missing from the object")]
    MissingMap { map: &'static str },

    #[error("reading eBPF map `{map}`")]
    Map {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },

    #[error("writing eBPF map `{map}`")]
    WriteMap {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },

    #[error(transparent)]
    Bpffs(#[from] BpffsError),

    #[error("pinning the {direction} link of {interface} at {path}")]
    Pin {
        interface: String,
        direction: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },

    #[error("adopting the pinned {direction} link of {interface}")]
    Adopt {
        interface: String,
        direction: &'static str,
        #[source]
        source: Box<ProgramError>,
    },

    #[error("opening a raw socket to reset TCP connections")]
    Reset {
        #[source]
        source: io::Error,
    },

    #[error("removing {path}")]
    Unpin {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// LAN ingress counters, summed over all CPUs since the programs were loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LanCounters {
    /// Frames seen on LAN ingress.
    pub packets: u64,
    /// Their bytes, Ethernet header included.
    pub bytes: u64,
    /// Of those frames, the ones carrying IPv4.
    pub ipv4: u64,
}

/// The loaded programs and maps. Programs are verified at [`Dataplane::load`], so a program the
/// kernel would reject fails start-up, not the first attach.
pub struct Dataplane {
    ebpf: Ebpf,
    pins: Option<PinDir>,
    /// Hooks this process has attached or adopted, so a reconcile touches only what changed.
    attached: BTreeSet<(u32, Direction)>,
    /// What was last written to the maps; an unchanged desired state writes nothing.
    written: Option<DataplaneDesired>,
    /// Reverse entries without their flow at the last sweep, main table and pending table.
    orphans_seen: [HashSet<ReverseKey>; 2],
    /// Flows without their reverse half at the last sweep, main table and pending table.
    lone_flows_seen: [HashSet<FlowKey>; 2],
    /// The forwarded UDP ports last written; an unchanged set writes nothing.
    forwarded_udp_written: Option<BTreeSet<u16>>,
    /// The reserved ports last written; an unchanged set writes nothing.
    reserved_written: Option<BTreeSet<(u8, u16)>>,
}

/// Every program in the object, in the order they are loaded.
const PROGRAMS: [&str; 6] = [
    names::PROGRAM_LAN_INGRESS,
    names::PROGRAM_LAN_HAIRPIN,
    names::PROGRAM_UPLINK_EGRESS,
    names::PROGRAM_UPLINK_INGRESS,
    names::PROGRAM_UPLINK_EGRESS_RAW_IP,
    names::PROGRAM_UPLINK_INGRESS_RAW_IP,
];

/// Every map user space pins and shares with the programs.
const PINNED_MAPS: [&str; 20] = [
    names::FLOWS,
    names::MAPPINGS,
    names::MAPPING_PORTS,
    names::RESERVED_PORTS,
    names::UNSOLICITED_BUDGET,
    names::PENDING_FLOWS,
    names::PENDING_REVERSE,
    names::INBOUND,
    names::FORWARDED_UDP_PORTS,
    names::NAT_REVERSE,
    names::UPLINKS,
    names::UPLINK_BY_IFINDEX,
    names::SCHEDULE,
    names::SCHEDULE_LENGTH,
    names::SCHEDULE_CURSOR,
    names::DESTINATIONS,
    names::SETTINGS,
    names::UPLINK_COUNTERS,
    names::REASONS,
    COUNTERS_MAP,
];

impl Dataplane {
    /// Loads the embedded object and every program in it into the kernel, with private maps.
    pub fn load() -> Result<Self, DataplaneError> {
        let ebpf = Ebpf::load(OBJECT).map_err(|error| DataplaneError::Object(Box::new(error)))?;
        Self::load_programs(ebpf, None)
    }

    /// Loads the object with every map pinned under `pins`, reusing maps (and so flows and
    /// counters) that an earlier daemon pinned there. Returns whether it adopted existing pins.
    pub fn load_pinned(pins: &PinDir, flow_entries: u32) -> Result<(Self, bool), DataplaneError> {
        pins::remove_older_versions(pins)?;
        if pins.exists() {
            pins::remove_stale_maps(pins, &PINNED_MAPS)?;
        }
        let adopted = pins.exists();
        pins.create()?;
        let paths: Vec<(&'static str, std::path::PathBuf)> = PINNED_MAPS
            .iter()
            .map(|name| (*name, pins.map(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(names::FLOWS, flow_entries)
            .map_max_entries(names::NAT_REVERSE, flow_entries)
            .map_max_entries(names::PENDING_FLOWS, flow_entries)
            .map_max_entries(names::PENDING_REVERSE, flow_entries);
        let ebpf = loader
            .load(OBJECT)
            .map_err(|error| DataplaneError::Object(Box::new(error)))?;
        let dataplane = Self::load_programs(ebpf, Some(pins.clone()))?;
        if adopted {
            // aya reuses a pinned map as it is; a new size only takes effect after `down`.
            if let Some(Ok(info)) = dataplane.ebpf.map(names::FLOWS).map(|map| match map {
                aya::maps::Map::HashMap(data) => data.info(),
                _ => Err(MapError::InvalidName {
                    name: names::FLOWS.into(),
                }),
            }) && info.max_entries() != flow_entries
            {
                tracing::warn!(
                    kept = info.max_entries(),
                    configured = flow_entries,
                    "the pinned flow table keeps its size; run `balancer down` to apply a new flow_entries"
                );
            }
        }
        Ok((dataplane, adopted))
    }

    fn load_programs(mut ebpf: Ebpf, pins: Option<PinDir>) -> Result<Self, DataplaneError> {
        for program in PROGRAMS {
            classifier(&mut ebpf, program)?
                .load()
                .map_err(|error| load_error(program, error))?;
        }
        install_hairpin(&mut ebpf)?;
        Ok(Self {
            ebpf,
            pins,
            attached: BTreeSet::new(),
            written: None,
            orphans_seen: Default::default(),
            lone_flows_seen: Default::default(),
            forwarded_udp_written: None,
            reserved_written: None,
        })
    }

    /// Attaches `lan_ingress` to `interface`'s ingress hook through TCX (kernel >= 6.6), appended
    /// after any programs already there; no clsact qdisc is created.
    pub fn attach_lan_ingress(&mut self, interface: &str) -> Result<(), DataplaneError> {
        classifier(&mut self.ebpf, LAN_INGRESS)?
            .attach(interface, TcAttachType::Ingress)
            .map_err(|source| DataplaneError::Attach {
                program: LAN_INGRESS,
                interface: interface.to_owned(),
                direction: "ingress",
                source: Box::new(source),
            })?;
        Ok(())
    }

    /// Reads the LAN counters, summing each slot over all CPUs.
    pub fn counters(&self) -> Result<LanCounters, DataplaneError> {
        let map = self
            .ebpf
            .map(COUNTERS_MAP)
            .ok_or(DataplaneError::MissingMap { map: COUNTERS_MAP })?;
        let map_error = |source| DataplaneError::Map {
            map: COUNTERS_MAP,
            source: Box::new(source),
        };
        let counters = PerCpuArray::<_, u64>::try_from(map).map_err(map_error)?;
        let sum = |index: u32| -> Result<u64, DataplaneError> {
            let per_cpu = counters.get(&index, 0).map_err(map_error)?;
            // Wrapping, like the kernel-side counters themselves.
            Ok(per_cpu
                .iter()
                .fold(0u64, |total, value| total.wrapping_add(*value)))
        };
        Ok(LanCounters {
            packets: sum(COUNTER_PACKETS)?,
            bytes: sum(COUNTER_BYTES)?,
            ipv4: sum(COUNTER_IPV4)?,
        })
    }
}

impl Dataplane {
    /// Makes the maps and the attachments match `desired`. New hooks are attached before the
    /// maps are written and unwanted ones detached after: an uplink that joins is in the
    /// schedule only once its programs translate at its egress, and one that leaves is out of
    /// it before they go, so no flow leaves by an uplink untranslated (its ISP drops it).
    pub fn apply(&mut self, desired: &DataplaneDesired) -> Result<(), DataplaneError> {
        let attached = self.attach_wanted(desired);
        self.write_maps(desired)?;
        self.detach_unwanted(desired)?;
        attached
    }

    fn write_maps(&mut self, desired: &DataplaneDesired) -> Result<(), DataplaneError> {
        if self.written.as_ref() != Some(desired) {
            let destinations_changed = self
                .written
                .as_ref()
                .is_none_or(|written| written.destinations != desired.destinations);
            let addresses_changed = self.written.as_ref().is_none_or(|written| {
                renumber::addresses(&written.uplinks) != renumber::addresses(&desired.uplinks)
            });
            self.write_settings(&desired.settings)?;
            self.write_uplinks(desired)?;
            self.write_destinations(&desired.destinations)?;
            self.write_schedule(&desired.schedule)?;
            self.written = Some(desired.clone());
            // A scan of every flow: only when the list changed (not on every failover, which
            // rewrites the uplinks and schedule), and after the schedule is in place.
            if destinations_changed {
                let removed = self.remove_flows_against(&desired.destinations)?;
                if removed > 0 {
                    tracing::info!(
                        removed,
                        "removed flows to destinations that are no longer balanced"
                    );
                }
            }
            // An uplink renumbered or removed: its flows on the old address can never get a
            // reply again. Release them now (TCP clients reset), not at their timeouts.
            if addresses_changed {
                self.release_stale_flows(desired)?;
            }
        }
        Ok(())
    }

    /// Attaches every wanted hook, best effort: one interface that refuses (vanished between
    /// the observation and now) never keeps the others from being attached. Returns the first
    /// failure after trying them all.
    fn attach_wanted(&mut self, desired: &DataplaneDesired) -> Result<(), DataplaneError> {
        let mut first_error = None;
        for attachment in &desired.attachments {
            let hook = (attachment.interface.index, attachment.direction);
            if self.attached.contains(&hook) {
                continue;
            }
            match self.attach_one(attachment) {
                Ok(()) => {
                    self.attached.insert(hook);
                }
                Err(error) => {
                    tracing::warn!(interface = %attachment.interface.name, error = %crate::daemon::error_chain(&error), "attaching a program");
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Hooks no longer wanted (an uplink removed from the config): unpinning detaches them.
    fn detach_unwanted(&mut self, desired: &DataplaneDesired) -> Result<(), DataplaneError> {
        if let Some(pins) = &self.pins {
            let wanted: BTreeSet<std::path::PathBuf> = desired
                .attachments
                .iter()
                .map(|a| pins.link(a.interface.index, a.direction.name()))
                .collect();
            for entry in std::fs::read_dir(pins.links())
                .into_iter()
                .flatten()
                .flatten()
            {
                if !wanted.contains(&entry.path()) {
                    std::fs::remove_file(entry.path()).map_err(|source| DataplaneError::Unpin {
                        path: entry.path().display().to_string(),
                        source,
                    })?;
                }
            }
            self.attached.retain(|(ifindex, direction)| {
                wanted.contains(&pins.link(*ifindex, direction.name()))
            });
        }
        Ok(())
    }

    fn attach_one(&mut self, attachment: &desired::Attachment) -> Result<(), DataplaneError> {
        let direction = attachment.direction.name();
        let interface = attachment.interface.name.clone();
        let attach_type = match attachment.direction {
            Direction::Ingress => TcAttachType::Ingress,
            Direction::Egress => TcAttachType::Egress,
        };
        let pin_path = self
            .pins
            .as_ref()
            .map(|pins| pins.link(attachment.interface.index, direction));
        let program = classifier(&mut self.ebpf, attachment.program)?;
        // An earlier daemon's link: swap this process's program into it, atomically. A link
        // that cannot be adopted (severed: its interface was deleted or re-created, its
        // namespace re-made; or not a TCX link at all) is stale: unpinned and replaced.
        let adopted = match &pin_path {
            Some(path) if path.exists() => match adopt_link(program, path) {
                Ok(()) => true,
                Err(source) => {
                    let error = DataplaneError::Adopt {
                        interface: interface.clone(),
                        direction,
                        source: Box::new(source),
                    };
                    tracing::warn!(
                        error = %crate::daemon::error_chain(&error),
                        path = %path.display(),
                        "replacing a stale pinned link"
                    );
                    std::fs::remove_file(path).map_err(|source| DataplaneError::Unpin {
                        path: path.display().to_string(),
                        source,
                    })?;
                    false
                }
            },
            _ => false,
        };
        match pin_path {
            _ if adopted => {}
            Some(path) => {
                let id = program.attach(&interface, attach_type).map_err(|source| {
                    DataplaneError::Attach {
                        program: attachment.program,
                        interface: interface.clone(),
                        direction,
                        source: Box::new(source),
                    }
                })?;
                let link = program
                    .take_link(id)
                    .map_err(|source| DataplaneError::Attach {
                        program: attachment.program,
                        interface: interface.clone(),
                        direction,
                        source: Box::new(source),
                    })?;
                let pin_error = |source: io::Error| DataplaneError::Pin {
                    interface: interface.clone(),
                    direction,
                    path: path.display().to_string(),
                    source,
                };
                let fd_link = FdLink::try_from(link).map_err(|e| pin_error(io::Error::other(e)))?;
                fd_link
                    .pin(&path)
                    .map_err(|e| pin_error(io::Error::other(e)))?;
            }
            None => {
                program.attach(&interface, attach_type).map_err(|source| {
                    DataplaneError::Attach {
                        program: attachment.program,
                        interface: interface.clone(),
                        direction,
                        source: Box::new(source),
                    }
                })?;
            }
        }
        Ok(())
    }
}

/// Removes every pinned link (which detaches the programs) and map of this namespace's data
/// plane. Returns how many links and maps it unpinned.
pub fn teardown(pins: &PinDir) -> Result<(usize, usize), DataplaneError> {
    let mut counts = (0, 0);
    for (dir, count) in [
        (pins.links(), &mut counts.0),
        (pins.root.join("maps"), &mut counts.1),
    ] {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(DataplaneError::Unpin {
                    path: dir.display().to_string(),
                    source,
                });
            }
        };
        for entry in entries.flatten() {
            std::fs::remove_file(entry.path()).map_err(|source| DataplaneError::Unpin {
                path: entry.path().display().to_string(),
                source,
            })?;
            *count += 1;
        }
        let _ = std::fs::remove_dir(&dir);
    }
    let _ = std::fs::remove_dir(&pins.root);
    if let Some(parent) = pins.root.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(counts)
}

/// Swaps `program` into the TCX link pinned at `path`.
fn adopt_link(program: &mut SchedClassifier, path: &std::path::Path) -> Result<(), ProgramError> {
    let fd = PinnedLink::from_pin(path)
        .map(FdLink::from)
        .map_err(|e| ProgramError::IOError(io::Error::other(e)))?;
    let link = SchedClassifierLink::try_from(fd)
        .map_err(|e| ProgramError::IOError(io::Error::other(e)))?;
    program.attach_to_link(link).map(drop)
}

/// Puts `lan_hairpin` into the program array `lan_ingress` tail-calls.
pub fn install_hairpin(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    let program = names::PROGRAM_LAN_HAIRPIN;
    let fd = classifier(ebpf, program)?
        .fd()
        .and_then(|fd| fd.try_clone().map_err(ProgramError::from))
        .map_err(|error| load_error(program, error))?;
    let write_error = |source| DataplaneError::WriteMap {
        map: names::HAIRPIN,
        source: Box::new(source),
    };
    let map = ebpf
        .map_mut(names::HAIRPIN)
        .ok_or(DataplaneError::MissingMap {
            map: names::HAIRPIN,
        })?;
    let mut array = aya::maps::ProgramArray::try_from(map).map_err(write_error)?;
    array.set(0, &fd, 0).map_err(write_error)
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    ebpf.program_mut(program)
        .ok_or(DataplaneError::MissingProgram { program })?
        .try_into()
        .map_err(|source| DataplaneError::WrongProgramType {
            program,
            source: Box::new(source),
        })
}

/// Splits a verifier rejection out of aya's generic load error, so the log is never lost behind
/// a `#[source]` chain that a caller might not print.
fn load_error(program: &'static str, error: ProgramError) -> DataplaneError {
    match error {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => DataplaneError::Verifier {
            program,
            log: verifier_log.to_string(),
            source: io_error,
        },
        source => DataplaneError::Load {
            program,
            source: Box::new(source),
        },
    }
}
