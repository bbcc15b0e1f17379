//! The ports the gateway holds (`host_ports`), as the programs need them: `RESERVED_PORTS`,
//! the ports within the NAT range that are never a translated port, and `FORWARDED_UDP_PORTS`,
//! the UDP ports the host's firewall forwards, the only ones whose unsolicited datagrams the
//! uplink programs record as inbound connections.

use std::{collections::BTreeSet, net::Ipv4Addr};

use aya::maps::HashMap;
use balancer_common::{flow::ReservedPortKey, maps as names};

use super::{
    Dataplane, DataplaneError,
    maps::{typed, write_error},
};
use crate::{config::Config, host_ports::HostPorts, uplink::UplinkState};

impl Dataplane {
    /// Writes what `ports` means for the programs under `config`, the uplinks' addresses
    /// taken from `states`.
    pub fn write_host_ports(
        &mut self,
        ports: &HostPorts,
        config: &Config,
        states: &[UplinkState],
    ) -> Result<(), DataplaneError> {
        self.write_forwarded_udp_ports(&ports.forwards.udp)?;
        let uplink_addrs: Vec<Ipv4Addr> = states.iter().filter_map(|s| s.source).collect();
        let data = &config.dataplane;
        self.write_reserved_ports(&ports.reserved(
            &uplink_addrs,
            data.nat_port_min,
            data.nat_port_max,
        ))
    }

    /// Makes `FORWARDED_UDP_PORTS` hold exactly `ports` (host order): stale ports go first, so
    /// a forward that was removed stops recording at once.
    pub fn write_forwarded_udp_ports(
        &mut self,
        ports: &BTreeSet<u16>,
    ) -> Result<(), DataplaneError> {
        if self.forwarded_udp_written.as_ref() == Some(ports) {
            return Ok(());
        }
        let mut map: HashMap<_, u16, u8> = typed(&mut self.ebpf, names::FORWARDED_UDP_PORTS)?;
        let present: Vec<u16> = map.keys().filter_map(Result::ok).collect();
        for key in present {
            if !ports.contains(&u16::from_be(key)) {
                map.remove(&key)
                    .map_err(write_error(names::FORWARDED_UDP_PORTS))?;
            }
        }
        for port in ports {
            map.insert(port.to_be(), 1, 0)
                .map_err(write_error(names::FORWARDED_UDP_PORTS))?;
        }
        self.forwarded_udp_written = Some(ports.clone());
        Ok(())
    }

    /// Makes `RESERVED_PORTS` hold exactly `reserved` ((protocol, port), host order). New
    /// flows avoid them at once; flows already holding one keep it until they end.
    pub fn write_reserved_ports(
        &mut self,
        reserved: &BTreeSet<(u8, u16)>,
    ) -> Result<(), DataplaneError> {
        if self.reserved_written.as_ref() == Some(reserved) {
            return Ok(());
        }
        let key = |(protocol, port): (u8, u16)| ReservedPortKey {
            port: port.to_be(),
            protocol,
            _pad: 0,
        };
        let mut map: HashMap<_, ReservedPortKey, u8> =
            typed(&mut self.ebpf, names::RESERVED_PORTS)?;
        let present: Vec<ReservedPortKey> = map.keys().filter_map(Result::ok).collect();
        for old in present {
            if !reserved.contains(&(old.protocol, u16::from_be(old.port))) {
                map.remove(&old)
                    .map_err(write_error(names::RESERVED_PORTS))?;
            }
        }
        for entry in reserved {
            map.insert(key(*entry), 1, 0)
                .map_err(write_error(names::RESERVED_PORTS))?;
        }
        self.reserved_written = Some(reserved.clone());
        Ok(())
    }
}
