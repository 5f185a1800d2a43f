//! Supervising a connection while its bytes move: the one loop that runs the
//! client's pump beside everything else that may end the connection first:
//! the daemon's stop, `timeout`, `idle_timeout`, the transport failing on
//! its own (a TLS layer that lost the client), and the command's side (its
//! output held open by a process that left, or, with `transfer = "direct"`,
//! its exit). Each returns the [`End`] that goes in the record.

use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::end::End;
use crate::record::Traffic;
use crate::shutdown::{Phase, Watch};
use crate::sys;

/// What bounds a connection in time, whatever moves its bytes: the stop,
/// `timeout` and `idle_timeout`.
pub struct Bounds {
    shutdown: Watch,
    /// When `timeout` runs out, if the service has one.
    deadline: Option<Instant>,
    idle_timeout: Option<Duration>,
}

/// What tells that a connection is idle.
#[derive(Clone, Copy)]
pub enum Idle<'a> {
    /// The bytes the daemon moved, counted as they moved.
    Traffic(&'a Traffic),
    /// The kernel's record of the client's TCP socket (TCP_INFO), where the
    /// bytes never pass through the daemon (`transfer = "direct"`). Unix
    /// sockets keep no such record: there `idle_timeout` does not apply.
    Kernel {
        socket: &'a OwnedFd,
        started: Instant,
    },
}

impl Bounds {
    pub fn new(
        timeout: Option<Duration>,
        idle_timeout: Option<Duration>,
        started: Instant,
        shutdown: &Watch,
    ) -> Bounds {
        Bounds {
            shutdown: shutdown.clone(),
            deadline: timeout.map(|t| started + t),
            idle_timeout,
        }
    }

    /// What is left of `timeout`, if the service has one.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// The most a step before the transfer (a handshake) may take: `limit`,
    /// or what is left of `timeout` if that is less.
    pub fn within(&self, limit: Duration) -> Duration {
        self.remaining().map_or(limit, |left| left.min(limit))
    }

    /// Runs `work` (a banner, say) until it is done, or until a bound ends
    /// the connection first.
    pub async fn watch<T>(
        &self,
        work: impl Future<Output = Result<T, End>>,
        idle: Idle<'_>,
    ) -> Result<T, End> {
        self.bound(work, idle).await.and_then(|done| done)
    }

    /// `work`'s result, or the End of the bound that came first.
    async fn bound<T>(&self, work: impl Future<Output = T>, idle: Idle<'_>) -> Result<T, End> {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            done = work => Ok(done),
            () = shutdown.reached(Phase::Forced) => Err(End::Shutdown),
            end = self.runs_out(idle) => Err(end),
        }
    }

    /// Resolves when `timeout` or `idle_timeout` runs out, with its End;
    /// never without either. One timer for both, set to whichever is due
    /// first (a connection's future is held for its whole life: one timer
    /// fewer is memory saved on each of a thousand idle streams).
    async fn runs_out(&self, idle: Idle<'_>) -> End {
        loop {
            let now = Instant::now();
            if self.deadline.is_some_and(|at| now >= at) {
                return End::Timeout;
            }
            let idle_at = match (self.idle_timeout, quiet(idle)) {
                (Some(limit), Some(quiet)) if quiet >= limit => return End::IdleTimeout,
                (Some(limit), Some(quiet)) => Some(now + (limit - quiet)),
                _ => None,
            };
            match self.deadline.into_iter().chain(idle_at).min() {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => return std::future::pending().await,
            }
        }
    }
}

/// The one supervise loop: `pump` moves the bytes until the transfer ends;
/// `lost` resolves if the transport fails on its own; `command` when the
/// command's side ends the connection. Whichever ends first, or a bound,
/// gives the connection's [`End`]; the rest are dropped (each is safe to
/// drop at any point: what was read is written or kept).
pub async fn supervise(
    bounds: &Bounds,
    idle: Idle<'_>,
    pump: impl Future<Output = End>,
    lost: impl Future<Output = End>,
    command: impl Future<Output = End>,
) -> End {
    let work = async {
        tokio::select! {
            end = pump => end,
            end = lost => end,
            end = command => end,
        }
    };
    match bounds.bound(work, idle).await {
        Ok(end) | Err(end) => end,
    }
}

/// How long nothing has moved; None where that is not known (a Unix
/// socket with `transfer = "direct"`): there `idle_timeout` does not apply.
fn quiet(idle: Idle<'_>) -> Option<Duration> {
    match idle {
        Idle::Traffic(traffic) => Some(traffic.last_activity().elapsed()),
        Idle::Kernel { socket, started } => {
            sys::tcp_quiet(socket.as_fd()).map(|quiet| quiet.min(started.elapsed()))
        }
    }
}
