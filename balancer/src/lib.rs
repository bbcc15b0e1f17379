//! The balancer: makes an office gateway's uplinks act as one fat pipe.
//!
//! Data flows one way: `config` -> `plan` (a pure diff against observed kernel state) -> `apply`
//! through `netlink` and `sysctl`; the kernel -> `status` -> `cli`. Only `netlink` touches
//! rtnetlink and only `dataplane` touches aya.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod firewall;
pub mod health;
pub mod host_ports;
pub mod netlink;
pub mod office;
pub mod ownership;
pub mod packet;
pub mod plan;
pub mod proxy;
pub mod reconcile;
pub mod routing;
pub mod state;
pub mod stats;
pub mod sysctl;
pub mod systemd;
pub mod teardown;
pub mod uplink;
