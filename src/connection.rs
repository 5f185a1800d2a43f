//! One connection, from accept to its log record: spawn the command, relay
//! its output (and the client's input), end it, reap it, say what happened.
//!
//! How a connection ends (the `reason` of its record):
//! - `output-ended`: the command's stdout reached end-of-file. What is left is
//!   sent, the socket is shut down for writing and closed; the command gets
//!   `kill_grace` to exit on its own, then its group gets SIGTERM, then SIGKILL.
//! - `client-gone`: the client reset or closed the connection (EPIPE,
//!   ECONNRESET). The command's group gets SIGTERM, then SIGKILL after `kill_grace`.
//! - `shutdown`: the daemon is stopping and `shutdown_timeout` has passed; as
//!   for `client-gone`.
//! - `error`: an unexpected error on the connection; as for `client-gone`.
//! - `command-exited` (`transfer = "direct"`): the command exited; its
//!   leftovers are killed and the socket is shut down and closed.
//! - `spawn-failed`: the command could not be started; the client is closed.
//! - `timeout`, `idle-timeout`: the connection lived longer than `timeout`, or
//!   no byte moved for `idle_timeout`; as for `client-gone`.
//! - `max-bytes`: `max_bytes` of output were sent. The socket is shut down for
//!   writing (the client sees end-of-file) and the command's group gets
//!   SIGTERM at once, then SIGKILL after `kill_grace`.
//!
//! Before any of this, admission (`admit`) may refuse the client: it is then
//! closed without a command, counted in the daemon's `refused` figure, and
//! logged in episodes rather than with a record of its own.
//!
//! In every case, once the command has exited, whatever is left of its process
//! group is killed, and the command is reaped. That includes a background
//! process that still holds the command's stdout: when the command (the
//! group's leader) exits while its output is still being relayed, the rest of
//! its group gets SIGTERM at once and SIGKILL after `kill_grace`, as systemd
//! does to a unit's leftovers; whatever they wrote before still reaches the
//! client.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::socket::{getsockopt, setsockopt, shutdown, sockopt, Shutdown as How};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::child::{self, Child};
use crate::config::{Service, Transfer};
use crate::limit::Slot;
use crate::listen::Family;
use crate::peer::Peer;
use crate::relay::{self, Activity, Meter, Pumped};
use crate::server::Shared;
use crate::shutdown::Phase;
use crate::{os, sys};

/// Longest stderr line logged as one record; longer lines are split.
const MAX_LINE: usize = 4096;

/// An accepted connection, ready to be served.
pub struct Handler {
    pub id: u64,
    pub service: Arc<Service>,
    pub socket: OwnedFd,
    pub family: Family,
    pub peer: Peer,
    pub shared: Arc<Shared>,
    /// Places in the service's and the daemon's limits, freed when this ends.
    pub slots: (Slot, Slot),
}

enum End {
    OutputEnded,
    CommandExited,
    ClientGone(Errno),
    Shutdown,
    Timeout,
    IdleTimeout,
    MaxBytes,
    Error(String),
    SpawnFailed(String),
}

impl End {
    fn reason(&self) -> &'static str {
        match self {
            End::OutputEnded => "output-ended",
            End::CommandExited => "command-exited",
            End::ClientGone(_) => "client-gone",
            End::Shutdown => "shutdown",
            End::Timeout => "timeout",
            End::IdleTimeout => "idle-timeout",
            End::MaxBytes => "max-bytes",
            End::Error(_) => "error",
            End::SpawnFailed(_) => "spawn-failed",
        }
    }
}

/// Errors that mean the client went away, not that something is broken.
fn client_gone(e: Errno) -> bool {
    matches!(
        e,
        Errno::EPIPE
            | Errno::ECONNRESET
            | Errno::ETIMEDOUT
            | Errno::EHOSTUNREACH
            | Errno::ENETUNREACH
    )
}

/// What a connection has moved, and its record.
struct Tally<'a> {
    id: u64,
    service: &'a str,
    peer: String,
    started: Instant,
    sent: AtomicU64,
    received: AtomicU64,
    activity: Activity,
}

impl Tally<'_> {
    /// The connection's one record, with the same fields every time.
    fn record(&self, pid: i32, exit: &str, end: &End) {
        let (id, service, peer) = (self.id, self.service, &self.peer);
        let bytes = self.sent.load(Ordering::Relaxed);
        let bytes_received = self.received.load(Ordering::Relaxed);
        let duration_ms = self.started.elapsed().as_millis() as u64;
        let reason = end.reason();
        let detail = match end {
            End::ClientGone(e) => format!(" ({})", e.desc()),
            End::Error(e) | End::SpawnFailed(e) => format!(" ({e})"),
            _ => String::new(),
        };
        macro_rules! ended {
            ($level:ident) => {
                tracing::$level!(
                    conn = id, service, peer = %peer, pid, bytes, bytes_received, duration_ms, exit, reason,
                    "connection ended: {reason}{detail}, exit {exit}, {bytes} bytes sent in {duration_ms} ms"
                )
            };
        }
        match end {
            End::SpawnFailed(_) => ended!(error),
            End::Error(_) => ended!(warn),
            _ => ended!(info),
        }
    }

    /// At debug level: the one record a connection writes at info is its
    /// end, which keeps the journal's per-service rate limit out of reach of
    /// busy but healthy services for longer.
    fn started(&self, pid: i32) {
        tracing::debug!(conn = self.id, service = self.service, peer = %self.peer, pid, "command started");
    }

    /// Ends a command whose connection cannot be served after all (its
    /// descriptors could not join the event loop), and records why.
    async fn abandon(&self, child: Child, grace: Duration, error: std::io::Error) {
        child.end(Duration::ZERO, grace).await;
        self.record(child.pid(), &reap(child), &End::Error(error.to_string()));
    }

    fn stderr(&self, pid: i32, fd: AsyncFd<OwnedFd>) -> StderrLog<'_> {
        StderrLog {
            fd,
            pending: Vec::new(),
            conn: self.id,
            service: self.service,
            pid,
        }
    }
}

/// What became of a connection, for the daemon's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A command was run (or tried: a spawn failure counts here too).
    Served,
    /// Admission refused the client; no command ran.
    Refused,
}

impl Handler {
    pub async fn run(self) -> Outcome {
        let Handler {
            id,
            service,
            socket,
            family,
            peer,
            shared,
            slots: _slots,
        } = self;
        let started = Instant::now();
        if family == Family::Tcp {
            // Each splice is sent at once; a short line must not wait for Nagle.
            let _ = setsockopt(&socket, sockopt::TcpNoDelay, &true);
        }
        let socket = match sys::register(socket, Interest::READABLE | Interest::WRITABLE) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(conn = id, service = %service.name, peer = %peer, error = %e, "cannot register a connection with the event loop");
                return Outcome::Served;
            }
        };
        // Held until the connection ends: the client's place in max_per_source.
        let (peer, _source) = match shared.admissions.admit(&service, &socket, peer).await {
            Ok(admitted) => admitted,
            Err((peer, _)) => {
                tracing::debug!(conn = id, service = %service.name, peer = %peer, "refused; no command run");
                return Outcome::Refused;
            }
        };
        let tally = Tally {
            id,
            service: &service.name,
            peer: peer.to_string(),
            started,
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            activity: Activity::new(started),
        };
        if let Some(banner) = &service.banner {
            // Bounded like the rest of the connection: by `timeout`,
            // `idle_timeout` (a client that reads nothing) and the stop.
            let mut watch = shared.shutdown.clone();
            let sent = tokio::select! {
                r = send_all(&socket, banner, &tally.activity) => r.map_err(End::ClientGone),
                () = expired(deadline(&service, started)) => Err(End::Timeout),
                () = idle(service.idle_timeout, &tally.activity) => Err(End::IdleTimeout),
                () = watch.reached(Phase::Forced) => Err(End::Shutdown),
            };
            if let Err(end) = sent {
                tally.record(0, "none", &end);
                return Outcome::Served;
            }
            let n = banner.len() as u64;
            tally.sent.fetch_add(n, Ordering::Relaxed);
            shared.stats.bytes_sent.fetch_add(n, Ordering::Relaxed);
        }
        if service.transfer == Transfer::Direct {
            direct(&tally, &service, &shared, socket.into_inner(), &peer).await;
        } else {
            relayed(&tally, &service, &shared, socket, &peer).await;
        }
        Outcome::Served
    }
}

/// When the connection's `timeout` runs out, if it has one.
fn deadline(service: &Service, started: Instant) -> Option<Instant> {
    service.timeout.map(|t| started + t)
}

/// Resolves when the connection's `timeout` has run out; never without one.
async fn expired(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves once no byte has moved for `limit` (never without one).
async fn idle(limit: Option<Duration>, activity: &Activity) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    loop {
        let due = activity.last() + limit;
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

/// Once the command (its group's leader) has exited, ends what is left of
/// the group: SIGTERM now, SIGKILL after `grace`. Never resolves.
async fn end_leftovers(child: &Child, grace: Duration) {
    child.exited().await;
    child.signal_group(Signal::SIGTERM);
    tokio::time::sleep(grace).await;
    child.signal_group(Signal::SIGKILL);
    std::future::pending().await
}

/// Writes all of `bytes` to the socket.
async fn send_all(
    socket: &AsyncFd<OwnedFd>,
    bytes: &[u8],
    activity: &Activity,
) -> Result<(), Errno> {
    let mut done = 0;
    while done < bytes.len() {
        let mut ready = socket
            .writable()
            .await
            .map_err(|e| e.raw_os_error().map_or(Errno::EIO, Errno::from_raw))?;
        match nix::unistd::write(socket.get_ref(), &bytes[done..]) {
            Ok(n) => {
                done += n;
                activity.touch();
            }
            Err(Errno::EAGAIN) => ready.clear_ready(),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `transfer = "splice"` or `"copy"`: the command's stdout is a pipe that the
/// daemon relays to the socket (and the socket to its stdin, if asked).
async fn relayed(
    tally: &Tally<'_>,
    service: &Service,
    shared: &Shared,
    socket: AsyncFd<OwnedFd>,
    peer: &Peer,
) {
    let spawned = match child::spawn(service, &shared.base_env, peer, None) {
        Ok(s) => s,
        Err(e) => return tally.record(0, "none", &End::SpawnFailed(e.to_string())),
    };
    let child = spawned.child;
    let pid = child.pid();
    tally.started(pid);

    let registered = (|| {
        let stdout = spawned
            .stdout
            .ok_or_else(|| std::io::Error::other("no stdout pipe"))?;
        Ok::<_, std::io::Error>((
            sys::register(stdout, Interest::READABLE)?,
            sys::register(spawned.stderr, Interest::READABLE)?,
            spawned
                .stdin
                .map(|fd| sys::register(fd, Interest::WRITABLE))
                .transpose()?,
        ))
    })();
    let (stdout, stderr, stdin) = match registered {
        Ok(r) => r,
        Err(e) => return tally.abandon(child, service.kill_grace, e).await,
    };
    let mut stderr = tally.stderr(pid, stderr);

    let mut stderr_open = true;
    let end = {
        let meter = Meter {
            connection: &tally.sent,
            daemon: &shared.stats.bytes_sent,
            activity: &tally.activity,
            max: service
                .max_bytes
                .map(|m| m.saturating_sub(tally.sent.load(Ordering::Relaxed))),
        };
        let out = relay::pump(&stdout, &socket, service.transfer, service.pipe_size, meter);
        let input = feed_input(&socket, stdin, service, tally, &shared.stats.bytes_received);
        let mut watch = shared.shutdown.clone();
        let forced = watch.reached(Phase::Forced);
        let stderr_run = stderr.run();
        let expired = expired(deadline(service, tally.started));
        let idle = idle(service.idle_timeout, &tally.activity);
        let leftovers = end_leftovers(&child, service.kill_grace);
        tokio::pin!(out, input, forced, stderr_run, expired, idle, leftovers);
        let mut input_open = true;
        loop {
            tokio::select! {
                r = &mut out => break match r {
                    Ok(Pumped::EndOfFile) => End::OutputEnded,
                    Ok(Pumped::Limit) => End::MaxBytes,
                    Err(e) if client_gone(e) => End::ClientGone(e),
                    Err(e) => End::Error(format!("relaying output: {}", e.desc())),
                },
                r = &mut input, if input_open => match r {
                    Ok(()) => input_open = false,
                    Err(e) if client_gone(e) => break End::ClientGone(e),
                    Err(e) => break End::Error(format!("reading from the client: {}", e.desc())),
                },
                () = &mut stderr_run, if stderr_open => stderr_open = false,
                () = &mut forced => break End::Shutdown,
                () = &mut expired => break End::Timeout,
                () = &mut idle => break End::IdleTimeout,
                () = &mut leftovers => {}
            }
        }
    };

    // After the output: shut down our sending side, so the client sees
    // end-of-file once everything queued has arrived, and linger. Meanwhile
    // the command gets kill_grace to exit on its own. Any other end: close
    // now and end the command's group.
    let (wait, lingering) = match end {
        End::OutputEnded | End::MaxBytes => {
            let _ = shutdown(socket.get_ref().as_raw_fd(), How::Write);
            let wait = if matches!(end, End::MaxBytes) {
                Duration::ZERO
            } else {
                service.kill_grace
            };
            (wait, Some(socket))
        }
        _ => {
            drop(socket);
            (Duration::ZERO, None)
        }
    };
    let linger = async {
        if let Some(s) = &lingering {
            linger_on(s, service.kill_grace, &tally.received).await;
        }
    };
    finish(
        &child,
        wait,
        service.kill_grace,
        linger,
        &mut stderr,
        stderr_open,
    )
    .await;
    drop(lingering);
    stderr.flush_now();
    // The record comes last: by then every descriptor of the connection is
    // closed (stdin went with the input future) and the command reaped.
    drop((stderr, stdout));
    tally.record(pid, &reap(child), &end);
}

/// `transfer = "direct"`: the socket itself is the command's stdin and
/// stdout, as with inetd. The daemon keeps a copy only to see a reset (it
/// never reads it while the command runs), ends the command's group as on
/// any other path, and counts the bytes from TCP_INFO at the end.
async fn direct(
    tally: &Tally<'_>,
    service: &Service,
    shared: &Shared,
    socket: OwnedFd,
    peer: &Peer,
) {
    // Programs expect blocking stdin and stdout. The flag belongs to the open
    // file description, shared with our copy, which is only polled.
    if let Err(e) = os::set_nonblocking(&socket, false) {
        return tally.record(0, "none", &End::Error(e.to_string()));
    }
    let spawned = match child::spawn(service, &shared.base_env, peer, Some(&socket)) {
        Ok(s) => s,
        Err(e) => return tally.record(0, "none", &End::SpawnFailed(e.to_string())),
    };
    let child = spawned.child;
    let pid = child.pid();
    tally.started(pid);
    let registered = sys::register(spawned.stderr, Interest::READABLE)
        .and_then(|err| Ok((err, sys::register(socket, Interest::ERROR)?)));
    let (stderr, socket) = match registered {
        Ok(r) => r,
        Err(e) => return tally.abandon(child, service.kill_grace, e).await,
    };
    let mut stderr = tally.stderr(pid, stderr);

    let mut stderr_open = true;
    let end = {
        let mut watch = shared.shutdown.clone();
        let forced = watch.reached(Phase::Forced);
        let exited = child.exited();
        let reset = socket.ready(Interest::ERROR);
        let stderr_run = stderr.run();
        let expired = expired(deadline(service, tally.started));
        let idle = idle_direct(service.idle_timeout, socket.get_ref(), tally.started);
        tokio::pin!(forced, exited, reset, stderr_run, expired, idle);
        loop {
            tokio::select! {
                () = &mut exited => break End::CommandExited,
                _ = &mut reset => break End::ClientGone(socket_error(socket.get_ref())),
                () = &mut stderr_run, if stderr_open => stderr_open = false,
                () = &mut forced => break End::Shutdown,
                () = &mut expired => break End::Timeout,
                () = &mut idle => break End::IdleTimeout,
            }
        }
    };
    finish(
        &child,
        Duration::ZERO,
        service.kill_grace,
        async {},
        &mut stderr,
        stderr_open,
    )
    .await;
    let exit = reap(child);
    // The command and its group are gone; the socket is ours alone now.
    let mut orderly = false;
    if matches!(end, End::CommandExited) && os::set_nonblocking(socket.get_ref(), true).is_ok() {
        let _ = shutdown(socket.get_ref().as_raw_fd(), How::Write);
        orderly = linger_on(&socket, service.kill_grace, &AtomicU64::new(0)).await;
    }
    // Counted last, when the client has acknowledged all it got. After an
    // orderly close both FINs count in the sequence numbers: take them out.
    if let Some((acked, received)) = sys::tcp_bytes(socket.get_ref().as_fd()) {
        let fin = u64::from(orderly);
        let (sent, received) = (acked.saturating_sub(fin), received.saturating_sub(fin));
        // The banner, if any, is in TCP_INFO's count and already in the daemon's.
        let banner = tally.sent.swap(sent, Ordering::Relaxed);
        tally.received.store(received, Ordering::Relaxed);
        shared
            .stats
            .bytes_sent
            .fetch_add(sent.saturating_sub(banner), Ordering::Relaxed);
        shared
            .stats
            .bytes_received
            .fetch_add(received, Ordering::Relaxed);
    }
    drop(socket);
    stderr.flush_now();
    drop(stderr);
    tally.record(pid, &exit, &end);
}

/// Waits for the command to end (`Child::end`) and for `also`, reading the
/// command's stderr meanwhile: a command blocked on a full stderr pipe could
/// not exit on its own.
async fn finish(
    child: &Child,
    wait: Duration,
    grace: Duration,
    also: impl std::future::Future<Output = ()>,
    stderr: &mut StderrLog<'_>,
    mut stderr_open: bool,
) {
    let both = async { tokio::join!(child.end(wait, grace), also) };
    tokio::pin!(both);
    loop {
        tokio::select! {
            _ = &mut both => return,
            () = stderr.run(), if stderr_open => stderr_open = false,
        }
    }
}

/// After shutting down our side, reads until the client closes too (for at
/// most `limit`). Closing with unread input would send a reset, which can
/// destroy output still in flight to the client. True when the client closed.
async fn linger_on(socket: &AsyncFd<OwnedFd>, limit: Duration, counted: &AtomicU64) -> bool {
    matches!(
        tokio::time::timeout(limit, relay::discard(socket, counted)).await,
        Ok(Ok(()))
    )
}

/// The pending error of a socket (SO_ERROR), for the record.
fn socket_error(fd: &OwnedFd) -> Errno {
    match getsockopt(fd, sockopt::SocketError) {
        Ok(code) if code != 0 => Errno::from_raw(code),
        _ => Errno::ECONNRESET,
    }
}

/// The client's bytes to the command's stdin (or, without one, to nowhere),
/// until the client half-closes. Ok means the client finished sending.
async fn feed_input(
    socket: &AsyncFd<OwnedFd>,
    stdin: Option<AsyncFd<OwnedFd>>,
    service: &Service,
    tally: &Tally<'_>,
    daemon_received: &AtomicU64,
) -> Result<(), Errno> {
    if let Some(pipe) = stdin {
        let meter = Meter {
            connection: &tally.received,
            daemon: daemon_received,
            activity: &tally.activity,
            max: None,
        };
        match relay::pump(socket, &pipe, service.transfer, service.pipe_size, meter).await {
            // The client half-closed: dropping the pipe closes the command's stdin.
            Ok(_) => return Ok(()),
            // The command closed its stdin; what the client still sends is dropped.
            Err(Errno::EPIPE) => drop(pipe),
            Err(e) => return Err(e),
        }
    }
    relay::discard(socket, &tally.received).await
}

fn reap(child: Child) -> String {
    match child.reap() {
        Ok(exit) => exit.to_string(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot reap a command");
            "unknown".into()
        }
    }
}

/// The command's stderr, logged line by line with the connection's fields.
struct StderrLog<'a> {
    fd: AsyncFd<OwnedFd>,
    pending: Vec<u8>,
    conn: u64,
    service: &'a str,
    pid: i32,
}

impl StderrLog<'_> {
    /// Logs lines until the command (and everything sharing its stderr) closes it.
    async fn run(&mut self) {
        loop {
            let Ok(mut ready) = self.fd.readable().await else {
                return;
            };
            let outcome = read_lines(self.fd.get_ref(), &mut self.pending, &mut |l| {
                emit(self.conn, self.service, self.pid, l)
            });
            match outcome {
                Ok(true) => {}
                Err(Errno::EAGAIN) => ready.clear_ready(),
                Ok(false) | Err(_) => return self.emit_rest(),
            }
        }
    }

    /// Logs what is already written, without waiting for more.
    /// Bounded: a process outside the command's group may still be writing.
    fn flush_now(&mut self) {
        let (conn, service, pid) = (self.conn, self.service, self.pid);
        for _ in 0..16 {
            let more = read_lines(self.fd.get_ref(), &mut self.pending, &mut |l| {
                emit(conn, service, pid, l)
            });
            if more != Ok(true) {
                break;
            }
        }
        self.emit_rest();
    }

    fn emit_rest(&mut self) {
        if !self.pending.is_empty() {
            emit(
                self.conn,
                self.service,
                self.pid,
                &std::mem::take(&mut self.pending),
            );
        }
    }
}

/// Reads once from `fd` and hands each complete line (or each `MAX_LINE`
/// bytes of an overlong one) to `emit`; `Ok(false)` at end-of-file.
fn read_lines(
    fd: &OwnedFd,
    pending: &mut Vec<u8>,
    emit: &mut dyn FnMut(&[u8]),
) -> Result<bool, Errno> {
    let mut buf = [0u8; 4096];
    let n = loop {
        match nix::unistd::read(fd, &mut buf) {
            Err(Errno::EINTR) => continue,
            r => break r?,
        }
    };
    if n == 0 {
        return Ok(false);
    }
    pending.extend_from_slice(&buf[..n]);
    while let Some(end) = pending.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = pending.drain(..=end).collect();
        emit(&line[..line.len() - 1]);
    }
    while pending.len() >= MAX_LINE {
        let line: Vec<u8> = pending.drain(..MAX_LINE).collect();
        emit(&line);
    }
    Ok(true)
}

fn emit(conn: u64, service: &str, pid: i32, line: &[u8]) {
    let text = String::from_utf8_lossy(line);
    tracing::info!(
        conn,
        service,
        pid,
        stream = "stderr",
        "{}",
        text.trim_end_matches('\r')
    );
}
