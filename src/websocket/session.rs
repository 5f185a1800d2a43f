//! One WebSocket session, after the upgrade: the command's output out as
//! messages, the client's messages in to the command's stdin, a ping every
//! `ping_interval`, and the close.
//!
//! Reading is tungstenite's ([`WebSocketContext`]): it unmasks, joins
//! fragments, checks opcodes, reserved bits, sizes and UTF-8, and answers
//! pings and closes (a close code no endpoint may send with 1002, which it
//! then reports in the client's name: [`ClientClose`] follows the bytes it
//! reads for the code the client sent). What it answers goes to an outbox, not the socket: the
//! socket carries the daemon's own data frames, and a control frame may only
//! go between two of them. So every byte to the client passes [`Wire`],
//! which writes whole frames in order: the data frame in progress to its
//! end, then what waits in the outbox.
//!
//! Data frames are ours. Text mode splits the output into lines, each line
//! one text message. Binary mode sends what the command wrote as it comes:
//! from a pipe, each message's header is sent with `MSG_MORE` and its payload
//! spliced from the pipe behind it (server frames are not masked), its length
//! read with FIONREAD first; from a socket pair it is read into the buffer
//! behind the header's room.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Message, Role, WebSocketConfig, WebSocketContext};

use super::frames::{clamp, ClientClose, Lines, Wire, TEXT_READ};
use crate::command::{writable, Inbox, Input};
use crate::config::{Messages, WebSocket};
use crate::end::{End, Ending, Farewell};
use crate::fdio::{self, retry, Class, Room};
use crate::record::Traffic;
use crate::sys;

/// How much client input may wait for the command's stdin, and how many
/// control frames for the client, before the client is no longer read:
/// a client that floods pings or messages and reads nothing is held back
/// by TCP, not by the daemon's memory.
const INBOX_HIGH: usize = 64 * 1024;
const OUTBOX_HIGH: usize = 16 * 1024;
/// The largest read of binary output from a socket pair.
const BINARY_READ: usize = 64 * 1024;
/// Messages read from the client in one go before others get a turn.
const BATCH: usize = 64;

/// A session in progress.
pub struct Session<'a> {
    socket: &'a AsyncFd<OwnedFd>,
    ws: &'a WebSocket,
    traffic: &'a Traffic,
    reader: WebSocketContext,
    /// The command's stdout, and whether binary messages are spliced from it.
    output: &'a AsyncFd<OwnedFd>,
    splice: bool,
    /// The command's stdin (taken out while the session pumps).
    input: Input,
    wire: Wire,
    /// What the client's socket takes now: no more output is read than
    /// that, so what a slow client cannot take waits in the command's
    /// pipe or socket pair, not here.
    room: Room,
    /// The socket had no room for more output: its room is waited for,
    /// not the output.
    full: bool,
    /// Control frames (pongs, pings, the close) waiting for a frame boundary.
    outbox: Vec<u8>,
    /// Text output not yet ended by a newline.
    partial: Vec<u8>,
    /// Client messages on their way to the command's stdin.
    inbox: Inbox,
    output_open: bool,
    /// Payload `max_bytes` still allows.
    budget: u64,
    awaiting_pong: bool,
    pings: u64,
    /// The client's close code as sent (tungstenite reports an invalid one
    /// as 1002).
    client_close: ClientClose,
}

impl<'a> Session<'a> {
    /// A session on `socket`, whose client already sent `leftover` after its
    /// request; the command's output comes from `output`, spliced from it in
    /// binary mode when `splice` (it is a pipe), and its `input` takes the
    /// client's messages.
    pub fn new(
        socket: &'a AsyncFd<OwnedFd>,
        ws: &'a WebSocket,
        traffic: &'a Traffic,
        leftover: Vec<u8>,
        (output, splice, input): (&'a AsyncFd<OwnedFd>, bool, Input),
        max_bytes: Option<u64>,
    ) -> Session<'a> {
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_message_size(Some(ws.max_message_size))
            .max_frame_size(Some(ws.max_message_size));
        let mut client_close = ClientClose::default();
        client_close.pass(&leftover);
        Session {
            socket,
            ws,
            traffic,
            reader: WebSocketContext::from_partially_read(leftover, Role::Server, Some(config)),
            output,
            splice: splice && ws.messages == Messages::Binary,
            inbox: Inbox::new(&input),
            input,
            wire: Wire::default(),
            room: Room::of(socket.get_ref()),
            full: false,
            outbox: Vec::new(),
            partial: Vec::new(),
            output_open: true,
            budget: max_bytes.unwrap_or(u64::MAX),
            awaiting_pong: false,
            pings: 0,
            client_close,
        }
    }

    /// Moves messages both ways until the output ends, the client closes
    /// or fails, or `max_bytes` of output has gone.
    pub async fn pump(&mut self) -> End {
        let (socket, output) = (self.socket, self.output);
        let every = self.ws.ping_interval;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut input = std::mem::replace(&mut self.input, Input::Null);
        let end = loop {
            if let Some(end) = self.finished() {
                break end;
            }
            let writing = !self.wire.is_empty() || !self.outbox.is_empty();
            let producing = !writing && !self.full && self.output_open && self.budget > 0;
            let receiving = self.inbox.len() < INBOX_HIGH && self.outbox.len() < OUTBOX_HIGH;
            let stdin = self.inbox.stdin(&input, output);
            let step = tokio::select! {
                r = socket.writable(), if writing || self.full => self.send(r),
                r = output.readable(), if producing => self.produce(r),
                r = socket.readable(), if receiving => self.receive(r),
                r = writable(stdin) => self.inbox.feed(r).map(|taken| {
                    if !taken {
                        input.close(output);
                    }
                }),
                _ = ping.tick() => self.ping(),
            };
            if let Err(end) = step {
                break end;
            }
        };
        self.input = input;
        end
    }

    /// The most one read of output takes (for the client's room).
    fn read_size(&self) -> usize {
        match self.ws.messages {
            Messages::Binary => BINARY_READ,
            Messages::Text => TEXT_READ,
        }
    }

    /// Where the session counts what it moves.
    pub fn traffic(&self) -> &'a Traffic {
        self.traffic
    }

    /// The session's own ends: all output sent, or `max_bytes` of it.
    fn finished(&self) -> Option<End> {
        if !self.wire.is_empty() {
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

    /// Writes to the client what waits: the frame in progress, then the
    /// control frames. Returns once the socket is full or nothing is left.
    fn send(&mut self, ready: io::Result<AsyncFdReadyGuard<'_, OwnedFd>>) -> Result<(), End> {
        let mut ready =
            ready.map_err(|e| End::client_error(fdio::errno(&e), "writing to the client"))?;
        if self.full {
            if self.room.reported(&mut ready).is_none() {
                return Ok(());
            }
            self.full = false;
        }
        loop {
            if self.wire.is_empty() {
                if self.outbox.is_empty() {
                    return Ok(());
                }
                self.wire.load(&mut self.outbox);
            }
            let socket = self.socket.get_ref();
            match self.wire.write(socket, self.output.get_ref(), self.traffic) {
                Ok(n) => self.room.took(n),
                Err(Errno::EAGAIN) => {
                    ready.clear_ready();
                    self.room.full();
                    // It may be a while: only the rest of the frame is kept.
                    self.wire.compact();
                    return Ok(());
                }
                Err(e) => return Err(End::client_error(e, "writing to the client")),
            }
        }
    }

    /// Turns what the command wrote into messages on the wire.
    fn produce(&mut self, ready: io::Result<AsyncFdReadyGuard<'_, OwnedFd>>) -> Result<(), End> {
        let mut ready = ready.map_err(|e| End::reading_output(fdio::errno(&e)))?;
        let fd = self.output.get_ref();
        let max = self.ws.max_message_size;
        // What is read goes to the heap until the client takes it; what is
        // spliced stays in the pipe.
        let limit = match self.splice {
            true => usize::MAX,
            false => self.room.for_read(self.socket.get_ref(), self.read_size()),
        };
        if limit == 0 {
            // The output waits (its readiness kept) for the client's room,
            // and the wire keeps no more than it holds meanwhile.
            self.full = true;
            self.wire.compact();
            return Ok(());
        }
        let read = match (self.ws.messages, self.splice) {
            (Messages::Binary, true) => match pipe_content(fd) {
                Ok(Some(0)) => Ok(0),
                Ok(Some(n)) => {
                    let n = n.min(max).min(clamp(self.budget));
                    self.budget -= n as u64;
                    self.wire.spliced(n);
                    Ok(n)
                }
                Ok(None) => Err(Errno::EAGAIN),
                Err(e) => Err(e),
            },
            (Messages::Binary, false) => {
                let want = max.min(BINARY_READ).min(clamp(self.budget)).min(limit);
                let read = self.wire.read_binary(fd, want);
                if let Ok(n) = read {
                    self.budget -= n as u64;
                }
                read
            }
            (Messages::Text, _) => {
                let mut lines = Lines {
                    wire: &mut self.wire,
                    partial: &mut self.partial,
                    max,
                    budget: &mut self.budget,
                };
                lines.read(fd, limit)
            }
        };
        match read {
            Ok(0) => {
                if self.ws.messages == Messages::Text && !self.partial.is_empty() {
                    // The last line, without its newline, is output too.
                    let last = std::mem::take(&mut self.partial);
                    let mut lines = Lines {
                        wire: &mut self.wire,
                        partial: &mut self.partial,
                        max,
                        budget: &mut self.budget,
                    };
                    lines.message(&last);
                }
                self.output_open = false;
            }
            Ok(_) => {}
            Err(Errno::EAGAIN) => ready.clear_ready(),
            // A socket pair the command closed with input unread.
            Err(e) if fdio::class(e) == Class::Disconnect => self.output_open = false,
            Err(e) => return Err(End::reading_output(e)),
        }
        Ok(())
    }

    /// Reads the client's frames: messages go to the command's stdin, pongs
    /// keep the session alive, a close ends it.
    fn receive(&mut self, ready: io::Result<AsyncFdReadyGuard<'_, OwnedFd>>) -> Result<(), End> {
        let mut ready =
            ready.map_err(|e| End::client_error(fdio::errno(&e), "reading from the client"))?;
        for _ in 0..BATCH {
            let mut io = Outbox {
                socket: self.socket.get_ref(),
                outbox: &mut self.outbox,
                client_close: &mut self.client_close,
            };
            match self.reader.read(&mut io) {
                Ok(message) => self.message(message)?,
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    break;
                }
                Err(e) => return Err(failed(e)),
            }
            if self.inbox.len() >= INBOX_HIGH || self.outbox.len() >= OUTBOX_HIGH {
                break;
            }
        }
        self.flush_replies();
        Ok(())
    }

    /// Moves tungstenite's queued answers (pongs) to the outbox.
    fn flush_replies(&mut self) {
        let mut io = Outbox {
            socket: self.socket.get_ref(),
            outbox: &mut self.outbox,
            client_close: &mut self.client_close,
        };
        let _ = self.reader.flush(&mut io);
    }

    fn message(&mut self, message: Message) -> Result<(), End> {
        let payload: &[u8] = match &message {
            Message::Text(text) => text.as_bytes(),
            Message::Binary(bytes) => bytes,
            Message::Pong(_) => {
                self.awaiting_pong = false;
                return Ok(());
            }
            Message::Ping(_) | Message::Frame(_) => return Ok(()),
            Message::Close(frame) => {
                // The answering close goes out with the rest (see `close`).
                self.flush_replies();
                let code = frame.as_ref().map(|f| u16::from(f.code));
                // A code no endpoint may send is answered with 1002, and
                // reported as 1002: the record says what the client sent.
                let sent = self.client_close.code();
                if let Some(sent) = sent.filter(|&c| !CloseCode::from(c).is_allowed()) {
                    return Err(End::ProtocolError(format!(
                        "close code {sent}, which no endpoint may send; answered with 1002"
                    )));
                }
                return Err(End::ClientClosed(code));
            }
        };
        self.traffic.message_received();
        self.traffic.received(payload.len());
        self.inbox.push(payload);
        if self.ws.messages == Messages::Text {
            self.inbox.push(b"\n");
        }
        Ok(())
    }

    /// Pings the client; a client that did not answer the last ping is gone.
    fn ping(&mut self) -> Result<(), End> {
        if self.awaiting_pong {
            return Err(End::PingTimeout);
        }
        self.pings += 1;
        let mut io = Outbox {
            socket: self.socket.get_ref(),
            outbox: &mut self.outbox,
            client_close: &mut self.client_close,
        };
        let ping = Message::Ping(self.pings.to_be_bytes().to_vec().into());
        let _ = self.reader.write(&mut io, ping);
        let _ = self.reader.flush(&mut io);
        self.awaiting_pong = true;
        Ok(())
    }

    /// Closes the session after `end`, as `ending` says: the frame in
    /// progress is finished, the close frame with the code that fits sent,
    /// the client's close awaited (not after an abrupt end), and the socket
    /// shut down, all within `kill_grace`. After a disconnect or a ping
    /// timeout nothing is sent. True when a close frame went out.
    pub async fn close(mut self, end: &End, ending: &Ending) -> bool {
        self.input.close(self.output);
        let Some((code, reason)) = close_code(end) else {
            return false;
        };
        let mut io = Outbox {
            socket: self.socket.get_ref(),
            outbox: &mut self.outbox,
            client_close: &mut self.client_close,
        };
        if !matches!(end, End::ClientClosed(_)) {
            let frame = CloseFrame {
                code,
                reason: reason.into(),
            };
            let _ = self.reader.close(&mut io, Some(frame));
        }
        let socket = self.socket;
        let traffic = self.traffic;
        let closing = async {
            while !(self.wire.is_empty() && self.outbox.is_empty()) {
                if self.send(socket.writable().await).is_err() {
                    return;
                }
            }
            if ending.farewell != Farewell::Abrupt {
                self.await_close().await;
            }
            fdio::end_output(socket.get_ref());
            let _ = fdio::discard(socket, |n| traffic.dropped(n as u64)).await;
        };
        let _ = tokio::time::timeout(ending.grace, closing).await;
        true
    }

    /// Reads the client's frames until its close (messages are dropped now).
    async fn await_close(&mut self) {
        loop {
            let Ok(mut ready) = self.socket.readable().await else {
                return;
            };
            let mut io = Outbox {
                socket: self.socket.get_ref(),
                outbox: &mut self.outbox,
                client_close: &mut self.client_close,
            };
            match self.reader.read(&mut io) {
                Ok(Message::Close(_)) => return,
                Ok(_) => {}
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
                Err(_) => return,
            }
        }
    }
}

/// The close code and reason an end sends; None where the client cannot
/// hear it (it is gone, or does not answer).
fn close_code(end: &End) -> Option<(CloseCode, &'static str)> {
    Some(match end {
        End::OutputEnded | End::CommandExited | End::OutputHeld | End::OomKilled => {
            (CloseCode::Normal, "")
        }
        End::MaxBytes => (CloseCode::Normal, "max_bytes reached"),
        End::ClientClosed(_) => (CloseCode::Normal, ""),
        End::Shutdown => (CloseCode::Away, "the server is stopping"),
        End::Timeout => (CloseCode::Policy, "timeout"),
        End::IdleTimeout => (CloseCode::Policy, "idle_timeout"),
        End::Lagging => (CloseCode::Again, "lagging: too far behind"),
        End::ProtocolError(_) => (CloseCode::Protocol, "protocol error"),
        End::InvalidUtf8 => (CloseCode::Invalid, "invalid UTF-8"),
        End::MessageTooBig(_) => (CloseCode::Size, "message too big"),
        End::Error(_) | End::SpawnFailed(_) => (CloseCode::Error, "internal error"),
        End::ClientGone(_)
        | End::Tls(_)
        | End::Unannounced
        | End::PingTimeout
        | End::Page
        | End::HeadersOnly => return None,
    })
}

/// What a reading error from tungstenite means for the record.
fn failed(e: WsError) -> End {
    match e {
        WsError::Io(e) => End::client_error(fdio::errno(&e), "reading from the client"),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Unannounced,
        WsError::Protocol(p) => End::ProtocolError(p.to_string()),
        WsError::Utf8(_) => End::InvalidUtf8,
        // tungstenite checks a frame's length against the limit only, and
        // reports the length whole (a usize is 64 bits here).
        WsError::Capacity(CapacityError::MessageTooLong { size, .. })
            if u64::try_from(size).is_ok_and(|s| s >> 63 == 1) =>
        {
            End::ProtocolError(
                "a 64-bit frame length with its most significant bit set, which RFC 6455 forbids"
                    .into(),
            )
        }
        WsError::Capacity(c) => End::MessageTooBig(c.to_string()),
        WsError::ConnectionClosed | WsError::AlreadyClosed => End::ClientClosed(None),
        other => End::Error(other.to_string()),
    }
}

/// How many bytes the pipe holds: Some(0) at end-of-file (no writer left
/// and nothing in it), None when it is merely empty for now.
fn pipe_content(pipe: &OwnedFd) -> Result<Option<usize>, Errno> {
    let waiting = |fd: &OwnedFd| sys::readable_bytes(fd.as_fd()).map_err(|e| fdio::errno(&e));
    let n = waiting(pipe)?;
    if n > 0 {
        return Ok(Some(n));
    }
    let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
    retry(|| poll(&mut fds, PollTimeout::ZERO))?;
    let hung_up = fds[0]
        .revents()
        .is_some_and(|r| r.contains(PollFlags::POLLHUP));
    // Once hung up nothing more can come: what is in it now is all.
    match (hung_up, waiting(pipe)?) {
        (true, 0) => Ok(Some(0)),
        (_, 0) => Ok(None),
        (_, n) => Ok(Some(n)),
    }
}

/// tungstenite's stream: it reads the client's socket, and what it writes
/// (pongs, the close) goes to the outbox.
struct Outbox<'b> {
    socket: &'b OwnedFd,
    outbox: &'b mut Vec<u8>,
    /// Follows what tungstenite reads, for the client's close code.
    client_close: &'b mut ClientClose,
}

impl Read for Outbox<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = retry(|| fdio::read(self.socket, buf)).map_err(io::Error::from)?;
        self.client_close.pass(&buf[..n]);
        Ok(n)
    }
}

impl Write for Outbox<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.outbox.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
