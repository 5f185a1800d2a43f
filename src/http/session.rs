//! One HTTP response in progress: the command's output streamed to the
//! client as it comes (chunks for HTTP/1.1, bytes until the close for
//! 1.0, an event a line for `text/event-stream`), the request's body to the
//! command's stdin (its end is the stdin's), a keep-alive comment every
//! `ping_interval` on an event stream, and the end.
//!
//! The response's head waits for the command's first byte: a command that
//! fails before it writes anything gets `502 Bad Gateway`, one that says
//! nothing within `timeout` gets `504`, and a command that succeeds
//! silently an empty `200`. Once the head is out, a response cut short (a
//! limit of time, the stop, an error) ends without its last chunk, so the
//! client can tell it from a whole one; an event stream's last event says
//! how it ended (`event: end`).

use std::io;
use std::os::fd::OwnedFd;

use nix::errno::Errno;
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};

use super::body::{self, Body, Events, CHUNK_HEAD, KEEP_ALIVE, LAST_CHUNK};
use super::cgi::CgiHead;
use super::opening::{head, head_as, Opened, Response};
use super::request::error_response;
use crate::command::{writable, Inbox, Input};
use crate::config::Http;
use crate::end::{End, Ending, Exit, Farewell};
use crate::fdio::{self, Class, Room};
use crate::record::Traffic;

/// The largest read of output.
const READ: usize = 64 * 1024;
/// How much of the request's body may wait for the command's stdin before
/// the client is no longer read: the rest waits in TCP, not in memory.
const INBOX_HIGH: usize = 64 * 1024;
/// A buffer larger than this is freed once drained.
const KEEP: usize = 16 * 1024;

/// A response in progress.
pub struct Session<'a> {
    socket: &'a AsyncFd<OwnedFd>,
    http: &'a Http,
    traffic: &'a Traffic,
    response: Response,
    /// The command's stdout, and its stdin (taken out while the session pumps).
    output: &'a AsyncFd<OwnedFd>,
    input: Input,
    /// The request's body still to come, and what it may still bring.
    body: Body,
    body_left: u64,
    /// Body bytes on their way to the command's stdin.
    inbox: Inbox,
    /// Whether the client's socket is still read (until its end-of-file).
    reading: bool,
    /// Whether the head is out (or on its way, in `out`).
    begun: bool,
    /// Bytes on their way to the client, from `at`, and how much command
    /// output they carry (counted as sent once they are all written).
    out: Vec<u8>,
    at: usize,
    carried: usize,
    events: Events,
    /// Output bytes read and waiting in `events` for their line's end.
    held: usize,
    room: Room,
    /// The socket had no room for more output: its room is waited for.
    full: bool,
    output_open: bool,
    /// Output `max_bytes` still allows.
    budget: u64,
    /// The body that came with the request's head was refused: the
    /// response's end, once it begins.
    refused: Option<End>,
    /// `cgi_headers`: the command's header block so far (None once it has
    /// ended, or without the key), then what it asked for.
    cgi: Option<Vec<u8>>,
    cgi_head: Option<CgiHead>,
    /// The command's header block was refused: why (a 502).
    bad_gateway: Option<String>,
}

impl<'a> Session<'a> {
    /// A response on `socket` to the request `opened`; the command's output
    /// comes from `output`, and its `input` takes the request's body.
    pub fn new(
        socket: &'a AsyncFd<OwnedFd>,
        http: &'a Http,
        traffic: &'a Traffic,
        opened: Opened,
        (output, input): (&'a AsyncFd<OwnedFd>, Input),
        max_bytes: Option<u64>,
    ) -> Session<'a> {
        let mut session = Session {
            socket,
            http,
            traffic,
            response: opened.response,
            output,
            inbox: Inbox::new(&input),
            input,
            body: opened.body,
            body_left: http.max_body_size,
            reading: true,
            begun: false,
            out: Vec::new(),
            at: 0,
            carried: 0,
            events: Events::default(),
            held: 0,
            room: Room::of(socket.get_ref()),
            full: false,
            output_open: true,
            budget: max_bytes.unwrap_or(u64::MAX),
            refused: None,
            cgi: http.cgi_headers.then(Vec::new),
            cgi_head: None,
            bad_gateway: None,
        };
        // The body's start came with the request's head.
        session.refused = session.take_body(&opened.leftover).err();
        session
    }

    /// Where the session counts what it moves.
    pub fn traffic(&self) -> &'a Traffic {
        self.traffic
    }

    /// Moves the bytes until the output ends, the client fails, or
    /// `max_bytes` of output has gone.
    pub async fn pump(&mut self) -> End {
        let (socket, output) = (self.socket, self.output);
        let every = self.http.ping_interval;
        let mut keep_alive = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if let Some(end) = self.refused.take() {
            return end;
        }
        let mut input = std::mem::replace(&mut self.input, Input::Null);
        let end = loop {
            if self.body.is_done() && self.inbox.is_empty() {
                // The body has all come: the command reads its end.
                input.close(output);
            }
            if let Some(end) = self.finished() {
                break end;
            }
            let writing = self.at < self.out.len();
            let producing = !writing && !self.full && self.output_open && self.budget > 0;
            let receiving = self.reading && self.inbox.len() < INBOX_HIGH;
            let stdin = self.inbox.stdin(&input, output);
            let step = tokio::select! {
                r = socket.writable(), if writing || self.full => self.send(r),
                r = output.readable(), if producing => {
                    let step = self.produce(r);
                    if self.at < self.out.len() {
                        // Output is on its way: the stream is not quiet.
                        keep_alive.reset();
                    }
                    step
                }
                r = socket.readable(), if receiving => self.receive(r),
                r = writable(stdin) => self.inbox.feed(r).map(|taken| {
                    if !taken {
                        input.close(output);
                    }
                }),
                _ = keep_alive.tick(), if self.response.events && !writing => {
                    self.keep_alive();
                    Ok(())
                }
            };
            if let Err(end) = step {
                break end;
            }
        };
        self.input = input;
        end
    }

    /// The session's own ends: all output sent, or `max_bytes` of it.
    fn finished(&self) -> Option<End> {
        if self.at < self.out.len() {
            return None;
        }
        if !self.output_open {
            Some(End::OutputEnded)
        } else if self.budget == 0 {
            Some(End::MaxBytes)
        } else {
            None
        }
    }

    /// Whether the response's status still waits for the command (it has
    /// written nothing): its exit decides it.
    pub fn awaits_exit(&self) -> bool {
        !self.begun
    }

    /// Queues `payload` (command output, `carried` bytes of it; or framing
    /// alone), framed as the response is, behind the head if it is not out.
    fn queue(&mut self, framed: Vec<u8>, start: usize, carried: usize) {
        if !self.begun {
            self.begun = true;
            let mut bytes = match &self.cgi_head {
                Some(cgi) => head_as(self.http, self.response, cgi),
                None => head(self.http, self.response, 200),
            }
            .into_bytes();
            bytes.extend_from_slice(&framed[start..]);
            self.out = bytes;
            self.at = 0;
        } else {
            self.out = framed;
            self.at = start;
        }
        self.carried = carried;
    }

    /// `bytes` (at `CHUNK_HEAD` in `buf`) as the response frames them.
    fn frame(&self, buf: &mut Vec<u8>) -> usize {
        match self.response.chunked {
            true if buf.len() > CHUNK_HEAD => body::frame_chunk(buf),
            _ => CHUNK_HEAD,
        }
    }

    /// Reads what the command wrote, as much as the client's socket takes.
    fn produce(&mut self, ready: io::Result<AsyncFdReadyGuard<'_, OwnedFd>>) -> Result<(), End> {
        let mut ready = ready.map_err(|e| End::reading_output(fdio::errno(&e)))?;
        let want = READ.min(clamp(self.budget));
        let limit = self.room.for_read(self.socket.get_ref(), want);
        if limit == 0 {
            // The output waits for the client's room.
            self.full = true;
            return Ok(());
        }
        let want = want.min(limit);
        let mut buf = vec![0u8; CHUNK_HEAD + want];
        let n = match fdio::read(self.output.get_ref(), &mut buf[CHUNK_HEAD..]) {
            Ok(n) => n,
            Err(Errno::EAGAIN) => {
                ready.clear_ready();
                return Ok(());
            }
            // A socket pair the command closed with input unread.
            Err(e) if fdio::class(e) == Class::Disconnect => 0,
            Err(e) => return Err(End::reading_output(e)),
        };
        buf.truncate(CHUNK_HEAD + n);
        if n == 0 {
            self.output_open = false;
            let mut last = Vec::new();
            self.events.finish(&mut last);
            self.queue_events(last);
            return Ok(());
        }
        self.budget -= n as u64;
        if self.cgi.is_some() {
            return self.cgi_block(&buf[CHUNK_HEAD..]);
        }
        self.emit(buf, n);
        Ok(())
    }

    /// Output read at `CHUNK_HEAD` in `buf` (`n` bytes), framed and queued.
    fn emit(&mut self, mut buf: Vec<u8>, n: usize) {
        if self.response.events {
            let mut events = Vec::new();
            self.events.encode(&buf[CHUNK_HEAD..], &mut events);
            if self.budget == 0 {
                // No more comes: the line cut at max_bytes is an event too.
                self.events.finish(&mut events);
            }
            self.held += n;
            self.queue_events(events);
        } else {
            let start = self.frame(&mut buf);
            self.queue(buf, start, n);
        }
    }

    /// Output while the command's CGI header block is not over: once it
    /// is, the head goes out as it asks, and what follows is the body's
    /// start. The block is not output: `max_bytes` and `BYTES` count the body.
    fn cgi_block(&mut self, output: &[u8]) -> Result<(), End> {
        let Some(block) = self.cgi.as_mut() else {
            return Ok(());
        };
        block.extend_from_slice(output);
        self.budget += output.len() as u64;
        match super::cgi::parse(block) {
            Ok(None) => Ok(()),
            Ok(Some((head, at))) => {
                let block = self.cgi.take().unwrap_or_default();
                self.cgi_head = Some(head);
                let body = &block[at..];
                let body = &body[..body.len().min(clamp(self.budget))];
                self.budget -= body.len() as u64;
                if body.is_empty() {
                    // The head goes out now, the body as it comes.
                    self.queue(Vec::new(), 0, 0);
                } else {
                    let mut buf = vec![0u8; CHUNK_HEAD];
                    buf.extend_from_slice(body);
                    self.emit(buf, body.len());
                }
                Ok(())
            }
            Err(why) => {
                self.cgi = None;
                let why = format!("the command's CGI header block: {why}");
                self.bad_gateway = Some(why.clone());
                Err(End::Error(why))
            }
        }
    }

    /// Queues encoded events, which carry the output read so far (none
    /// yet while a line waits for its end).
    fn queue_events(&mut self, events: Vec<u8>) {
        if events.is_empty() {
            return;
        }
        let mut buf = vec![0u8; CHUNK_HEAD];
        buf.extend_from_slice(&events);
        let start = self.frame(&mut buf);
        // What waits for its line's end is carried by a later event.
        let waiting = self.events.waiting();
        let carried = self.held.saturating_sub(waiting);
        self.held = waiting.min(self.held);
        self.queue(buf, start, carried);
    }

    /// An event stream's comment, so that proxies and clients see it alive
    /// (and the head, if the command has said nothing yet).
    fn keep_alive(&mut self) {
        let mut buf = vec![0u8; CHUNK_HEAD];
        buf.extend_from_slice(KEEP_ALIVE);
        let start = self.frame(&mut buf);
        self.queue(buf, start, 0);
    }

    /// Writes what waits; counts its output once all of it is written.
    fn send(&mut self, ready: io::Result<AsyncFdReadyGuard<'_, OwnedFd>>) -> Result<(), End> {
        let mut ready =
            ready.map_err(|e| End::client_error(fdio::errno(&e), "writing to the client"))?;
        if self.full {
            if self.room.reported(&mut ready).is_none() {
                return Ok(());
            }
            self.full = false;
        }
        while self.at < self.out.len() {
            match fdio::retry(|| nix::unistd::write(self.socket.get_ref(), &self.out[self.at..])) {
                Ok(n) => {
                    self.at += n;
                    self.room.took(n);
                }
                Err(Errno::EAGAIN) => {
                    ready.clear_ready();
                    self.room.full();
                    return Ok(());
                }
                Err(e) => return Err(End::client_error(e, "writing to the client")),
            }
        }
        self.traffic.sent(std::mem::take(&mut self.carried));
        self.out.clear();
        self.at = 0;
        if self.out.capacity() > KEEP {
            self.out = Vec::new();
        }
        Ok(())
    }

    /// Reads the client: the request's body, then (ignored) anything after it.
    fn receive(&mut self, ready: io::Result<AsyncFdReadyGuard<'_, OwnedFd>>) -> Result<(), End> {
        let mut ready =
            ready.map_err(|e| End::client_error(fdio::errno(&e), "reading from the client"))?;
        let mut buf = [0u8; 16 * 1024];
        match fdio::read(self.socket.get_ref(), &mut buf) {
            Ok(0) => {
                self.reading = false;
                if !self.body.is_done() {
                    return Err(End::ProtocolError(
                        "the client ended its request's body early".into(),
                    ));
                }
                Ok(())
            }
            Ok(n) => {
                self.traffic.received(n);
                self.take_body(&buf[..n])
            }
            Err(Errno::EAGAIN) => {
                ready.clear_ready();
                Ok(())
            }
            Err(e) => Err(End::client_error(e, "reading from the client")),
        }
    }

    /// Decodes body bytes into the inbox; bytes after the body are dropped
    /// (one request a connection).
    fn take_body(&mut self, bytes: &[u8]) -> Result<(), End> {
        if self.body.is_done() {
            return Ok(());
        }
        // Without a stdin that takes it (`stdin` is not "client", or the
        // command closed it), the body is read and dropped.
        let mut dropped = Vec::new();
        let into = self.inbox.sink().unwrap_or(&mut dropped);
        let decoded = self.body.decode(bytes, into, &mut self.body_left);
        decoded
            .map(|_| ())
            .map_err(|why| match why.contains("max_body_size") {
                true => End::MessageTooBig(why),
                false => End::ProtocolError(why),
            })
    }

    /// Ends the response after `end`, as `ending` says, within `kill_grace`:
    /// a response not begun gets the status the end (and the command's
    /// `exit`, where known) calls for; a whole one its last chunk; a cut
    /// one none. Nothing is sent to a client that is gone. True when the
    /// response ended in order.
    pub async fn close(mut self, end: &End, ending: &Ending, exit: Option<&Exit>) -> bool {
        self.input.close(self.output);
        let gone = matches!(
            end,
            End::ClientGone(_) | End::Tls(_) | End::Unannounced | End::ClientClosed(_)
        );
        if gone || (self.begun && ending.farewell == Farewell::Abrupt) {
            return false;
        }
        let complete = ending.farewell == Farewell::Complete;
        let tail = if self.begun {
            let mut tail = Vec::new();
            if self.response.events {
                let mut last = vec![0u8; CHUNK_HEAD];
                body::end_event(end.reason(), &mut last);
                let start = self.frame(&mut last);
                tail.extend_from_slice(&last[start..]);
            }
            if complete && self.response.chunked {
                tail.extend_from_slice(LAST_CHUNK);
            }
            tail
        } else {
            self.unbegun(end, exit)
        };
        let in_order = complete || !self.begun;
        let (socket, traffic) = (self.socket, self.traffic);
        let closing = async {
            while self.at < self.out.len() {
                if self.send(socket.writable().await).is_err() {
                    return false;
                }
            }
            if fdio::write_all(socket, &tail, |_| {}).await.is_err() {
                return false;
            }
            fdio::end_output(socket.get_ref());
            let _ = fdio::discard(socket, |n| traffic.dropped(n as u64)).await;
            true
        };
        let written = tokio::time::timeout(ending.grace, closing)
            .await
            .unwrap_or(false);
        written && in_order
    }

    /// The whole response to a request whose command wrote nothing (or
    /// not all of its CGI header block).
    fn unbegun(&self, end: &End, exit: Option<&Exit>) -> Vec<u8> {
        if let Some(why) = &self.bad_gateway {
            return error_response(502, why, &[], false);
        }
        if self.cgi.as_ref().is_some_and(|block| !block.is_empty()) {
            let why = "the command's output ended within its CGI header block";
            return error_response(502, why, &[], false);
        }
        let succeeded = matches!(exit, None | Some(Exit::Code(0)));
        let (status, why) = match end {
            End::OutputEnded | End::CommandExited | End::OutputHeld | End::MaxBytes
                if succeeded =>
            {
                let mut empty = head(self.http, self.response, 200).into_bytes();
                if self.response.events {
                    let mut last = vec![0u8; CHUNK_HEAD];
                    body::end_event(end.reason(), &mut last);
                    let start = self.frame(&mut last);
                    empty.extend_from_slice(&last[start..]);
                }
                if self.response.chunked {
                    empty.extend_from_slice(LAST_CHUNK);
                }
                return empty;
            }
            End::OutputEnded | End::CommandExited | End::OutputHeld | End::MaxBytes => {
                let exit = exit.map_or_else(|| "unknown".into(), |e| e.to_string());
                (
                    502,
                    format!("the command ended (exit {exit}) before any output"),
                )
            }
            End::Timeout | End::IdleTimeout => {
                (504, format!("{}: the command wrote nothing", end.reason()))
            }
            End::Shutdown | End::Lagging => (503, end.reason().to_string()),
            End::MessageTooBig(why) => (413, why.clone()),
            End::ProtocolError(why) => (400, why.clone()),
            _ => (500, end.reason().to_string()),
        };
        error_response(status, &why, &[], false)
    }
}

/// A byte count as a length, saturated.
fn clamp(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}
