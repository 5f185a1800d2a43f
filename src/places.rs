//! Connection places: a [`Gate`] counts the connections of a service (or of
//! the whole daemon) against `max_connections`, and makes the accept loop
//! wait while it is full; each connection holds a [`Place`].
//!
//! A semaphore would do, but limits change on reload, and a gate whose maximum
//! can shrink below the number already in use is simpler to get right by hand.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// A counted limit on concurrent connections.
#[derive(Debug)]
pub struct Gate {
    state: Mutex<State>,
    freed: Notify,
}

#[derive(Debug)]
struct State {
    active: usize,
    max: usize,
}

/// One place in a [`Gate`], given back on drop.
#[derive(Debug)]
pub struct Place(Arc<Gate>);

impl Gate {
    pub fn new(max: usize) -> Arc<Gate> {
        Arc::new(Gate {
            state: Mutex::new(State { active: 0, max }),
            freed: Notify::new(),
        })
    }

    /// Takes a place if one is free.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Place> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.active < s.max).then(|| {
            s.active += 1;
            Place(Arc::clone(self))
        })
    }

    /// Waits for a free place and takes it.
    pub async fn acquire(self: &Arc<Self>) -> Place {
        loop {
            // Register for the wake-up before looking, so a place freed
            // between the look and the wait is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(slot) = self.try_acquire() {
                return slot;
            }
            freed.await;
        }
    }

    /// Waits until no place is taken.
    pub async fn idle(&self) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.active() == 0 {
                return;
            }
            freed.await;
        }
    }

    pub fn max(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).max
    }

    pub fn active(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).active
    }

    /// Changes the maximum; connections above a lowered one run to their end.
    pub fn set_max(&self, max: usize) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).max = max;
        self.freed.notify_waiters();
    }
}

/// The gates of the services, by name, kept across reloads.
#[derive(Debug, Default)]
pub struct Gates(Mutex<HashMap<String, Arc<Gate>>>);

impl Gates {
    /// The gate of the service `name`, made with `max` places if new.
    pub fn of(&self, name: &str, max: usize) -> Arc<Gate> {
        let mut gates = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            gates
                .entry(name.to_owned())
                .or_insert_with(|| Gate::new(max)),
        )
    }
}

/// A connection's place in its service's `max_connections`. A service whose
/// clients first complete a handshake (TLS, a WebSocket upgrade, a PROXY
/// header) gives them a place in its handshake budget instead, so that slow
/// or idle handshakes cannot take the places of clients already through
/// theirs; the connection's own place is taken once its handshake is done
/// ([`ServicePlace::settle`]).
#[derive(Debug)]
pub enum ServicePlace {
    Held(Place),
    Handshaking { budget: Place, gate: Arc<Gate> },
}

impl ServicePlace {
    /// Takes the connection's place after its handshake, waiting while the
    /// service is full; the place in the handshake budget is given back
    /// once it has it.
    pub async fn settle(&mut self) {
        if let ServicePlace::Handshaking { gate, .. } = self {
            let place = gate.acquire().await;
            *self = ServicePlace::Held(place);
        }
    }

    /// As [`ServicePlace::settle`], without waiting: false if the service
    /// is full (the connection keeps its place in the handshake budget).
    pub fn try_settle(&mut self) -> bool {
        if let ServicePlace::Handshaking { gate, .. } = self {
            let Some(place) = gate.try_acquire() else {
                return false;
            };
            *self = ServicePlace::Held(place);
        }
        true
    }

    /// The place to settle in is `gate`'s: a request on a shared socket
    /// has named its service.
    pub fn reroute(&mut self, to: Arc<Gate>) {
        if let ServicePlace::Handshaking { gate, .. } = self {
            *gate = to;
        }
    }

    /// The service's limit, for a client told it is full.
    pub fn max(&self) -> usize {
        match self {
            ServicePlace::Held(place) => place.0.max(),
            ServicePlace::Handshaking { gate, .. } => gate.max(),
        }
    }
}

/// Handshakes a service may have going at once: four for each of its
/// places, and at least 64.
pub fn handshake_budget(max_connections: usize) -> usize {
    max_connections.saturating_mul(4).max(64)
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .active -= 1;
        self.0.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_until_a_place_frees() {
        let gate = Gate::new(1);
        let first = gate.try_acquire().unwrap();
        assert!(gate.try_acquire().is_none());
        let g = Arc::clone(&gate);
        let waiter = tokio::spawn(async move { g.acquire().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(first);
        let _second = waiter.await.unwrap();
        assert_eq!(gate.active(), 1);
    }

    #[tokio::test]
    async fn lowered_maximum_applies_to_new_connections() {
        let gate = Gate::new(2);
        let a = gate.try_acquire().unwrap();
        let _b = gate.try_acquire().unwrap();
        gate.set_max(1);
        drop(a);
        assert!(gate.try_acquire().is_none(), "one still active, max is 1");
    }
}
