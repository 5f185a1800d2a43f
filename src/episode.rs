//! Logging a condition once per episode, not once per event: a flood of
//! refusals, a full limit, an exhausted descriptor table or a lagging service
//! manager would otherwise fill the journal, and hide everything else.
//!
//! Three shapes: an [`Episode`] starts and ends with the condition (the
//! caller logs both edges); a [`Counted`] episode counts its events and ends
//! after a quiet period (the first event and the count are logged); a
//! [`Throttle`] lets a message through at most once per period (for
//! conditions that come and go without a clear end).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A condition that starts and ends; each edge is logged once.
#[derive(Debug, Default)]
pub struct Episode(AtomicBool);

impl Episode {
    pub const fn new() -> Episode {
        Episode(AtomicBool::new(false))
    }

    /// Notes that the condition holds; true when this starts the episode.
    pub fn begin(&self) -> bool {
        !self.0.swap(true, Ordering::Relaxed)
    }

    /// Notes that the condition is over; true when this ends the episode.
    pub fn end(&self) -> bool {
        self.0.swap(false, Ordering::Relaxed)
    }
}

/// Events counted while they keep coming; the episode ends once none has
/// come for a while.
#[derive(Debug, Clone, Copy)]
pub struct Counted {
    started: Instant,
    last: Instant,
    count: u64,
}

impl Counted {
    pub fn new(now: Instant) -> Counted {
        Counted {
            started: now,
            last: now,
            count: 0,
        }
    }

    /// Counts one event; true when it is the episode's first (log it).
    pub fn add(&mut self, now: Instant) -> bool {
        self.count += 1;
        self.last = now;
        self.count == 1
    }

    /// True once no event has come for `quiet`: the episode is over.
    pub fn is_over(&self, now: Instant, quiet: Duration) -> bool {
        now.duration_since(self.last) >= quiet
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// From the first event to the last.
    pub fn span(&self) -> Duration {
        self.last.duration_since(self.started)
    }
}

/// At most one message per period.
#[derive(Debug)]
pub struct Throttle {
    period: Duration,
    origin: Instant,
    /// When a message last went through, in ms since `origin` plus one (0: never).
    last: AtomicU64,
}

impl Throttle {
    pub fn new(period: Duration) -> Throttle {
        Throttle {
            period,
            origin: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// True when a message may go through now (and counts it as sent).
    pub fn ready(&self) -> bool {
        let now = self.origin.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now >= last + self.period.as_millis() as u64;
        due && self
            .last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_episode_reports_each_edge_once() {
        let e = Episode::default();
        assert!(!e.end(), "nothing to end yet");
        assert!(e.begin());
        assert!(!e.begin());
        assert!(e.end());
        assert!(!e.end());
        assert!(e.begin(), "a new episode");
    }

    #[test]
    fn a_counted_episode_ends_after_a_quiet_period() {
        let t0 = Instant::now();
        let mut c = Counted::new(t0);
        assert!(c.add(t0));
        assert!(!c.add(t0 + Duration::from_secs(1)));
        assert_eq!(c.count(), 2);
        assert_eq!(c.span(), Duration::from_secs(1));
        assert!(!c.is_over(t0 + Duration::from_secs(5), Duration::from_secs(5)));
        assert!(c.is_over(t0 + Duration::from_secs(6), Duration::from_secs(5)));
    }

    #[test]
    fn a_throttle_lets_one_message_through_per_period() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert!(t.ready());
        assert!(!t.ready());
        let t = Throttle::new(Duration::ZERO);
        assert!(t.ready() && t.ready());
    }
}
