//! Supervising a connection while its bytes move: what moves them (the relay
//! or, with `transfer = "direct"`, the command itself), and what may end
//! them first (the daemon's stop, `timeout`, `idle_timeout`). Each function
//! here returns the [`End`] that goes in the record.

use std::future::Future;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{shutdown, Shutdown as How};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::command::{Command, Input};
use crate::config::{Service, StdinMode, Transfer};
use crate::fdio::{self, Class};
use crate::record::{End, Traffic};
use crate::relay::{self, Count, Failed, Mode, Pumped, Side};
use crate::shutdown::{Phase, Watch};
use crate::sys;
use crate::tls::{self, Layer};

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
    /// deadline or `idle_timeout` (no byte moved either way) ends it first.
    pub async fn watch(&self, work: impl Future<Output = End>, traffic: &Traffic) -> End {
        self.supervise(work, idle(self.idle_timeout, traffic)).await
    }

    /// What is left of `timeout`, if the service has one.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
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
            Err(e) => End::client_error(e, "sending the banner"),
        }
    };
    match limits.watch(send, traffic).await {
        End::OutputEnded => Ok(()),
        end => Err(end),
    }
}

/// A relayed transfer: the daemon moves the command's output to the client,
/// and the client's bytes to the command (or to nowhere). Meanwhile, once
/// the command exits, what is left of it is ended.
pub struct Relayed<'a> {
    pub socket: &'a AsyncFd<OwnedFd>,
    pub command: &'a Command,
    pub service: &'a Service,
    pub limits: &'a Limits,
    pub traffic: &'a Traffic,
}

impl Relayed<'_> {
    /// `transfer = "splice"` or `"copy"`: from the command's stdout pipe, and
    /// to its stdin pipe (if any; closed when the client half-closes).
    pub async fn pipes(&self, stdout: &AsyncFd<OwnedFd>, stdin: Option<AsyncFd<OwnedFd>>) -> End {
        let mode = match self.service.transfer {
            Transfer::Splice => Mode::Splice,
            Transfer::Copy | Transfer::Socketpair | Transfer::Direct => Mode::Copy,
        };
        let input = async {
            if let Some(pipe) = stdin {
                match self.pump_input(&pipe, mode).await {
                    // The client half-closed: dropping the pipe closes the command's stdin.
                    Ok(()) => return Ok(()),
                    // The command closed its stdin (EPIPE is the pipe's).
                    Err(f) if commands_end(f) => drop(pipe),
                    Err(f) => return Err(f.errno),
                }
            }
            self.discard_input().await
        };
        self.run(stdout, mode, input).await
    }

    /// `transfer = "socketpair"`: from and to the daemon's end of the
    /// command's socket pair. The client's half-close is passed on as a
    /// half-close of the pair, which the command reads as end-of-file; once
    /// the output has ended, so is the input, as with a pipe that closes.
    pub async fn pair(&self, pair: &AsyncFd<OwnedFd>, stdin: StdinMode) -> End {
        let input = async {
            if stdin == StdinMode::Client {
                match self.pump_input(pair, Mode::Copy).await {
                    Ok(()) => {
                        let _ = shutdown(pair.get_ref().as_raw_fd(), How::Write);
                        return Ok(());
                    }
                    // The command closed its end.
                    Err(f) if commands_end(f) => {}
                    Err(f) => return Err(f.errno),
                }
            }
            self.discard_input().await
        };
        let end = self.run(pair, Mode::Copy, input).await;
        let _ = shutdown(pair.get_ref().as_raw_fd(), How::Write);
        end
    }

    /// The client's bytes to the command, until the client half-closes.
    async fn pump_input(&self, to: &AsyncFd<OwnedFd>, mode: Mode) -> Result<(), Failed> {
        let chunk = self.service.pipe_size;
        let counted = (None, Count::Reads);
        relay::pump(self.socket, to, mode, chunk, counted, |n| {
            self.traffic.received(n)
        })
        .await
        .map(drop)
    }

    /// What the client sends that no command reads: read and dropped, so a
    /// reset is seen at once. Ok when the client half-closes.
    async fn discard_input(&self) -> Result<(), Errno> {
        fdio::discard(self.socket, |n| self.traffic.dropped(n as u64)).await
    }

    /// What `max_bytes` leaves of the output (the banner counts).
    fn bytes_left(&self) -> Option<u64> {
        let sent = self.traffic.bytes_sent();
        self.service.max_bytes.map(|m| m.saturating_sub(sent))
    }

    /// Moves the output from `source` beside `input`, until the output ends
    /// (or a limit, the client, or the stop ends the connection).
    async fn run(
        &self,
        source: &AsyncFd<OwnedFd>,
        mode: Mode,
        input: impl Future<Output = Result<(), Errno>>,
    ) -> End {
        let (service, traffic) = (self.service, self.traffic);
        let max = self.bytes_left();
        let work = async {
            let counted = (max, Count::Writes);
            let out = relay::pump(source, self.socket, mode, service.pipe_size, counted, |n| {
                traffic.sent(n)
            });
            let leftovers = self.command.end_leftovers();
            let abandon = abandon_when_drained(source, service.kill_grace);
            tokio::pin!(out, input, leftovers, abandon);
            let (mut input_open, mut abandoning) = (true, false);
            loop {
                tokio::select! {
                    r = &mut out => break match r {
                        Ok(Pumped::EndOfFile) => End::OutputEnded,
                        Ok(Pumped::Limit) => End::MaxBytes,
                        // The command's side: a socket pair it closed with
                        // input left unread says ECONNRESET, not end-of-file.
                        Err(f) if f.side == Side::Source && fdio::class(f.errno) == Class::Disconnect => End::OutputEnded,
                        Err(f) => End::client_error(f.errno, "relaying output"),
                    },
                    r = &mut input, if input_open => match r {
                        Ok(()) => input_open = false,
                        Err(e) => break End::client_error(e, "reading from the client"),
                    },
                    () = &mut leftovers, if !abandoning => abandoning = true,
                    () = &mut abandon, if abandoning => break End::OutputHeld,
                }
            }
        };
        self.limits.watch(work, traffic).await
    }
}

impl Relayed<'_> {
    /// With TLS: the layer moves the command's output from `output` to the
    /// client itself (encrypting as it reads) and the client's bytes to
    /// `input`; the rest as `Relayed::run`. `self.socket` is the client's.
    pub async fn encrypted(
        &self,
        layer: &mut Layer,
        output: &AsyncFd<OwnedFd>,
        input: Option<Input<'_>>,
    ) -> End {
        let (service, traffic) = (self.service, self.traffic);
        let max = self.bytes_left();
        let work = async {
            let mut input = input;
            let pump = layer.pump(self.socket, output, &mut input, max, Some(traffic));
            let leftovers = self.command.end_leftovers();
            let abandon = abandon_when_drained(output, service.kill_grace);
            tokio::pin!(pump, leftovers, abandon);
            let mut abandoning = false;
            loop {
                tokio::select! {
                    p = &mut pump => break match p {
                        tls::Pumped::OutputEnded => End::OutputEnded,
                        tls::Pumped::Limit => End::MaxBytes,
                        tls::Pumped::ClientGone(e) => End::ClientGone(e),
                        tls::Pumped::Failed(why) => End::Tls(why),
                    },
                    () = &mut leftovers, if !abandoning => abandoning = true,
                    () = &mut abandon, if abandoning => break End::OutputHeld,
                }
            }
        };
        self.limits.watch(work, traffic).await
    }
}

/// Whether an input pump stopped because the command closed its end (EPIPE
/// writing to it; a socket pair also says ECONNRESET), not the client.
fn commands_end(f: Failed) -> bool {
    match f.side {
        Side::Destination => fdio::class(f.errno) == Class::Disconnect,
        // splice: a pipe says EPIPE; the client's socket would say ECONNRESET.
        Side::Either => f.errno == Errno::EPIPE,
        Side::Source => false,
    }
}

/// With a process group, once the command and its group are gone while its
/// output is still open (a process that left the group holds it): resolves
/// when what they wrote has been relayed (the pipe is empty), or after
/// `grace` at most, so such a process cannot keep the connection. Never
/// once no process holds the output: its end-of-file is on the way, however
/// slowly the client takes what is left.
pub async fn abandon_when_drained(stdout: &AsyncFd<OwnedFd>, grace: Duration) {
    const LOOK_EVERY: Duration = Duration::from_millis(20);
    let deadline = Instant::now() + grace;
    loop {
        tokio::time::sleep(LOOK_EVERY).await;
        let fd = stdout.get_ref().as_fd();
        if fdio::hung_up(fd) {
            return std::future::pending().await;
        }
        if sys::readable_bytes(fd).is_ok_and(|n| n == 0) || Instant::now() >= deadline {
            return;
        }
    }
}

/// `transfer = "direct"`: the socket itself is the command's stdin and
/// stdout, as with inetd. The daemon keeps a copy only to see a reset (it
/// never reads it while the command runs) and waits for the command to exit.
/// `layered`: behind a TLS layer the socket is the layer's pair, and the
/// layer counts the traffic, which then says when the connection is idle.
pub async fn direct(
    socket: &AsyncFd<OwnedFd>,
    command: &Command,
    limits: &Limits,
    started: Instant,
    layered: Option<&Traffic>,
) -> End {
    let work = async {
        tokio::select! {
            () = command.exited() => End::CommandExited,
            _ = socket.ready(Interest::ERROR) => End::gone(fdio::socket_error(socket.get_ref())),
        }
    };
    match layered {
        Some(traffic) => limits.watch(work, traffic).await,
        None => {
            let idle = idle_direct(limits.idle_timeout, socket.get_ref(), started);
            limits.supervise(work, idle).await
        }
    }
}
