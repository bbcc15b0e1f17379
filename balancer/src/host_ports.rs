//! The ports the gateway holds itself: sockets it listens on (TCP listeners, unconnected UDP
//! sockets) on any address or an uplink's, and the ports the host's nftables DNAT forwards. The
//! data plane never makes one of them a translated port (`RESERVED_PORTS`), so packets from the
//! internet to them always reach the gateway's service or the forward, never a LAN client's
//! flow; only the UDP forwards are where unsolicited datagrams start inbound exchanges
//! (`FORWARDED_UDP_PORTS`). Read on the daemon's 30 s resync and on SIGHUP, not every pass;
//! `check` lists those inside the NAT range.

use std::{collections::BTreeSet, net::Ipv4Addr, path::Path};

use balancer_common::flow::{PROTOCOL_TCP, PROTOCOL_UDP};

use crate::firewall::{self, Forwards};

/// A socket listening on an address the internet can reach through an uplink.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listener {
    /// `PROTOCOL_TCP` or `PROTOCOL_UDP`.
    pub protocol: u8,
    pub port: u16,
    /// `None`: every address (0.0.0.0 or ::).
    pub addr: Option<Ipv4Addr>,
    /// The socket's inode, to find the process that holds it.
    pub inode: u64,
}

/// What the gateway holds: its listeners and the host's forwards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPorts {
    pub listeners: Vec<Listener>,
    pub forwards: Forwards,
}

impl HostPorts {
    /// Every reserved (protocol, port) within `min..=max`: listeners on any address or one of
    /// `uplink_addrs`, and forwards.
    pub fn reserved(&self, uplink_addrs: &[Ipv4Addr], min: u16, max: u16) -> BTreeSet<(u8, u16)> {
        let listening = self
            .listeners
            .iter()
            .filter(|l| l.addr.is_none_or(|addr| uplink_addrs.contains(&addr)))
            .map(|l| (l.protocol, l.port));
        let forwarded = self
            .forwards
            .udp
            .iter()
            .map(|port| (PROTOCOL_UDP, *port))
            .chain(self.forwards.tcp.iter().map(|port| (PROTOCOL_TCP, *port)));
        listening
            .chain(forwarded)
            .filter(|(_, port)| (min..=max).contains(port))
            .collect()
    }
}

/// The listeners in one of `/proc/net/{tcp,udp,tcp6,udp6}` (`text`): TCP in LISTEN, UDP not
/// connected, bound to any address or an IPv4 one (IPv6 sockets: `::` or IPv4-mapped). A line
/// that does not parse is skipped: the kernel's format, not user input, and one odd line must
/// not hide the others.
pub fn parse_proc_net(text: &str, protocol: u8) -> Vec<Listener> {
    text.lines()
        .skip(1)
        .filter_map(|line| parse_line(line, protocol))
        .collect()
}

fn parse_line(line: &str, protocol: u8) -> Option<Listener> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (local, remote, state) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
    let inode = fields.get(9)?.parse().ok()?;
    let listening = match protocol {
        // TCP_LISTEN
        PROTOCOL_TCP => *state == "0A",
        // Unconnected: no remote address or port.
        _ => remote.chars().all(|c| c == '0' || c == ':'),
    };
    if !listening {
        return None;
    }
    let (addr, port) = local.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let addr = match addr.len() {
        8 => Some(word(addr)?),
        32 => {
            // Four words as the kernel prints them; `::` or `::ffff:a.b.c.d`.
            if addr.chars().all(|c| c == '0') {
                None
            } else if addr[..16].chars().all(|c| c == '0') && addr[16..24] == *"FFFF0000" {
                Some(word(&addr[24..])?)
            } else {
                return None;
            }
        }
        _ => return None,
    };
    let addr = addr.filter(|a| !a.is_unspecified());
    Some(Listener {
        protocol,
        port,
        addr,
        inode,
    })
}

/// An IPv4 address as `/proc/net` prints it: the 32-bit word in host byte order, in hex.
fn word(hex: &str) -> Option<Ipv4Addr> {
    let value = u32::from_str_radix(hex, 16).ok()?;
    Some(Ipv4Addr::from(value.to_ne_bytes()))
}

/// The listeners of this network namespace; a table that cannot be read (no IPv6) adds none.
pub fn read_listeners() -> Vec<Listener> {
    let tables = [
        ("tcp", PROTOCOL_TCP),
        ("udp", PROTOCOL_UDP),
        ("tcp6", PROTOCOL_TCP),
        ("udp6", PROTOCOL_UDP),
    ];
    let mut found: Vec<Listener> = tables
        .iter()
        .filter_map(|(name, protocol)| {
            std::fs::read_to_string(Path::new("/proc/net").join(name))
                .ok()
                .map(|text| parse_proc_net(&text, *protocol))
        })
        .flatten()
        .collect();
    found.sort();
    found.dedup();
    found
}

/// The name (`comm`) of a process holding socket `inode`, by its open files in /proc.
pub fn socket_owner(inode: u64) -> Option<String> {
    let wanted = format!("socket:[{inode}]");
    for process in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = process.file_name();
        if !pid.to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == &*wanted)
        });
        if holds {
            let comm = std::fs::read_to_string(process.path().join("comm")).ok()?;
            return Some(comm.trim().to_owned());
        }
    }
    None
}

/// [`HostPorts`], read again after [`HostPortsReader::invalidate`] (the daemon's 30 s resync
/// and SIGHUP) rather than on every reconcile pass, some of which come ten times a second; an
/// unreadable ruleset is logged once, not every time.
#[derive(Debug, Default)]
pub struct HostPortsReader {
    ports: Option<HostPorts>,
    unreadable: bool,
}

impl HostPortsReader {
    /// Makes the next [`HostPortsReader::read`] read again.
    pub fn invalidate(&mut self) {
        self.ports = None;
    }

    /// The gateway's listeners and the host's forwards. An unreadable ruleset counts as no
    /// forwards: then no unsolicited datagram can make a LAN client's own flows to its source
    /// be taken for replies, and only UDP forwards' replies lose their uplink.
    pub fn read(&mut self) -> HostPorts {
        if let Some(ports) = &self.ports {
            return ports.clone();
        }
        let forwards = match firewall::read_forwards() {
            Ok(forwards) => {
                if self.unreadable {
                    tracing::info!("the nftables ruleset is readable again");
                }
                self.unreadable = false;
                forwards
            }
            Err(error) => {
                if !self.unreadable {
                    tracing::warn!(
                        error = %crate::daemon::error_chain(&error),
                        "cannot read the nftables ruleset; no port forward is recorded until it can be"
                    );
                }
                self.unreadable = true;
                Forwards::default()
            }
        };
        let ports = HostPorts {
            listeners: read_listeners(),
            forwards,
        };
        self.ports = Some(ports.clone());
        ports
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0
   1: 0201A8C6:F230 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1002 1 0000000000000000 100 0 0 10 0
   2: 0201A8C6:8000 0109A8C6:2328 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0000000000000000 100 0 0 10 0
   3: garbage
";
    const UDP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  0: 00000000000000000000000000000000:CA6C 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2001 2 0000000000000000 0
  1: 0000000000000000FFFF00000201A8C6:F231 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2002 2 0000000000000000 0
  2: 000080FE000000000000000000000001:F232 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2003 2 0000000000000000 0
  3: 00000000000000000000000000000000:F233 0000000000000000FFFF00000109A8C6:2328 01 00000000:00000000 00:00000000 00000000     0        0 2004 2 0000000000000000 0
";

    #[test]
    fn reads_listeners_on_any_and_ipv4_addresses_only() {
        let uplink: Ipv4Addr = "198.168.1.2".parse().unwrap();
        let tcp = parse_proc_net(TCP, PROTOCOL_TCP);
        // The connected socket (state 01) and the garbage line are not listeners.
        assert_eq!(
            tcp,
            vec![
                Listener {
                    protocol: PROTOCOL_TCP,
                    port: 22,
                    addr: None,
                    inode: 1001
                },
                Listener {
                    protocol: PROTOCOL_TCP,
                    port: 0xF230,
                    addr: Some(uplink),
                    inode: 1002
                },
            ]
        );
        let udp = parse_proc_net(UDP6, PROTOCOL_UDP);
        // `::` and an IPv4-mapped address count; a link-local IPv6 one and a connected socket
        // do not.
        let ports: Vec<(u16, Option<Ipv4Addr>)> = udp.iter().map(|l| (l.port, l.addr)).collect();
        assert_eq!(ports, vec![(51820, None), (0xF231, Some(uplink))]);
    }

    #[test]
    fn reserves_what_falls_in_the_nat_range_on_any_or_an_uplink_address() {
        let uplink: Ipv4Addr = "198.18.1.2".parse().unwrap();
        let lan: Ipv4Addr = "198.18.0.1".parse().unwrap();
        let listener = |protocol, port, addr| Listener {
            protocol,
            port,
            addr,
            inode: 1,
        };
        let ports = HostPorts {
            listeners: vec![
                listener(PROTOCOL_UDP, 51820, None),
                listener(PROTOCOL_TCP, 40000, Some(uplink)),
                listener(PROTOCOL_UDP, 40001, Some(lan)),
                listener(PROTOCOL_TCP, 22, None),
            ],
            forwards: Forwards {
                udp: BTreeSet::from([5060, 40002]),
                tcp: BTreeSet::from([40003]),
            },
        };
        let reserved = ports.reserved(&[uplink], 32768, 65535);
        assert_eq!(
            reserved,
            BTreeSet::from([
                (PROTOCOL_UDP, 51820),
                (PROTOCOL_TCP, 40000),
                (PROTOCOL_UDP, 40002),
                (PROTOCOL_TCP, 40003),
            ])
        );
    }
}
