//! The copy loop: read(2) and write(2) through a buffer sized to the flow.

use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::time::Duration;

use nix::errno::Errno;
use tokio::io::unix::AsyncFd;
use tokio::time::{Instant, Sleep};

use super::bulk::{self, Marked, Offload};
use super::{Budget, Failed, Pumped, Side};
use crate::fdio::{self, Room};
use crate::sys::Pages;

/// read(2)/write(2), for `Mode::Copy` and for pairs splice refuses.
/// Readiness is unambiguous here: each call touches one side.
///
/// Two speeds. A trickle (lines) is read into a small buffer on the stack
/// of a plain function and written at once: per line one read, one write,
/// and no buffer held while the connection waits (a thousand idle streams
/// hold none). A read that fills it switches to a bulk buffer (pages of its
/// own, [`Pages`], so that freeing it gives the memory back) that grows
/// while reads keep filling it, up to `COPY_MAX`, so bulk moves in few
/// large calls. It is kept while the source pauses between bursts (bulk
/// output outruns its producer now and then) and freed when a read brings
/// no more than a trickle again.
///
/// No more is read than the destination takes now ([`Room`]): when a
/// client reads slower than the command writes, the output waits in the
/// command's pipe or socket pair, where it holds the command back, and not
/// here. A destination that stays full for `STALL` frees the bulk buffer
/// (what little of it the destination had not taken is kept on the heap):
/// a stalled connection costs its kernel buffers, not a buffer of the
/// daemon's.
pub(super) async fn copy_loop(
    src: &AsyncFd<OwnedFd>,
    dst: &AsyncFd<OwnedFd>,
    budget: &mut Budget<impl FnMut(usize) + Clone + Send + 'static>,
) -> Result<Pumped, Failed> {
    let (reading, writing) = (Failed::at(Side::Source), Failed::at(Side::Destination));
    let mut room = Room::of(dst.get_ref());
    let mut bulk = Bulk::default();
    let mut stall = Stall::new();
    // Bytes read that the destination has not taken yet, off the buffers.
    let mut held: Vec<u8> = Vec::new();
    loop {
        if !held.is_empty() {
            // The waits for a full destination are boxed (here and below):
            // the loop's future is held by every connection for its whole
            // life, and only a connection that meets a full client needs them.
            Box::pin(write_all(dst, &held, budget)).await?;
            held = Vec::new();
        }
        if budget.left == 0 {
            return Ok(Pumped::Limit);
        }
        let mut ready = src.readable().await.map_err(|e| reading(fdio::errno(&e)))?;
        let want = budget.ask(bulk.buf.as_ref().map_or(COPY_SMALL, |b| b.len()));
        let space = room.for_read(dst.get_ref(), want);
        if space == 0 {
            // The destination is full: wait for it, not for more input.
            Box::pin(wait_for_room(dst, (&mut room, want), &mut bulk, &mut stall))
                .await
                .map_err(&writing)?;
            continue;
        }
        let ask = want.min(space);
        let Some(buf) = bulk.buf.as_mut() else {
            match copy_small((src.get_ref(), dst.get_ref()), ask, budget, &mut room)? {
                Small::EndOfFile => return Ok(Pumped::EndOfFile),
                Small::Dry => ready.clear_ready(),
                Small::Copied { read, rest } => {
                    held = rest;
                    if read < ask {
                        // A short read: the source is dry for now. (A newer
                        // readiness event survives the clear: tokio checks.)
                        ready.clear_ready();
                    } else if ask == COPY_SMALL {
                        bulk.make();
                        stall.progress();
                    }
                }
            }
            continue;
        };
        let n = match read_ready(&mut ready, &mut buf[..ask]).map_err(&reading)? {
            Some(0) => return Ok(Pumped::EndOfFile),
            Some(n) => n,
            // Dry (the readiness is cleared): wait, buffer kept.
            None => continue,
        };
        budget.read(n);
        let (sent, failed) = write_now(dst.get_ref(), &buf[..n]);
        budget.spend(sent);
        room.took(sent);
        if let Some(errno) = failed {
            return Err(writing(errno));
        }
        if sent > 0 {
            stall.progress();
        }
        if sent < n {
            room.full();
            let stalled = Box::pin(finish(dst, &buf[sent..n], budget, &mut stall));
            if let Some(at) = stalled.await? {
                held = buf[sent + at..n].to_vec();
                bulk.free();
                continue;
            }
        }
        if n < ask {
            ready.clear_ready();
        }
        if let Some(buf) = bulk.after_read(n, ask) {
            // Boxed: only a bulk stream waits for its thread.
            match Box::pin(bulk::offload(src, dst, buf, budget)).await? {
                Offload::Stayed(buf) => bulk.put_back(Some(buf)),
                Offload::Done(pumped) => return Ok(pumped),
                Offload::Back { buf, held: rest } => {
                    bulk.put_back(buf);
                    held = rest;
                    room.full();
                    stall.progress();
                }
            }
        }
    }
}

/// One read into `buf` from a source said to be readable: the bytes read
/// (0 at its end), or None if it was dry after all (its readiness cleared).
fn read_ready(
    ready: &mut tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>,
    buf: &mut [u8],
) -> Result<Option<usize>, Errno> {
    let read = ready.try_io(|fd| loop {
        match fdio::read(fd.get_ref(), buf) {
            Err(Errno::EINTR) => continue,
            other => break other.map_err(std::io::Error::from),
        }
    });
    match read {
        Ok(Ok(n)) => Ok(Some(n)),
        Ok(Err(e)) => Err(fdio::errno(&e)),
        Err(_would_block) => Ok(None),
    }
}

/// The bulk buffer, and what decides its life: it grows while reads fill
/// it; it is freed once bulk has stopped; its stream moves to a thread of
/// its own once that is worth it ([`bulk::worth_a_thread`]).
struct Bulk {
    buf: Option<Pages>,
    /// Reads in a row that brought no more than a trickle into it, and
    /// when one last brought more.
    trickles: u8,
    since: Instant,
    /// Bytes through it, and reads, since it was made (or came back).
    through: u64,
    reads: u64,
    /// Counted among the bulk streams while it has a buffer.
    marked: Marked,
}

impl Default for Bulk {
    fn default() -> Bulk {
        Bulk {
            buf: None,
            trickles: 0,
            since: Instant::now(),
            through: 0,
            reads: 0,
            marked: Marked::default(),
        }
    }
}

impl Bulk {
    /// A read filled the small buffer: bulk begins (without the memory
    /// for it, trickles go on).
    fn make(&mut self) {
        self.buf = Pages::new(COPY_BULK).ok();
        self.since = Instant::now();
    }

    /// After a read of `n` into the buffer (of `ask` asked for), written
    /// since: a read that filled it makes it grow (up to `COPY_MAX`); a
    /// read that brought no more than a trickle frees it once bulk has
    /// stopped: `TRICKLES` such reads in a row, or one that comes `STALL`
    /// after the last larger read (a burst, then lines). When the stream
    /// should move to a thread now: the buffer, taken for it (its stream is
    /// counted there, not here).
    ///
    /// One such read amid bulk is not enough: a producer that writes in
    /// small pieces (`head -c` writes 8 KiB at a time) leaves a short read
    /// now and then in the middle of its bulk, and a buffer freed and made
    /// again there costs its mapping and a page fault for each of its pages.
    fn after_read(&mut self, n: usize, ask: usize) -> Option<Pages> {
        let buf = self.buf.as_mut()?;
        if n < ask && n < COPY_SMALL {
            self.trickles += 1;
            if self.trickles >= TRICKLES || self.since.elapsed() >= STALL {
                self.free();
                return None;
            }
        } else {
            (self.trickles, self.since) = (0, Instant::now());
            if n == buf.len() && buf.len() < COPY_MAX {
                // Empty now: a larger one replaces it.
                if let Ok(larger) = Pages::new(buf.len() * 4) {
                    *buf = larger;
                }
            }
        }
        self.marked.set(true);
        (self.through, self.reads) = (self.through + n as u64, self.reads + 1);
        if !bulk::worth_a_thread(self.through, self.reads) {
            return None;
        }
        self.marked.set(false);
        self.buf.take()
    }

    /// Bulk has stopped (or its destination stalled): the buffer is given
    /// back, and the stream is no longer counted among the bulk streams.
    fn free(&mut self) {
        *self = Bulk::default();
    }

    /// Back from a thread, or not gone: counting starts again.
    fn put_back(&mut self, buf: Option<Pages>) {
        self.marked.set(buf.is_some());
        (self.buf, self.through, self.reads) = (buf, 0, 0);
    }
}

/// Reads in a row that bring no more than a trickle, amid bulk, before the
/// bulk buffer is freed.
pub(super) const TRICKLES: u8 = 16;

/// How long a destination may stay full before the bulk buffer is freed.
/// Bulk to a client that reads waits far less between writes.
pub(super) const STALL: Duration = Duration::from_millis(50);

/// When the destination last took bytes, and the timer that looks at it.
/// The timer is set again when it fires (at most once per `STALL`), not at
/// every wait: setting a timer that comes due before the others wakes the
/// thread that keeps them. It is made (boxed) at the first wait for a full
/// destination: a connection that never meets one keeps no room for it.
struct Stall {
    last: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Stall {
    fn new() -> Stall {
        Stall {
            last: Instant::now(),
            timer: None,
        }
    }

    /// The timer, due `STALL` after the destination last took bytes.
    fn timer(&mut self) -> Pin<&mut Sleep> {
        let due = self.last + STALL;
        self.timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)))
            .as_mut()
    }

    /// The destination took bytes.
    fn progress(&mut self) {
        self.last = Instant::now();
    }

    /// The timer fired: true if the destination has taken nothing for
    /// `STALL`; else the timer is set for `STALL` after it last did.
    fn fired(&mut self) -> bool {
        let due = self.last + STALL;
        if Instant::now() >= due {
            return true;
        }
        self.timer().reset(due);
        false
    }
}

/// Waits until the destination has room; once it has taken nothing for
/// `STALL`, the bulk buffer is freed.
async fn wait_for_room(
    dst: &AsyncFd<OwnedFd>,
    (room, want): (&mut Room, usize),
    bulk: &mut Bulk,
    stall: &mut Stall,
) -> Result<(), Errno> {
    while bulk.buf.is_some() {
        tokio::select! {
            waited = room.wait(dst, want) => return waited.map(drop),
            () = stall.timer() => if stall.fired() {
                bulk.free();
            },
        }
    }
    room.wait(dst, COPY_SMALL.min(want)).await.map(drop)
}

/// Writes `bytes` as the destination takes them, until it has taken
/// nothing for `STALL`: then Some(how much was written).
async fn finish(
    dst: &AsyncFd<OwnedFd>,
    bytes: &[u8],
    budget: &mut Budget<impl FnMut(usize)>,
    stall: &mut Stall,
) -> Result<Option<usize>, Failed> {
    let writing = Failed::at(Side::Destination);
    let mut at = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        // The write is cancelled only while it waits for readiness, never
        // after it wrote.
        tokio::select! {
            n = fdio::write_with(dst, |fd| nix::unistd::write(fd, rest)) => {
                let n = n.map_err(&writing)?;
                at += n;
                budget.spend(n);
                stall.progress();
            }
            () = stall.timer() => if stall.fired() {
                return Ok(Some(at));
            },
        }
    }
    Ok(None)
}

/// Writes as much of `bytes` as `dst` takes now: how much, and the
/// destination's error if it had one.
fn write_now(dst: &OwnedFd, bytes: &[u8]) -> (usize, Option<Errno>) {
    let mut written = 0;
    while written < bytes.len() {
        match nix::unistd::write(dst, &bytes[written..]) {
            Ok(n) => written += n,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => break,
            Err(e) => return (written, Some(e)),
        }
    }
    (written, None)
}

/// The stack buffer of a trickle.
pub(super) const COPY_SMALL: usize = 16 * 1024;
/// The heap buffer's first size, and its largest.
const COPY_BULK: usize = 64 * 1024;
const COPY_MAX: usize = 1 << 20;

enum Small {
    EndOfFile,
    /// Nothing to read (EAGAIN).
    Dry,
    /// `read` bytes were read, and counted with those written; `rest` of
    /// them could not be written yet.
    Copied {
        read: usize,
        rest: Vec<u8>,
    },
}

/// One read into a buffer on the stack of a plain function (not of the
/// future, which every idle connection would carry), written at once, and
/// counted; an error writing comes once what moved is counted.
fn copy_small(
    (src, dst): (&OwnedFd, &OwnedFd),
    ask: usize,
    budget: &mut Budget<impl FnMut(usize)>,
    room: &mut Room,
) -> Result<Small, Failed> {
    let mut buf = [0u8; COPY_SMALL];
    let read = loop {
        match fdio::read(src, &mut buf[..ask]) {
            Ok(0) => return Ok(Small::EndOfFile),
            Ok(n) => break n,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return Ok(Small::Dry),
            Err(e) => return Err(Failed::at(Side::Source)(e)),
        }
    };
    let (written, failed) = write_now(dst, &buf[..read]);
    budget.read(read);
    budget.spend(written);
    room.took(written);
    if let Some(errno) = failed {
        return Err(Failed::at(Side::Destination)(errno));
    }
    if written < read {
        room.full();
    }
    let rest = buf[written..read].to_vec();
    Ok(Small::Copied { read, rest })
}

/// Writes all of `bytes` to `dst` as it takes them, counting each write.
async fn write_all(
    dst: &AsyncFd<OwnedFd>,
    bytes: &[u8],
    budget: &mut Budget<impl FnMut(usize)>,
) -> Result<(), Failed> {
    let writing = Failed::at(Side::Destination);
    fdio::write_all(dst, bytes, |n| budget.spend(n))
        .await
        .map_err(writing)
}
