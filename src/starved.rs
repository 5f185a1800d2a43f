//! Running out of descriptors: a connection whose command cannot start
//! yet (EMFILE, ENFILE) waits for another connection to end, and the
//! episode is logged once.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::record::Stats;

/// Out of descriptors, a connection whose command cannot start yet waits
/// for another connection to end (its descriptors back) instead of being
/// closed; the accept loop meanwhile meets EMFILE itself and pauses, so
/// new clients wait in the backlog. Logged once per episode.
#[derive(Debug, Default)]
pub struct Starved {
    /// A connection ended: its descriptors are back.
    freed: tokio::sync::Notify,
    waiting: AtomicUsize,
    /// Connections that waited in this episode.
    waited: AtomicU64,
}

impl Starved {
    /// Waits for a connection to end. The only connection (nothing will
    /// end) does not wait: None.
    pub async fn wait(&self, stats: &Stats) -> Option<()> {
        // Registered before the look, so an end between the two is not missed.
        let freed = self.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        if stats.active.load(Ordering::Relaxed) <= 1 {
            return None;
        }
        self.waited.fetch_add(1, Ordering::Relaxed);
        if self.waiting.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                "out of descriptors (RLIMIT_NOFILE): commands wait for running connections to \
                 end, and new clients in the backlog; logged once until it is over"
            );
        }
        let _waiting = Waiting(self);
        freed.await;
        Some(())
    }

    /// A connection's descriptors are back.
    pub fn freed(&self) {
        self.freed.notify_waiters();
    }
}

/// One connection waiting; the episode ends with the last.
struct Waiting<'a>(&'a Starved);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.0.waiting.fetch_sub(1, Ordering::Relaxed) == 1 {
            let waited = self.0.waited.swap(0, Ordering::Relaxed);
            tracing::info!(
                waited,
                "descriptors are back: {waited} connection(s) waited for them"
            );
        }
    }
}
