//! Who may connect to a service, and how often: allow and deny ranges, a cap
//! on the connections of one source, and token-bucket rates for the service
//! and for each source.
//!
//! [`Admission`] holds the state of one service behind a mutex that is held
//! only for a few map operations. A source is one IPv4 address, or one IPv6
//! network of `source_prefix_v6` bits, since one IPv6 client usually owns a
//! whole /64. The state stays bounded under a flood from many addresses: a
//! count leaves its map when it drops to zero, and buckets that have refilled
//! to full (which a new bucket would equal) are pruned as the map grows.

use std::collections::hash_map::{Entry, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// An address or CIDR range: "10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::1".
/// IPv4-mapped IPv6 clients (::ffff:a.b.c.d) match IPv4 ranges; IPv6 ranges
/// match only clients that are not IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = unmapped(ip);
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.prefix) == self.network
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let Ok(addr) = addr.parse::<IpAddr>() else {
            return Err(format!(
                "{s:?}: expected an IPv4 or IPv6 address, optionally with /PREFIX"
            ));
        };
        let (max, family) = if addr.is_ipv4() {
            (32, "IPv4")
        } else {
            (128, "IPv6")
        };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(format!("{s:?}: prefix length must be 0-{max} for {family}")),
            },
        };
        let network = mask(addr, prefix);
        let cidr = Cidr { network, prefix };
        if network != addr {
            return Err(format!("{s:?}: host bits set; did you mean \"{cidr}\"?"));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.network, self.prefix) {
            (IpAddr::V4(ip), 32) => write!(f, "{ip}"),
            (IpAddr::V6(ip), 128) => write!(f, "{ip}"),
            (ip, prefix) => write!(f, "{ip}/{prefix}"),
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is; others unchanged.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Keeps the first `prefix` bits of `ip` (all of them when `prefix` is larger).
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let keep = u32::MAX.checked_shl(32u32.saturating_sub(prefix.into()));
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & keep.unwrap_or(0)))
        }
        IpAddr::V6(v6) => {
            let keep = u128::MAX.checked_shl(128u32.saturating_sub(prefix.into()));
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & keep.unwrap_or(0)))
        }
    }
}

/// The key a client is counted under: IPv4 (and IPv4-mapped) addresses whole,
/// IPv6 addresses masked to `v6_prefix` bits.
pub fn source_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match unmapped(ip) {
        v4 @ IpAddr::V4(_) => v4,
        v6 => mask(v6, v6_prefix),
    }
}

/// The rules of one service (built by config.rs from the file).
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
    pub max_per_source: Option<usize>,
    /// Whether loopback clients count in `max_per_source` (false for the
    /// default bound: they are this host's own).
    pub loopback_counted: bool,
    /// IPv6 clients are counted per network of this prefix (default 64); IPv4 per address.
    pub source_prefix_v6: u8,
    /// New connections per second for the service and per source (token
    /// buckets, burst = max(1, rate)).
    pub rate: Option<f64>,
    pub rate_per_source: Option<f64>,
}

impl Default for Rules {
    /// Everyone admitted, no limits, IPv6 sources per /64.
    fn default() -> Rules {
        Rules {
            allow: Vec::new(),
            deny: Vec::new(),
            max_per_source: None,
            loopback_counted: true,
            source_prefix_v6: 64,
            rate: None,
            rate_per_source: None,
        }
    }
}

/// Why a client was refused; `reason()` gives the record's word: "denied",
/// "max-per-source", "rate", "rate-per-source".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Denied,
    PerSource { max: usize },
    Rate,
    RatePerSource,
}

impl Refusal {
    /// The one word for the connection's log record.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Denied => "denied",
            Refusal::PerSource { .. } => "max-per-source",
            Refusal::Rate => "rate",
            Refusal::RatePerSource => "rate-per-source",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Denied => f.write_str("not in allow or in deny"),
            Refusal::PerSource { max } => write!(f, "at max_per_source ({max})"),
            Refusal::Rate => f.write_str("over rate"),
            Refusal::RatePerSource => f.write_str("over rate_per_source"),
        }
    }
}

/// Slack for float rounding: a bucket is taken as holding a token from 1 - EPSILON.
const EPSILON: f64 = 1e-9;

/// A token bucket: `tokens` as of `at`, refilling at the rate given on each use.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: rate.max(1.0),
            at: now,
        }
    }

    fn level(&self, rate: f64, now: Instant) -> f64 {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * rate;
        (self.tokens + refill).min(rate.max(1.0))
    }

    fn take(&mut self, rate: f64, now: Instant) {
        self.tokens = (self.level(rate, now) - 1.0).max(0.0);
        self.at = self.at.max(now);
    }
}

/// The smallest size of the bucket map that triggers a prune of full buckets.
const PRUNE_MIN: usize = 1024;

#[derive(Debug, Default)]
struct State {
    counts: HashMap<IpAddr, usize>,
    buckets: HashMap<IpAddr, Bucket>,
    service: Option<Bucket>,
    /// The bucket map's size after the last prune.
    pruned_to: usize,
}

/// Which of a service's rules a decision applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every rule: a client connected directly.
    All,
    /// The service's own (`rate`): a trusted reverse proxy's connection,
    /// whose client is decided once its request names it.
    Service,
    /// The client's own (`allow`/`deny`, `max_per_source`,
    /// `rate_per_source`): the client a trusted reverse proxy names.
    Source,
}

/// The admission state of one service, shared by its connections.
#[derive(Debug)]
pub struct Admission {
    state: Mutex<State>,
}

/// A client's place in its source's count, given back on drop.
#[derive(Debug)]
pub struct SourceGuard {
    admission: Arc<Admission>,
    key: Option<IpAddr>,
}

impl Admission {
    /// No connections counted, all buckets full.
    pub fn new() -> Arc<Admission> {
        let state = Mutex::default();
        Arc::new(Admission { state })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides for a client at `ip` (None for Unix-socket clients: only `rate`
    /// applies to them). On success the returned guard holds the client's
    /// place in max_per_source until dropped. Checks run in order: deny/allow,
    /// max_per_source, rate_per_source, rate; tokens are taken only from the
    /// buckets of a client that is admitted.
    pub fn admit(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
        rules: &Rules,
        now: Instant,
    ) -> Result<SourceGuard, Refusal> {
        self.admit_in(Scope::All, ip, rules, now)
    }

    /// As [`Admission::admit`], the rules of `scope` only.
    pub fn admit_in(
        self: &Arc<Self>,
        scope: Scope,
        ip: Option<IpAddr>,
        rules: &Rules,
        now: Instant,
    ) -> Result<SourceGuard, Refusal> {
        let ip = ip.filter(|_| scope != Scope::Service);
        if let Some(ip) = ip {
            let denied = rules.deny.iter().any(|c| c.contains(ip));
            if denied || !(rules.allow.is_empty() || rules.allow.iter().any(|c| c.contains(ip))) {
                return Err(Refusal::Denied);
            }
        }
        let key = ip.map(|ip| source_key(ip, rules.source_prefix_v6));
        let mut s = self.state();
        let s = &mut *s;
        let loopback = ip.is_some_and(|ip| unmapped(ip).is_loopback());
        let bounded = key.filter(|_| rules.loopback_counted || !loopback);
        if let (Some(key), Some(max)) = (bounded, rules.max_per_source) {
            if s.counts.get(&key).copied().unwrap_or(0) >= max {
                return Err(Refusal::PerSource { max });
            }
        }
        let per_source = key.zip(rules.rate_per_source);
        if let Some((key, rate)) = per_source {
            let bucket = s.buckets.get(&key).copied();
            if bucket.is_some_and(|b| b.level(rate, now) < 1.0 - EPSILON) {
                return Err(Refusal::RatePerSource);
            }
        } else if rules.rate_per_source.is_none() {
            s.buckets.clear(); // the rate was removed on reload
        }
        if let Some(rate) = rules.rate.filter(|_| scope != Scope::Source) {
            let bucket = s.service.get_or_insert_with(|| Bucket::full(rate, now));
            if bucket.level(rate, now) < 1.0 - EPSILON {
                return Err(Refusal::Rate);
            }
            bucket.take(rate, now);
        } else if rules.rate.is_none() {
            s.service = None;
        }
        if let Some((key, rate)) = per_source {
            let full = Bucket::full(rate, now);
            s.buckets.entry(key).or_insert(full).take(rate, now);
            // Amortised O(1): the map at least doubles between two prunes.
            if s.buckets.len() >= PRUNE_MIN.max(2 * s.pruned_to) {
                s.buckets
                    .retain(|_, b| b.level(rate, now) < full.tokens - EPSILON);
                s.pruned_to = s.buckets.len();
            }
        }
        if let Some(key) = key {
            *s.counts.entry(key).or_insert(0) += 1;
        }
        let admission = Arc::clone(self);
        Ok(SourceGuard { admission, key })
    }

    /// Takes a token of `rate_per_source` from the source of `ip`, if the
    /// rules have one (a wrong login costs as a connection does).
    pub fn spend(&self, ip: IpAddr, rules: &Rules, now: Instant) {
        if let Some(rate) = rules.rate_per_source {
            let key = source_key(ip, rules.source_prefix_v6);
            let mut s = self.state();
            s.buckets
                .entry(key)
                .or_insert_with(|| Bucket::full(rate, now))
                .take(rate, now);
        }
    }

    /// Connections counted now for the source of `ip` (for tests and status).
    pub fn count(&self, ip: IpAddr, rules: &Rules) -> usize {
        let key = source_key(ip, rules.source_prefix_v6);
        self.state().counts.get(&key).copied().unwrap_or(0)
    }

    /// Number of per-source entries held (counts plus buckets), to prove
    /// memory stays bounded.
    pub fn tracked(&self) -> usize {
        let s = self.state();
        s.counts.len() + s.buckets.len()
    }
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        if let Entry::Occupied(mut count) = self.admission.state().counts.entry(key) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests;
