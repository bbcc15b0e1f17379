//! The namespace lab every feature is shown and tested in, and helpers for the integration tests.
//!
//! - [`lab`]: builds and tears down the fixed lab topology (gateway, clients, ISPs, internet host),
//!   its shaping and its servers, and runs commands inside its namespaces.
//! - [`process`]: time-bounded command execution and child processes killed on drop.
//! - The `labtool` binary (src/bin/labtool/): the lab's servers and clients.

pub mod lab;
pub mod process;

pub use lab::{Lab, LabSpec, RpFilter, labtool_path};
pub use process::ChildGuard;
