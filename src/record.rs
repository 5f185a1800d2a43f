//! Each connection's one record, and the daemon's running figures.
//!
//! A [`Record`] is opened when a connection is accepted and written when it
//! is dropped, whichever way the connection's task ends: closed with its
//! reason and the command's exit, or, on a path that forgot to say (or a
//! panic), as an `error`. So every accepted connection writes exactly one
//! record, with the same fields every time, except a client that admission
//! refused: those are counted and logged in episodes (see `admit`), since a
//! flood would otherwise flood the journal.
//!
//! How a connection ends (the record's `REASON`):
//! - `output-ended`: the command's stdout reached end-of-file; what is left
//!   is sent, the socket shut down for writing and closed.
//! - `oom-killed`: as `output-ended` or `command-exited`, but the command
//!   died of SIGKILL and its cgroup's `memory.events` counts OOM kills: the
//!   OOM killer ended it (only where the cgroup has the memory controller).
//! - `command-exited` (`transfer = "direct"`): the command exited.
//! - `client-gone`: the client reset or closed the connection (EPIPE,
//!   ECONNRESET), before or while it was served.
//! - `timeout`, `idle-timeout`: the connection lived longer than `timeout`,
//!   or nothing moved for `idle_timeout`.
//! - `max-bytes`: `max_bytes` of output were sent, then end-of-file.
//! - `shutdown`: the daemon is stopping and `shutdown_timeout` has passed.
//! - `spawn-failed`: the command could not be started.
//! - `tls-error`: a TLS client broke the record layer (a bad or forged
//!   record, a fatal alert); the detail says how.
//! - `lagging`: a client of a shared command fell more than `max_lag`
//!   behind it, and was disconnected; the command went on for the others.
//! - `error`: anything else; the detail says what.
//!
//! WebSocket services (`protocol = "websocket"`) add:
//! - `client-closed`: the client sent a close frame (its code is in the detail).
//! - `protocol-error`, `invalid-utf8`, `message-too-big`: the client sent an
//!   invalid frame (or a close code no endpoint may send, named in the
//!   detail), text that is not UTF-8, or a message over `max_message_size`;
//!   closed with 1002, 1007 or 1009.
//! - `ping-timeout`: the client did not answer a ping within `ping_interval`.
//! - `page`: a plain GET got the console page; no command ran.
//!
//! and count the messages either way (`messages_sent`, `messages_received`;
//! `none` on raw connections). Their `bytes` are the messages' payloads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cgroup::Usage;
use crate::command::{Ended, Exit};
pub use crate::end::End;
use crate::peer::Peer;

/// The daemon's figures for STATUS= and the logs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections being served now.
    pub active: AtomicU64,
    /// Connections that ended with a record.
    pub served: AtomicU64,
    /// Clients refused by admission (no command ran, no record).
    pub refused: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

/// What a connection has moved, counted as it moves (for the record, the
/// daemon's figures and `idle_timeout`).
#[derive(Debug)]
pub struct Traffic {
    since: Instant,
    sent: AtomicU64,
    received: AtomicU64,
    /// When bytes last moved either way, in ms since `since`.
    last_ms: AtomicU64,
    /// WebSocket messages, each way.
    messages_sent: AtomicU64,
    messages_received: AtomicU64,
    stats: Arc<Stats>,
}

impl Traffic {
    fn new(since: Instant, stats: Arc<Stats>) -> Traffic {
        Traffic {
            since,
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
            messages_sent: AtomicU64::new(0),
            messages_received: AtomicU64::new(0),
            stats,
        }
    }

    /// `n` bytes went to the client.
    pub fn sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        self.stats.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    /// `n` bytes came from the client and went to the command.
    pub fn received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
        self.stats
            .bytes_received
            .fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    /// `n` bytes came from the client and were dropped (the command does not
    /// read them): counted, but not activity.
    pub fn dropped(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Relaxed);
    }

    /// The counts the kernel kept (TCP_INFO) replace the daemon's: with
    /// `transfer = "direct"` the bytes never pass through it.
    pub fn counted_by_kernel(&self, sent: u64, received: u64) {
        let before = self.sent.swap(sent, Ordering::Relaxed);
        let received_before = self.received.swap(received, Ordering::Relaxed);
        let stats = &self.stats;
        stats
            .bytes_sent
            .fetch_add(sent.saturating_sub(before), Ordering::Relaxed);
        stats
            .bytes_received
            .fetch_add(received.saturating_sub(received_before), Ordering::Relaxed);
    }

    /// `n` more messages went to the client (their payloads count as `sent`).
    pub fn messages_sent(&self, n: u64) {
        self.messages_sent.fetch_add(n, Ordering::Relaxed);
    }

    /// A message came from the client (its payload counts as `received`).
    pub fn message_received(&self) {
        self.messages_received.fetch_add(1, Ordering::Relaxed);
    }

    pub fn messages(&self) -> (u64, u64) {
        (
            self.messages_sent.load(Ordering::Relaxed),
            self.messages_received.load(Ordering::Relaxed),
        )
    }

    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn bytes_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Bytes moved that are counted elsewhere (the TLS layer's records of
    /// output already counted as sent): activity, not more bytes.
    pub fn active(&self) {
        self.touch();
    }

    fn touch(&self) {
        let ms = self.since.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// When the last byte moved (the start, if none has).
    pub fn last_activity(&self) -> Instant {
        self.since + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A connection's record, written when dropped.
#[derive(Debug)]
pub struct Record {
    conn: u64,
    service: Arc<str>,
    peer: String,
    started: Instant,
    pid: i32,
    traffic: Arc<Traffic>,
    closed: Option<(Option<(Exit, Usage)>, End)>,
    refused: bool,
    /// A WebSocket connection: its record counts messages.
    framed: bool,
    /// TLS: the version, the cipher and who encrypts ("none": plaintext).
    tls: String,
    /// The shared command watched: its instance's number.
    instance: Option<u64>,
    /// Who logged in (`htpasswd`).
    user: Option<String>,
}

impl Record {
    /// Opens the record of connection `conn`, accepted now for `service`.
    pub fn open(conn: u64, service: Arc<str>, stats: Arc<Stats>) -> Record {
        stats.active.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        Record {
            conn,
            service,
            peer: "unknown".into(),
            started,
            pid: 0,
            traffic: Arc::new(Traffic::new(started, stats)),
            closed: None,
            refused: false,
            framed: false,
            tls: "none".into(),
            instance: None,
            user: None,
        }
    }

    pub fn conn(&self) -> u64 {
        self.conn
    }

    pub fn service(&self) -> &Arc<str> {
        &self.service
    }

    /// When the connection was accepted.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The counts, shared: a part of the connection that outlives a borrow
    /// of the record (the TLS layer, a bulk thread) holds a clone.
    pub fn traffic(&self) -> &Arc<Traffic> {
        &self.traffic
    }

    /// The client came over TLS: `how` is the version, the cipher and who
    /// encrypts ("TLSv1.3 TLS_AES_128_GCM_SHA256 userspace").
    /// The client logged in as `user`.
    pub fn user(&mut self, user: &str) {
        self.user = Some(user.to_owned());
    }

    pub fn tls(&mut self, how: String) {
        self.tls = how;
    }

    /// The service a request on a shared socket named.
    pub fn routed(&mut self, service: &str) {
        self.service = service.into();
    }

    /// Who the client is (from the socket, or from its PROXY header).
    pub fn peer(&mut self, peer: &Peer) {
        self.peer = peer.to_string();
    }

    /// The connection speaks WebSocket: its record counts messages.
    pub fn framed(&mut self) {
        self.framed = true;
    }

    /// The command has started, as `pid`. Logged at debug level: the one
    /// record a connection writes at info is its end, which keeps the
    /// journal's per-service rate limit out of reach of busy but healthy
    /// services for longer.
    pub fn command_started(&mut self, pid: i32) {
        self.pid = pid;
        tracing::debug!(conn = self.conn, service = &*self.service, peer = %self.peer, pid, "command started");
    }

    /// The client watches instance `instance` of the service's shared
    /// command, `pid`: the record names them.
    pub fn watching(&mut self, instance: u64, pid: i32) {
        self.pid = pid;
        self.instance = Some(instance);
        tracing::debug!(conn = self.conn, service = &*self.service, peer = %self.peer, pid, instance, "watching the shared command");
    }

    /// Who the client is, as the record says it.
    pub fn peer_name(&self) -> String {
        self.peer.clone()
    }

    /// Admission refused the client, or it left before its command started:
    /// no record, only the daemon's count (and the episodes of `admit`).
    pub fn refused(mut self) {
        self.refused = true;
        tracing::debug!(conn = self.conn, service = &*self.service, peer = %self.peer, "refused; no command run");
    }

    /// Ends the connection: `ended` is the command's end (None if none ran).
    pub fn close(mut self, ended: Option<&Ended>, end: End) {
        let end = match ended {
            Some(e) => end.after_exit(&e.exit, e.usage.oom_kills),
            None => end,
        };
        self.closed = Some((ended.map(|e| (e.exit, e.usage)), end));
    }

    /// Logs the record. Fields that are not known (no command ran, no
    /// cgroup, not WebSocket, not TLS) are left out, in the readable line
    /// and in the journal alike.
    fn write(&self, exit: Option<&(Exit, Usage)>, end: &End) {
        let (conn, service, peer, pid) = (self.conn, &*self.service, &self.peer, self.pid);
        let bytes = self.traffic.bytes_sent();
        let bytes_received = self.traffic.bytes_received();
        let duration_ms = self.started.elapsed().as_millis() as u64;
        let usage = exit.map(|(_, usage)| *usage).unwrap_or_default();
        let exit = exit.map(|(exit, _)| exit.to_string());
        let reason = end.reason();
        let tls = (self.tls != "none").then_some(self.tls.as_str());
        let messages = self.framed.then(|| self.traffic.messages());
        let instance = self.instance;
        let user = self.user.as_deref();
        let (messages_sent, messages_received) = (messages.map(|m| m.0), messages.map(|m| m.1));
        let Usage {
            cpu_usec,
            memory_peak,
            tasks_peak,
            oom_kills,
        } = usage;
        let exit_text = exit
            .as_deref()
            .map_or_else(String::new, |e| format!(", exit {e}"));
        let oom = match oom_kills {
            Some(n) if n > 0 => format!(" ({n} process(es) ended by the OOM killer at memory_max)"),
            _ => String::new(),
        };
        let exit = exit.as_deref();
        macro_rules! ended {
            ($level:ident) => {
                tracing::$level!(
                    conn, service, peer = %peer, pid, bytes, bytes_received, duration_ms, exit, reason,
                    cpu_usec, memory_peak, tasks_peak, oom_kills, messages_sent, messages_received, tls, instance, user,
                    "connection ended: {end}{exit_text}{oom}, {bytes} bytes sent in {duration_ms} ms"
                )
            };
        }
        match end {
            End::SpawnFailed(_) => ended!(error),
            End::Error(_) | End::OomKilled => ended!(warn),
            _ => ended!(info),
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let stats = &self.traffic.stats;
        stats.active.fetch_sub(1, Ordering::Relaxed);
        if self.refused {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        stats.served.fetch_add(1, Ordering::Relaxed);
        match self.closed.take() {
            Some((ended, end)) => self.write(ended.as_ref(), &end),
            None => self.write(
                None,
                &End::Error("the connection's task ended without closing its record".into()),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_record_counts_once_and_a_forgotten_one_is_still_written() {
        let stats = Arc::new(Stats::default());
        let open = |n| Record::open(n, "s".into(), Arc::clone(&stats));
        let a = open(1);
        let b = open(2);
        let c = open(3);
        assert_eq!(stats.active.load(Ordering::Relaxed), 3);
        a.close(None, End::OutputEnded);
        b.refused();
        drop(c);
        assert_eq!(stats.active.load(Ordering::Relaxed), 0);
        assert_eq!(stats.served.load(Ordering::Relaxed), 2);
        assert_eq!(stats.refused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn kernel_counts_replace_the_daemons_without_counting_twice() {
        let stats = Arc::new(Stats::default());
        let r = Record::open(1, "s".into(), Arc::clone(&stats));
        r.traffic().sent(6); // a banner, sent by the daemon
        r.traffic().counted_by_kernel(106, 4);
        assert_eq!(r.traffic().bytes_sent(), 106);
        assert_eq!(stats.bytes_sent.load(Ordering::Relaxed), 106);
        assert_eq!(stats.bytes_received.load(Ordering::Relaxed), 4);
    }
}
