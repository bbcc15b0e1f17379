//! Where the proxy refuses to go: the gateway itself, loopback, link-local and other addresses
//! that are not the internet (always), and the office's own networks (unless `proxy.allow`
//! opens them). Checked on the exact address after name resolution, so a name that resolves to
//! 127.0.0.1 or a LAN host (DNS rebinding) is caught like a literal one.

use ipnet::Ipv4Net;
use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Mutex,
    time::{Duration, Instant},
};

/// How long the list of the gateway's own addresses is reused; addresses change rarely and a
/// request must not cost a netlink dump.
const LOCAL_CACHE: Duration = Duration::from_secs(2);

/// Why a destination address is refused, if it is.
pub fn forbidden(address: Ipv4Addr, local: &[Ipv4Addr]) -> Option<&'static str> {
    if address.is_loopback() {
        Some("loopback")
    } else if address.is_link_local() {
        Some("link-local")
    } else if address.is_unspecified() || address.octets()[0] == 0 {
        Some("unspecified")
    } else if address.is_multicast() || address.is_broadcast() {
        Some("multicast or broadcast")
    } else if local.contains(&address) {
        Some("the gateway's own address")
    } else {
        None
    }
}

/// The refused network holding `address`, unless an `allow` network opens it.
pub fn refused_by(address: Ipv4Addr, refused: &[Ipv4Net], allow: &[Ipv4Net]) -> Option<Ipv4Net> {
    if allow.iter().any(|net| net.contains(&address)) {
        return None;
    }
    refused.iter().find(|net| net.contains(&address)).copied()
}

/// The gateway's own IPv4 addresses, refreshed every [`LOCAL_CACHE`].
#[derive(Debug, Default)]
pub struct LocalAddresses {
    cache: Mutex<Option<(Instant, Vec<Ipv4Addr>)>>,
}

impl LocalAddresses {
    pub fn get(&self) -> Vec<Ipv4Addr> {
        let now = Instant::now();
        if let Ok(cache) = self.cache.lock()
            && let Some((at, addresses)) = cache.as_ref()
            && now.duration_since(*at) < LOCAL_CACHE
        {
            return addresses.clone();
        }
        let addresses: Vec<Ipv4Addr> = nix::ifaddrs::getifaddrs()
            .map(|list| {
                list.filter_map(|interface| {
                    let address = interface.address?;
                    address.as_sockaddr_in().map(|a| a.ip())
                })
                .collect()
            })
            .unwrap_or_default();
        if let Ok(mut cache) = self.cache.lock() {
            *cache = Some((now, addresses.clone()));
        }
        addresses
    }
}

/// The host as an IPv4 literal, if it is one; `[v6]` literals are reported as unsupported.
pub fn literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_the_internet() {
        let local = [Ipv4Addr::new(198, 18, 0, 1)];
        for (address, refused) in [
            ("127.0.0.1", true),
            ("127.9.9.9", true),
            ("169.254.169.254", true),
            ("0.0.0.0", true),
            ("224.0.0.1", true),
            ("255.255.255.255", true),
            ("198.18.0.1", true),
            ("198.18.9.1", false),
            ("8.8.8.8", false),
        ] {
            let address: Ipv4Addr = address.parse().unwrap_or(Ipv4Addr::UNSPECIFIED);
            assert_eq!(forbidden(address, &local).is_some(), refused, "{address}");
        }
        assert!(literal("[::1]").is_some_and(|a| a.is_ipv6()));
    }

    #[test]
    fn office_networks_are_refused_unless_allowed() {
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap_or_default();
        let refused = [net("198.18.0.0/24"), net("198.18.1.0/24")];
        let host = Ipv4Addr::new(198, 18, 0, 12);
        assert_eq!(refused_by(host, &refused, &[]), Some(refused[0]));
        assert_eq!(refused_by(host, &refused, &[net("198.18.0.12/32")]), None);
        assert_eq!(
            refused_by(Ipv4Addr::new(198, 18, 9, 1), &refused, &[]),
            None
        );
        assert!(literal("example.com").is_none());
    }
}
