//! Supervising a connection while its bytes move: what moves them (the relay
//! or, with `transfer = "direct"`, the command itself), and what may end
//! them first (the daemon's stop, `timeout`, `idle_timeout`). Each function
//! here returns the [`End`] that goes in the record.

use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::command::Command;
use crate::config::{Service, Transfer};
use crate::fdio::{self, Class};
use crate::record::{End, Traffic};
use crate::relay::{self, Mode, Pumped};
use crate::shutdown::{Phase, Watch};
use crate::sys;

/// What bounds a connection whatever moves its bytes.
pub struct Limits {
    shutdown: Watch,
    /// When `timeout` runs out, if the service has one.
    deadline: Option<Instant>,
    idle_timeout: Option<Duration>,
}

impl Limits {
    pub fn new(service: &Service, started: Instant, shutdown: &Watch) -> Limits {
        Limits {
            shutdown: shutdown.clone(),
            deadline: service.timeout.map(|t| started + t),
            idle_timeout: service.idle_timeout,
        }
    }

    /// Runs `work` until it ends the connection, or until the stop, the
    /// deadline, or `idle` (which resolves once the connection has been idle
    /// for `idle_timeout`) ends it first.
    async fn supervise(
        &self,
        work: impl Future<Output = End>,
        idle: impl Future<Output = ()>,
    ) -> End {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            end = work => end,
            () = shutdown.reached(Phase::Forced) => End::Shutdown,
            () = expired(self.deadline) => End::Timeout,
            () = idle => End::IdleTimeout,
        }
    }
}

/// Resolves when `at` has passed; never without one.
async fn expired(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves once no byte has moved for `limit` (never without one).
async fn idle(limit: Option<Duration>, traffic: &Traffic) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    loop {
        let due = traffic.last_activity() + limit;
        if Instant::now() >= due {
            return;
        }
        tokio::time::sleep_until(due.into()).await;
    }
}

/// The same for `transfer = "direct"`, where the bytes never pass through
/// the daemon: TCP_INFO says when data last went either way. Unix sockets
/// keep no such record, so there `idle_timeout` does not apply.
async fn idle_direct(limit: Option<Duration>, socket: &OwnedFd, started: Instant) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    loop {
        let Some(quiet) = sys::tcp_quiet(socket.as_fd()) else {
            return std::future::pending().await;
        };
        let quiet = quiet.min(started.elapsed());
        if quiet >= limit {
            return;
        }
        tokio::time::sleep(limit - quiet).await;
    }
}

/// What an errno on the client's side means for the record.
fn client_error(e: Errno, doing: &str) -> End {
    match fdio::class(e) {
        Class::Disconnect => End::ClientGone(e),
        _ => End::Error(format!("{doing}: {}", e.desc())),
    }
}

/// Sends the service's banner, bounded like the rest of the connection: by
/// `timeout`, `idle_timeout` (a client that reads nothing) and the stop.
pub async fn banner(
    socket: &AsyncFd<OwnedFd>,
    banner: &[u8],
    limits: &Limits,
    traffic: &Traffic,
) -> Result<(), End> {
    let send = async {
        match fdio::write_all(socket, banner, |n| traffic.sent(n)).await {
            Ok(()) => End::OutputEnded,
            Err(e) => client_error(e, "sending the banner"),
        }
    };
    match limits
        .supervise(send, idle(limits.idle_timeout, traffic))
        .await
    {
        End::OutputEnded => Ok(()),
        end => Err(end),
    }
}

/// `transfer = "splice"` or `"copy"`: the daemon relays the command's stdout
/// pipe to the socket, and the socket to its stdin pipe (or to nowhere).
/// Meanwhile, once the command exits, the rest of its group is ended.
#[allow(clippy::too_many_arguments)]
pub async fn relayed(
    socket: &AsyncFd<OwnedFd>,
    stdout: &AsyncFd<OwnedFd>,
    stdin: Option<AsyncFd<OwnedFd>>,
    command: &Command,
    service: &Service,
    limits: &Limits,
    traffic: &Traffic,
) -> End {
    let mode = match service.transfer {
        Transfer::Copy => Mode::Copy,
        Transfer::Splice | Transfer::Direct => Mode::Splice,
    };
    let max = service
        .max_bytes
        .map(|m| m.saturating_sub(traffic.bytes_sent()));
    let work = async {
        let out = relay::pump(stdout, socket, mode, service.pipe_size, max, |n| {
            traffic.sent(n)
        });
        let input = feed_input(socket, stdin, mode, service.pipe_size, traffic);
        let leftovers = command.end_leftovers();
        let abandon = abandon_when_drained(stdout, service.kill_grace);
        tokio::pin!(out, input, leftovers, abandon);
        let (mut input_open, mut abandoning) = (true, false);
        loop {
            tokio::select! {
                r = &mut out => break match r {
                    Ok(Pumped::EndOfFile) => End::OutputEnded,
                    Ok(Pumped::Limit) => End::MaxBytes,
                    Err(e) => client_error(e, "relaying output"),
                },
                r = &mut input, if input_open => match r {
                    Ok(()) => input_open = false,
                    Err(e) => break client_error(e, "reading from the client"),
                },
                () = &mut leftovers, if !abandoning => abandoning = true,
                () = &mut abandon, if abandoning => break End::OutputHeld,
            }
        }
    };
    limits
        .supervise(work, idle(limits.idle_timeout, traffic))
        .await
}

/// With a process group, once the command and its group are gone while its
/// output is still open (a process that left the group holds it): resolves
/// when what they wrote has been relayed (the pipe is empty), or after
/// `grace` at most, so such a process cannot keep the connection.
async fn abandon_when_drained(stdout: &AsyncFd<OwnedFd>, grace: Duration) {
    const LOOK_EVERY: Duration = Duration::from_millis(20);
    let drained = async {
        loop {
            tokio::time::sleep(LOOK_EVERY).await;
            if sys::readable_bytes(stdout.get_ref().as_fd()).is_ok_and(|n| n == 0) {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(grace, drained).await;
}

/// The client's bytes to the command's stdin (or, without one, to nowhere),
/// until the client half-closes. Ok means the client finished sending.
async fn feed_input(
    socket: &AsyncFd<OwnedFd>,
    stdin: Option<AsyncFd<OwnedFd>>,
    mode: Mode,
    chunk: usize,
    traffic: &Traffic,
) -> Result<(), Errno> {
    if let Some(pipe) = stdin {
        match relay::pump(socket, &pipe, mode, chunk, None, |n| traffic.received(n)).await {
            // The client half-closed: dropping the pipe closes the command's stdin.
            Ok(_) => return Ok(()),
            // EPIPE here is the pipe's: the command closed its stdin. What the
            // client still sends is dropped.
            Err(Errno::EPIPE) => drop(pipe),
            Err(e) => return Err(e),
        }
    }
    fdio::discard(socket, |n| traffic.dropped(n as u64)).await
}

/// `transfer = "direct"`: the socket itself is the command's stdin and
/// stdout, as with inetd. The daemon keeps a copy only to see a reset (it
/// never reads it while the command runs) and waits for the command to exit.
pub async fn direct(
    socket: &AsyncFd<OwnedFd>,
    command: &Command,
    limits: &Limits,
    started: Instant,
) -> End {
    let work = async {
        tokio::select! {
            () = command.exited() => End::CommandExited,
            _ = socket.ready(Interest::ERROR) => End::ClientGone(fdio::socket_error(socket.get_ref())),
        }
    };
    limits
        .supervise(
            work,
            idle_direct(limits.idle_timeout, socket.get_ref(), started),
        )
        .await
}
