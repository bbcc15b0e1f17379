//! Answers kept by TTL, per uplink: a name asked out of one uplink is answered again from
//! memory until its TTL runs out, never for another uplink (whose resolvers may answer
//! differently: CDNs answer by the asking address). Only positive answers are kept.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Entries kept at most; when full, expired ones go, and if none had expired, all go (a flood
/// of unique names must not grow memory).
const MAX_ENTRIES: usize = 16_384;
/// The longest an answer is kept, whatever its TTL says.
const MAX_TTL: Duration = Duration::from_secs(3600);

/// (uplink id, lower-case name).
type Key = (u32, String);
/// The addresses and when they expire.
type Answer = (Vec<Ipv4Addr>, Instant);

#[derive(Debug, Default)]
pub struct DnsCache {
    entries: Mutex<HashMap<Key, Answer>>,
}

impl DnsCache {
    /// The addresses of `name` for uplink `uplink`, if a live answer is kept.
    pub fn get(&self, uplink: u32, name: &str, now: Instant) -> Option<Vec<Ipv4Addr>> {
        let entries = self.entries.lock().ok()?;
        let (addresses, expires) = entries.get(&(uplink, name.to_ascii_lowercase()))?;
        (now < *expires).then(|| addresses.clone())
    }

    /// Keeps an answer for `ttl` (a TTL of zero is not kept).
    pub fn put(
        &self,
        uplink: u32,
        name: &str,
        addresses: &[Ipv4Addr],
        ttl: Duration,
        now: Instant,
    ) {
        if ttl.is_zero() || addresses.is_empty() {
            return;
        }
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (_, expires)| now < *expires);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(
            (uplink, name.to_ascii_lowercase()),
            (addresses.to_vec(), now + ttl.min(MAX_TTL)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_last_their_ttl_and_stay_with_their_uplink() {
        let cache = DnsCache::default();
        let now = Instant::now();
        let address = [Ipv4Addr::new(198, 18, 9, 1)];
        cache.put(1, "WWW.lab.example", &address, Duration::from_secs(30), now);
        assert_eq!(cache.get(1, "www.lab.example", now), Some(address.to_vec()));
        assert_eq!(cache.get(2, "www.lab.example", now), None, "per uplink");
        assert_eq!(
            cache.get(1, "www.lab.example", now + Duration::from_secs(30)),
            None,
            "expired"
        );
        cache.put(1, "zero.lab.example", &address, Duration::ZERO, now);
        assert_eq!(cache.get(1, "zero.lab.example", now), None);
    }
}
