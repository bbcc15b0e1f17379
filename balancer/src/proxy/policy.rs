//! Which uplink an upstream connection uses: smooth weighted round robin over the usable
//! uplinks, optionally made sticky per client or per (client, site).
//!
//! Pure state, no I/O: the caller passes the usable uplinks and the time, so the choice is
//! unit-tested without a network.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use super::ProxyUplink;
use crate::config::proxy::Policy;

/// Most sticky entries kept; beyond that new clients or sites are balanced without memory
/// rather than growing without bound.
const MAX_STICKY: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum StickyKey {
    Client(IpAddr),
    Site(IpAddr, String),
}

#[derive(Debug)]
struct Entry {
    uplink: u32,
    last_used: Instant,
}

/// The proxy's uplink choice.
#[derive(Debug)]
pub struct Chooser {
    policy: Policy,
    sticky_timeout: Duration,
    /// Smooth WRR state (nginx's algorithm): each uplink's current weight by id.
    current: HashMap<u32, i64>,
    sticky: HashMap<StickyKey, Entry>,
    last_prune: Option<Instant>,
}

impl Chooser {
    pub fn new(policy: Policy, sticky_timeout: Duration) -> Self {
        Chooser {
            policy,
            sticky_timeout,
            current: HashMap::new(),
            sticky: HashMap::new(),
            last_prune: None,
        }
    }

    /// The uplink for a request by `client` to `host`; `None` when no uplink is usable.
    pub fn choose(
        &mut self,
        client: IpAddr,
        host: &str,
        uplinks: &[ProxyUplink],
        now: Instant,
    ) -> Option<u32> {
        let Some(key) = self.key(client, host) else {
            return self.round_robin(uplinks, None);
        };
        self.prune(now);
        if let Some(entry) = self.sticky.get_mut(&key)
            && now.duration_since(entry.last_used) < self.sticky_timeout
            && uplinks.iter().any(|u| u.id == entry.uplink && u.usable)
        {
            entry.last_used = now;
            return Some(entry.uplink);
        }
        // New, expired, or its uplink failed: the entry moves to a freshly balanced uplink.
        let uplink = self.round_robin(uplinks, None)?;
        self.remember(key, uplink, now);
        Some(uplink)
    }

    /// A second uplink to race against `first`, balanced among the others.
    pub fn alternative(&mut self, first: u32, uplinks: &[ProxyUplink]) -> Option<u32> {
        self.round_robin(uplinks, Some(first))
    }

    /// The request's sticky uplink did not connect and `winner` did: the entry moves there.
    pub fn moved(&mut self, client: IpAddr, host: &str, winner: u32, now: Instant) {
        if let Some(key) = self.key(client, host) {
            self.remember(key, winner, now);
        }
    }

    fn key(&self, client: IpAddr, host: &str) -> Option<StickyKey> {
        match self.policy {
            Policy::RoundRobin => None,
            Policy::StickyClient => Some(StickyKey::Client(client)),
            Policy::StickySite => Some(StickyKey::Site(client, site_of(host))),
        }
    }

    fn remember(&mut self, key: StickyKey, uplink: u32, now: Instant) {
        if self.sticky.len() < MAX_STICKY || self.sticky.contains_key(&key) {
            self.sticky.insert(
                key,
                Entry {
                    uplink,
                    last_used: now,
                },
            );
        }
    }

    /// Drops expired entries, at most once a second so a busy proxy does not scan per request.
    fn prune(&mut self, now: Instant) {
        if self
            .last_prune
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(1))
        {
            return;
        }
        self.last_prune = Some(now);
        let timeout = self.sticky_timeout;
        self.sticky
            .retain(|_, e| now.duration_since(e.last_used) < timeout);
    }

    /// Smooth weighted round robin over the usable uplinks other than `except`.
    fn round_robin(&mut self, uplinks: &[ProxyUplink], except: Option<u32>) -> Option<u32> {
        let candidates: Vec<&ProxyUplink> = uplinks
            .iter()
            .filter(|u| u.usable && Some(u.id) != except && u.weight > 0)
            .collect();
        let total: i64 = candidates.iter().map(|u| i64::from(u.weight)).sum();
        let mut best: Option<(u32, i64)> = None;
        for uplink in &candidates {
            let current = self.current.entry(uplink.id).or_insert(0);
            *current += i64::from(uplink.weight);
            if best.is_none_or(|(_, w)| *current > w) {
                best = Some((uplink.id, *current));
            }
        }
        let (id, _) = best?;
        if let Some(current) = self.current.get_mut(&id) {
            *current -= total;
        }
        Some(id)
    }
}

/// The site of a host for sticky-site: its registrable domain by the public suffix list
/// (`www.example.co.uk` -> `example.co.uk`), or the literal address.
pub fn site_of(host: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.parse::<IpAddr>().is_ok() {
        return host;
    }
    psl::domain_str(&host).map_or_else(|| host.clone(), str::to_string)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn uplinks(weights: &[u32]) -> Vec<ProxyUplink> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| ProxyUplink {
                id: i as u32 + 1,
                name: format!("isp{}", i + 1),
                source: Ipv4Addr::new(198, 18, i as u8 + 1, 2),
                weight,
                usable: true,
                dns: Vec::new(),
            })
            .collect()
    }

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11));

    #[test]
    fn round_robin_follows_weights_and_skips_unusable() {
        let mut chooser = Chooser::new(Policy::RoundRobin, Duration::from_secs(60));
        let mut list = uplinks(&[2, 2, 1]);
        let now = Instant::now();
        let mut counts = [0; 3];
        for _ in 0..500 {
            let id = chooser.choose(CLIENT, "a.example", &list, now).unwrap();
            counts[id as usize - 1] += 1;
        }
        assert_eq!(counts, [200, 200, 100]);
        list[0].usable = false;
        for _ in 0..30 {
            assert_ne!(chooser.choose(CLIENT, "x", &list, now), Some(1));
        }
        for u in &mut list {
            u.usable = false;
        }
        assert_eq!(chooser.choose(CLIENT, "x", &list, now), None);
    }

    #[test]
    fn sticky_site_keeps_a_site_until_its_uplink_fails_or_expires() {
        let mut chooser = Chooser::new(Policy::StickySite, Duration::from_secs(60));
        let mut list = uplinks(&[1, 1, 1]);
        let now = Instant::now();
        let first = chooser
            .choose(CLIENT, "www.bank.co.uk", &list, now)
            .unwrap();
        for host in ["login.bank.co.uk", "BANK.co.uk.", "www.bank.co.uk"] {
            assert_eq!(chooser.choose(CLIENT, host, &list, now), Some(first));
        }
        let other = chooser.choose(CLIENT, "198.51.100.7", &list, now).unwrap();
        assert_ne!(other, first, "a new site is balanced");
        list[first as usize - 1].usable = false;
        let moved = chooser
            .choose(CLIENT, "www.bank.co.uk", &list, now)
            .unwrap();
        assert_ne!(moved, first);
        list[first as usize - 1].usable = true;
        assert_eq!(
            chooser.choose(CLIENT, "bank.co.uk", &list, now),
            Some(moved),
            "the entry stays where it moved"
        );
        let later = now + Duration::from_secs(61);
        let _ = chooser.choose(CLIENT, "bank.co.uk", &list, later);
        assert!(chooser.sticky.len() <= 2);
    }

    #[test]
    fn sticky_client_and_alternative() {
        let mut chooser = Chooser::new(Policy::StickyClient, Duration::from_secs(60));
        let list = uplinks(&[1, 1]);
        let now = Instant::now();
        let a = chooser.choose(CLIENT, "a.example", &list, now).unwrap();
        assert_eq!(chooser.choose(CLIENT, "b.example", &list, now), Some(a));
        let alt = chooser.alternative(a, &list).unwrap();
        assert_ne!(alt, a);
        chooser.moved(CLIENT, "c.example", alt, now);
        assert_eq!(chooser.choose(CLIENT, "a.example", &list, now), Some(alt));
    }

    #[test]
    fn sites() {
        assert_eq!(site_of("a.b.lab.example"), "lab.example");
        assert_eq!(site_of("www.example.com"), "example.com");
        assert_eq!(site_of("198.18.9.1"), "198.18.9.1");
    }
}
