//! Places for a listener's connections, in all and per source (an IPv4 address, or an IPv6 /64),
//! so that one source cannot take every place. No I/O: a [`Place`] gives itself back when dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// A listener's places; clones share them.
#[derive(Debug, Clone)]
pub struct Places(Arc<Mutex<Counts>>);

#[derive(Debug)]
struct Counts {
    max: usize,
    max_per_source: usize,
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Why there was no place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Full {
    /// Every place is taken.
    All { held: usize },
    /// The source holds all it may.
    Source { held: usize, source: String },
}

impl Full {
    /// "N connections [from SOURCE] `what`", for the log.
    pub fn describe(&self, what: &str) -> String {
        match self {
            Full::All { held } => format!("{held} connections {what}"),
            Full::Source { held, source } => format!("{held} connections from {source} {what}"),
        }
    }
}

impl Places {
    pub fn new(max: usize, max_per_source: usize) -> Places {
        Places(Arc::new(Mutex::new(Counts { max, max_per_source, total: 0, by_source: HashMap::new() })))
    }

    /// A place for a connection from `ip`, or why there is none.
    pub fn take(&self, ip: IpAddr) -> Result<Place, Full> {
        let source = source_of(ip);
        let mut c = self.lock();
        if c.total >= c.max {
            return Err(Full::All { held: c.total });
        }
        let max_per_source = c.max_per_source;
        let from = c.by_source.entry(source).or_insert(0);
        if *from >= max_per_source {
            let source = match source {
                IpAddr::V6(_) => format!("{source}/64"),
                IpAddr::V4(_) => source.to_string(),
            };
            return Err(Full::Source { held: *from, source });
        }
        *from += 1;
        c.total += 1;
        Ok(Place { places: self.clone(), source })
    }

    /// Places taken now.
    pub fn held(&self) -> usize {
        self.lock().total
    }

    fn give_back(&self, source: IpAddr) {
        let mut c = self.lock();
        if let Some(from) = c.by_source.get_mut(&source) {
            *from -= 1;
            if *from == 0 {
                c.by_source.remove(&source);
            }
            c.total -= 1;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Every method leaves the counts consistent, so a panic elsewhere cannot leave them half-changed.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection's place, given back when dropped.
#[derive(Debug)]
pub struct Place {
    places: Places,
    source: IpAddr,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.places.give_back(self.source);
    }
}

/// The source a connection is counted against: its IPv4 address (also when it arrives IPv4-mapped
/// on an IPv6 socket), or its IPv6 /64, which one host or site usually holds whole. Also the key to
/// rate-limit what is logged about a source by: one line per address would let a /64 flood the log.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::V6(octets.into())
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn places_are_limited_in_all_and_per_source_and_given_back() {
        let places = Places::new(4, 2);
        let a1 = places.take(ip("10.0.0.1")).unwrap();
        let _a2 = places.take(ip("10.0.0.1")).unwrap();
        assert_eq!(places.take(ip("10.0.0.1")).unwrap_err(), Full::Source { held: 2, source: "10.0.0.1".into() });
        let _b = places.take(ip("10.0.0.2")).unwrap();
        let c = places.take(ip("10.0.0.3")).unwrap();
        assert_eq!(places.take(ip("10.0.0.3")).unwrap_err(), Full::All { held: 4 });
        drop(a1);
        let _c2 = places.take(ip("10.0.0.3")).expect("a place given back is free again");
        drop(c);
        assert_eq!(
            Full::All { held: 4 }.describe("have not authenticated yet"),
            "4 connections have not authenticated yet"
        );
    }

    #[test]
    fn every_place_comes_back() {
        let places = Places::new(10, 10);
        let held: Vec<Place> = (0..10).map(|i| places.take(ip(&format!("10.0.0.{i}"))).unwrap()).collect();
        drop(held);
        let c = places.lock();
        assert_eq!((c.total, c.by_source.len()), (0, 0), "{c:?}");
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_slash_64s() {
        assert_eq!(source_of(ip("10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(source_of(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(source_of(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")), ip("2001:db8:1:2::"));
        let places = Places::new(10, 1);
        let _one = places.take(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(
            places.take(ip("2001:db8:1:2::2")).unwrap_err().describe("are open"),
            "1 connections from 2001:db8:1:2::/64 are open"
        );
        assert!(places.take(ip("2001:db8:1:3::1")).is_ok(), "another /64");
    }
}
