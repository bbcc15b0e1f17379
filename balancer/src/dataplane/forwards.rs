//! `FORWARDED_UDP_PORTS`: the UDP ports the host's firewall forwards, the only ones whose
//! unsolicited datagrams the uplink programs record as inbound connections.

use std::collections::BTreeSet;

use aya::maps::HashMap;
use balancer_common::maps as names;

use super::{
    Dataplane, DataplaneError,
    maps::{typed, write_error},
};

impl Dataplane {
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
}
