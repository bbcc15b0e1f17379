//! Shared by `datapath_programs.rs`: the packet builder, the BPF_PROG_TEST_RUN harness and the
//! round-trip checks.
#![allow(dead_code)]

pub mod check;
pub mod harness;
pub mod packet;
