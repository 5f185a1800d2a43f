//! TLS in the daemon, after the handshake, where the kernel does not take
//! the session: the layer moves records between the client's socket and one
//! end of a socket pair, encrypting and decrypting; the rest of the
//! connection takes the pair's other end for the client, as if it were a
//! plaintext socket (see `client::Transport`).
//!
//! Each direction keeps its meaning: the end of the output (the pair's
//! end-of-file) becomes a close_notify and a shutdown of the client's
//! socket; the client's close_notify or end-of-file becomes the pair's
//! shutdown for writing. Nothing is read from one side while the other
//! cannot take it (no more plaintext than the client's socket has room
//! for), so a client or a command that stops reading holds the layer to a
//! record or two.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{shutdown, socketpair, AddressFamily, Shutdown as How, SockFlag, SockType};
use rustls::ServerConnection;
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use tokio::io::Interest;

use super::handshake::Fd;
use crate::fdio::{self, Class, Room};
use crate::record::Traffic;

/// One read of plaintext (a record's worth), on the stack of a plain function.
const CHUNK: usize = 16 * 1024;
/// The most a record adds to its plaintext (TLS 1.2 with AES-GCM: header,
/// explicit nonce, tag).
const RECORD_OVERHEAD: usize = 29;
/// What a turn reads and seals before the records are written out: four
/// records, at most, and no more than the client's socket has room for.
const TURN: usize = 4 * (CHUNK + RECORD_OVERHEAD);

/// How [`Layer::pump`] ended.
#[derive(Debug, PartialEq, Eq)]
enum Pumped {
    /// The pair reached end-of-file and every record of it is written.
    OutputEnded,
    /// The client's socket failed (a reset, say).
    ClientGone(Errno),
    /// The client broke the record layer (a bad or forged record, a fatal
    /// alert); the detail says how.
    Failed(String),
}

/// How [`Layer::run`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Closed in order, or after `grace` once the other side was done.
    Closed,
    ClientGone(Errno),
    Failed(String),
}

/// The encrypting end of a connection.
pub struct Layer {
    conn: ServerConnection,
    /// Decrypted client bytes the command has not taken yet.
    pending: Vec<u8>,
    /// The pair has reached end-of-file: no more is read from it.
    output_done: bool,
    /// The client still sends (no close_notify or end-of-file yet).
    client_sends: bool,
    /// The pair still takes the client's bytes.
    feeding: bool,
    /// The connection's traffic: its activity is the client taking records
    /// (what `idle_timeout` watches, until the last of the output is
    /// written); its bytes, when `counts`.
    traffic: Arc<Traffic>,
    /// The layer counts the bytes (a command that reads and writes the
    /// pair itself: nothing else does).
    counts: bool,
}

impl Layer {
    /// The layer for a connection whose handshake is complete, whose
    /// traffic is `traffic`. `counts`: the layer counts the bytes (a command
    /// that reads and writes the pair itself: nothing else does).
    pub fn new(mut conn: ServerConnection, traffic: Arc<Traffic>, counts: bool) -> Layer {
        // The layer bounds what waits itself: it reads no plaintext while
        // records wait for the client, and a turn reads at most TURN.
        conn.set_buffer_limit(None);
        Layer {
            conn,
            pending: Vec::new(),
            output_done: false,
            client_sends: true,
            feeding: true,
            traffic,
            counts,
        }
    }

    /// Moves the pair's plaintext to the client as records, and the
    /// client's plaintext to the pair (until the pair stops taking it); the
    /// client's end shuts the pair down for writing. Safe to cancel: what
    /// was read is kept in the layer.
    async fn pump(&mut self, tcp: &AsyncFd<OwnedFd>, plain: &AsyncFd<OwnedFd>) -> Pumped {
        // No more plaintext is read than the client's socket takes now.
        let mut room = Room::of(tcp.get_ref());
        let mut full = false;
        loop {
            if self.output_done && !self.conn.wants_write() {
                return Pumped::OutputEnded;
            }
            if !self.feeding {
                self.pending.clear();
            }
            if self.feeding && !self.client_sends && self.pending.is_empty() {
                // The client sent all it will: the pair's end-of-file.
                let _ = shutdown(plain.get_ref().as_raw_fd(), How::Write);
                self.feeding = false;
            }
            let writing = self.conn.wants_write();
            let reading = !self.output_done && !writing && !full;
            let receiving = self.client_sends && self.pending.is_empty();
            let feeding = self.feeding && !self.pending.is_empty();
            let step = tokio::select! {
                r = tcp.writable(), if writing || full => match r {
                    // The room that was waited for.
                    Ok(mut ready) if !writing => {
                        full = room.reported(&mut ready).is_none();
                        Ok(())
                    }
                    r => self.write_records(r, &mut room),
                },
                r = plain.readable(), if reading => {
                    self.encrypt(r, (tcp.get_ref(), &mut room))
                        .map(|filled| full = filled)
                }
                r = tcp.readable(), if receiving => self.read_records(r),
                r = plain.writable(), if feeding => {
                    self.feed(r);
                    Ok(())
                }
                // After its end, a client that leaves for good: the probes
                // (`fdio::keep_alive`) end in a reset or a timeout.
                _ = tcp.ready(Interest::ERROR), if !self.client_sends => {
                    Err(Pumped::ClientGone(fdio::socket_error(tcp.get_ref())))
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Between the client and the layer's end of a socket pair, whose
    /// other end (`Layer::pair`) the rest of the connection takes for the
    /// client; until both sides are done: the pair's last byte written to
    /// the client, then at most `grace` for the client's close. (Whoever
    /// runs it bounds the whole: `Transport::close`.)
    pub async fn run(
        mut self,
        tcp: &AsyncFd<OwnedFd>,
        plain: AsyncFd<OwnedFd>,
        grace: Duration,
    ) -> Outcome {
        match self.pump(tcp, &plain).await {
            Pumped::OutputEnded => {
                let _ = shutdown(plain.get_ref().as_raw_fd(), How::Write);
                self.close(tcp, grace).await;
                Outcome::Closed
            }
            Pumped::ClientGone(e) => Outcome::ClientGone(e),
            Pumped::Failed(why) => Outcome::Failed(why),
        }
    }

    /// A socket pair for [`Layer::run`]: the layer's end, registered, and
    /// the other end (nonblocking) for the rest of the connection.
    pub fn pair() -> io::Result<(AsyncFd<OwnedFd>, OwnedFd)> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )?;
        Ok((
            fdio::register(ours, Interest::READABLE | Interest::WRITABLE)?,
            theirs,
        ))
    }

    /// Ends the session in order: the close_notify after what is left, our
    /// side shut down, and the client's close awaited (its bytes dropped),
    /// all within `grace`.
    async fn close(mut self, tcp: &AsyncFd<OwnedFd>, grace: Duration) {
        self.conn.send_close_notify();
        let closing = async {
            let mut room = Room::of(tcp.get_ref());
            while self.conn.wants_write() {
                if self.write_records(tcp.writable().await, &mut room).is_err() {
                    return;
                }
            }
            let _ = shutdown(tcp.get_ref().as_raw_fd(), How::Write);
            while self.client_sends {
                let Ok(mut ready) = tcp.readable().await else {
                    return;
                };
                match self.conn.read_tls(&mut Fd(ready.get_inner())) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready.clear_ready();
                        continue;
                    }
                    Err(_) => return,
                }
                match self.conn.process_new_packets() {
                    Ok(state) if state.peer_has_closed() => return,
                    Ok(state) => {
                        let mut sink = vec![0u8; state.plaintext_bytes_to_read()];
                        let _ = self.conn.reader().read(&mut sink);
                    }
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(grace, closing).await;
    }

    /// Writes records to the client until it takes no more.
    fn write_records(&mut self, ready: Ready<'_>, room: &mut Room) -> Result<(), Pumped> {
        let mut ready = ready.map_err(|e| Pumped::ClientGone(fdio::errno(&e)))?;
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut Fd(ready.get_inner())) {
                Ok(n) => {
                    room.took(n);
                    self.traffic.active();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    room.full();
                    return Ok(());
                }
                Err(e) => return Err(Pumped::ClientGone(fdio::errno(&e))),
            }
        }
        Ok(())
    }

    /// Reads plaintext from the pair into records (rustls encrypts as it
    /// takes it), a few reads a turn, no more than the client's socket has
    /// room for. True when it has none: its room is waited for, and the
    /// plaintext waits in the pair.
    fn encrypt(
        &mut self,
        ready: Ready<'_>,
        (tcp, room): (&OwnedFd, &mut Room),
    ) -> Result<bool, Pumped> {
        let mut ready = ready.map_err(|e| Pumped::Failed(format!("the plaintext side: {e}")))?;
        // The room of a whole turn, asked once.
        let mut space = match room.for_read(tcp, TURN) {
            0 => return Ok(true),
            space => space.min(TURN),
        };
        while space > RECORD_OVERHEAD {
            let ask = (space - RECORD_OVERHEAD).min(CHUNK);
            match seal_chunk(ready.get_inner(), &mut self.conn, ask) {
                Ok(0) => {
                    self.output_done = true;
                    return Ok(false);
                }
                Ok(n) => {
                    room.took(n + RECORD_OVERHEAD);
                    space -= n + RECORD_OVERHEAD;
                    if self.counts {
                        self.traffic.sent(n);
                    }
                    if n < ask {
                        // Drained for now (a newer readiness survives the clear).
                        ready.clear_ready();
                        return Ok(false);
                    }
                }
                Err(Errno::EAGAIN) => {
                    ready.clear_ready();
                    return Ok(false);
                }
                // The other end closed with input unread.
                Err(e) if fdio::class(e) == Class::Disconnect => {
                    self.output_done = true;
                    return Ok(false);
                }
                Err(e) => {
                    return Err(Pumped::Failed(format!(
                        "reading the plaintext side: {}",
                        e.desc()
                    )))
                }
            }
        }
        Ok(false)
    }

    /// Reads records from the client and decrypts them; counted as received,
    /// or as dropped when the command does not take them.
    fn read_records(&mut self, ready: Ready<'_>) -> Result<(), Pumped> {
        let taken = self.feeding;
        let mut ready = ready.map_err(|e| Pumped::ClientGone(fdio::errno(&e)))?;
        match self.conn.read_tls(&mut Fd(ready.get_inner())) {
            Ok(0) => {
                self.client_sends = false;
                fdio::keep_alive(ready.get_inner());
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                ready.clear_ready();
                return Ok(());
            }
            Err(e) => return Err(Pumped::ClientGone(fdio::errno(&e))),
        }
        let state = match self.conn.process_new_packets() {
            Ok(state) => state,
            Err(e) => {
                // The alert that says why, if the socket takes it now.
                let _ = self.conn.write_tls(&mut Fd(ready.get_inner()));
                return Err(Pumped::Failed(e.to_string()));
            }
        };
        let want = state.plaintext_bytes_to_read();
        if want > 0 {
            let at = self.pending.len();
            self.pending.resize(at + want, 0);
            let n = self
                .conn
                .reader()
                .read(&mut self.pending[at..])
                .unwrap_or(0);
            self.pending.truncate(at + n);
            match self.counts {
                true if taken => self.traffic.received(n),
                true => self.traffic.dropped(n as u64),
                false => {}
            }
        }
        if state.peer_has_closed() && self.client_sends {
            self.client_sends = false;
            fdio::keep_alive(ready.get_inner());
        }
        Ok(())
    }

    /// Gives the pair the client's bytes; once it no longer takes them,
    /// they are dropped.
    fn feed(&mut self, ready: Ready<'_>) {
        let Ok(mut ready) = ready else {
            self.feeding = false;
            return;
        };
        match retry(|| nix::unistd::write(ready.get_inner(), &self.pending)) {
            Ok(n) => {
                self.pending.drain(..n);
                if self.pending.capacity() > 4 * CHUNK {
                    self.pending.shrink_to_fit();
                }
            }
            Err(Errno::EAGAIN) => ready.clear_ready(),
            Err(_) => self.feeding = false,
        }
    }
}

type Ready<'a> = io::Result<AsyncFdReadyGuard<'a, OwnedFd>>;

/// One read of at most `ask` bytes of plaintext, handed to rustls. Ok(0) at
/// end-of-file.
fn seal_chunk(fd: &OwnedFd, conn: &mut ServerConnection, ask: usize) -> Result<usize, Errno> {
    let mut buf = [0u8; CHUNK];
    let n = retry(|| nix::unistd::read(fd, &mut buf[..ask.min(CHUNK)]))?;
    if n > 0 {
        // Without a buffer limit rustls takes everything, encrypted as it goes.
        conn.writer()
            .write_all(&buf[..n])
            .map_err(|e| fdio::errno(&e))?;
    }
    Ok(n)
}

fn retry<R>(mut op: impl FnMut() -> nix::Result<R>) -> nix::Result<R> {
    loop {
        match op() {
            Err(Errno::EINTR) => {}
            other => return other,
        }
    }
}
