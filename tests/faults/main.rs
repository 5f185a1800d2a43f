//! Faults: clients that leave at any point of a stream, commands that
//! misbehave, floods against the limits, descriptor and pipe exhaustion,
//! signals under load, malformed socket-activation variables, a service
//! manager that lags, a command that floods its stderr, and a soak. One
//! module each.
//!
//! Every test prints what it measured (`eprintln!`, shown with `--nocapture`).
//!
//! Tiers:
//! - default (`cargo test`): each test takes seconds;
//! - long (`cargo test --test faults -- --ignored`): 1,000 disconnect points
//!   (`SPLICE_RELAY_FAULT_POINTS` overrides) and a 100,000-connection soak
//!   (`SPLICE_RELAY_SOAK` overrides); `.ci/run` runs it shortened.
//!
//! `SPLICE_RELAY_FAULT_SEED` fixes the seed of the random disconnect points
//! and payloads.

#[path = "../common/mod.rs"]
mod common;

mod activation_env;
mod commands;
mod departed;
mod descriptors;
mod disconnects;
mod flood;
mod notify;
mod pipe_quota;
mod signals;
mod soak;
mod stderr_flood;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// xorshift64: small, seedable, and the same on every machine.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// The seed from `SPLICE_RELAY_FAULT_SEED`, else from the clock.
fn seed() -> u64 {
    match std::env::var("SPLICE_RELAY_FAULT_SEED") {
        Ok(s) => s.parse().expect("SPLICE_RELAY_FAULT_SEED: a number"),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

/// The count in the line that ends an episode of clients that left
/// before their command started ("… N client(s) left before …").
fn left_before_count(line: &str) -> usize {
    line.split(" client(s)")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line}"))
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}
