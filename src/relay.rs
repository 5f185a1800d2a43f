//! The splice loop: moves bytes from one descriptor to another as the event
//! loop reports them ready. No thread per connection, no busy loop, and on the
//! splice path nothing is copied through user space.
//!
//! One [`pump`] moves a direction until its source ends: the command's stdout
//! pipe to the client's socket, and with `stdin = "client"` the socket to the
//! command's stdin pipe. The two ends are registered with the event loop; the
//! loop splices while both report ready and stops on `EAGAIN`.
//!
//! `EAGAIN` from splice does not say which side blocked. Clearing the readiness
//! of the wrong side would wait forever for an edge that never comes, so on
//! `EAGAIN` one zero-timeout poll(2) of both ends decides: the side that is not
//! ready is the one to wait for. The kernel can change its mind between the
//! splice and the poll (data arrives, space frees); then both look ready and
//! the splice is simply tried again.

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{splice, SpliceFFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::io::unix::AsyncFd;

use crate::fdio;

/// How the bytes move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// splice(2), falling back to copying where a pair refuses it.
    Splice,
    /// read(2)/write(2) through a buffer.
    Copy,
}

/// Why a [`pump`] stopped early: the errno, and which side gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failed {
    pub errno: Errno,
    pub side: Side,
}

/// Which descriptor of a [`pump`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
    /// splice(2) touches both, and its errno does not say which.
    Either,
}

impl Failed {
    fn at(side: Side) -> impl Fn(Errno) -> Failed {
        move |errno| Failed { errno, side }
    }
}

/// How a [`pump`] ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pumped {
    /// The source reached end-of-file and everything read was written.
    EndOfFile,
    /// `max` bytes were written; the rest stays in the source.
    Limit,
}

/// Where a [`pump`] counts the bytes it moves: at the client's side, so a
/// connection's counts are what the client sent and got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Each read (the source is the client).
    Reads,
    /// Each write (the destination is the client).
    Writes,
}

/// Moves everything from `src` to `dst` until `src` reaches end-of-file, or
/// `max` bytes have been written. `moved` is called with the length of each
/// read or each write, as `count` says.
///
/// `chunk` bounds one splice call (the pipe's size is a good value). An error
/// says which side failed, where that is known; the caller knows which end
/// is the socket and decides what it means.
pub async fn pump(
    src: &AsyncFd<OwnedFd>,
    dst: &AsyncFd<OwnedFd>,
    mode: Mode,
    chunk: usize,
    (max, count): (Option<u64>, Count),
    moved: impl FnMut(usize),
) -> Result<Pumped, Failed> {
    let mut budget = Budget {
        left: max.unwrap_or(u64::MAX),
        count,
        moved,
    };
    if mode == Mode::Splice {
        match splice_loop(src, dst, chunk, &mut budget).await {
            Spliced::Done(r) => return r,
            Spliced::Fallback(why) => {
                tracing::warn!("{why}; copying through a buffer for the rest of this connection");
            }
        }
    }
    copy_loop(src, dst, &mut budget).await
}

/// What may still move, and who is told of what did.
struct Budget<F> {
    left: u64,
    count: Count,
    moved: F,
}

impl<F: FnMut(usize)> Budget<F> {
    /// `n` bytes were read.
    fn read(&mut self, n: usize) {
        if self.count == Count::Reads {
            (self.moved)(n);
        }
    }

    /// `n` bytes were written.
    fn spend(&mut self, n: usize) {
        self.left -= n as u64;
        if self.count == Count::Writes {
            (self.moved)(n);
        }
    }

    /// `n` bytes were read and written at once (splice).
    fn both(&mut self, n: usize) {
        self.left -= n as u64;
        (self.moved)(n);
    }

    /// At most `want`, within what is left.
    fn ask(&self, want: usize) -> usize {
        want.min(usize::try_from(self.left).unwrap_or(usize::MAX))
    }
}

enum Spliced {
    Done(Result<Pumped, Failed>),
    /// splice cannot go on with this pair; read/write can.
    Fallback(&'static str),
}

/// Rounds in a row in which splice says EAGAIN while poll says both ends are
/// ready. A TCP urgent byte does that for good (splice stops at the mark,
/// read(2) steps over it); a race clears after one round.
const STUCK_ROUNDS: u32 = 4;

async fn splice_loop(
    src: &AsyncFd<OwnedFd>,
    dst: &AsyncFd<OwnedFd>,
    chunk: usize,
    budget: &mut Budget<impl FnMut(usize)>,
) -> Spliced {
    // SPLICE_F_MORE is not used: it corks TCP, holding back a short line until
    // more comes, and the client must see output as soon as the command writes it.
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut stuck = 0u32;
    loop {
        // Before waiting: once the limit is reached, the rest may never come.
        if budget.left == 0 {
            return Spliced::Done(Ok(Pumped::Limit));
        }
        let (mut readable, mut writable) = match (src.readable().await, dst.writable().await) {
            (Ok(r), Ok(w)) => (r, w),
            (Err(e), _) => return Spliced::Done(Err(Failed::at(Side::Source)(fdio::errno(&e)))),
            (_, Err(e)) => {
                return Spliced::Done(Err(Failed::at(Side::Destination)(fdio::errno(&e))))
            }
        };
        let ask = budget.ask(chunk);
        match splice(src.get_ref(), None, dst.get_ref(), None, ask, flags) {
            Ok(0) if really_ended(src.get_ref()) => return Spliced::Done(Ok(Pumped::EndOfFile)),
            Ok(0) => return Spliced::Fallback("splice(2) stopped at a TCP urgent mark"),
            Ok(n) => {
                budget.both(n);
                stuck = 0;
                // Less than asked: one end is probably drained or full. One
                // poll says which, instead of a splice that would return
                // EAGAIN and then the same poll. (Hang-up counts as ready, so
                // end-of-file is still seen by the next splice.)
                if n < ask {
                    match blocked_side(src.get_ref(), dst.get_ref()) {
                        Blocked::Dst => writable.clear_ready(),
                        Blocked::Src => readable.clear_ready(),
                        Blocked::Neither => {}
                    }
                }
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => match blocked_side(src.get_ref(), dst.get_ref()) {
                Blocked::Dst => writable.clear_ready(),
                Blocked::Src => readable.clear_ready(),
                Blocked::Neither => {
                    stuck += 1;
                    if stuck >= STUCK_ROUNDS {
                        return Spliced::Fallback(
                            "splice(2) makes no progress on ready descriptors",
                        );
                    }
                }
            },
            Err(Errno::EINVAL) => {
                return Spliced::Fallback("splice(2) refused this pair of descriptors")
            }
            // The kernel's TLS met a record that is not data: read(2) takes it.
            Err(Errno::EIO) => {
                return Spliced::Fallback("splice(2) met a TLS record that is not data")
            }
            Err(e) => return Spliced::Done(Err(Failed::at(Side::Either)(e))),
        }
    }
}

/// Whether a splice that moved nothing means end-of-file. From a pipe it
/// does. From a TCP socket it also happens at an urgent mark once the client
/// has half-closed, with data still to read: a peek tells the two apart.
fn really_ended(src: &OwnedFd) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    let mut byte = [0u8; 1];
    match recv(
        std::os::fd::AsRawFd::as_raw_fd(src),
        &mut byte,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(n) => n == 0,
        Err(Errno::ENOTSOCK) => true,
        Err(_) => false,
    }
}

/// Which end of a splice is not ready.
enum Blocked {
    Src,
    Dst,
    Neither,
}

/// Which end made splice return `EAGAIN`: one poll(2) of both, no waiting.
fn blocked_side(src: &OwnedFd, dst: &OwnedFd) -> Blocked {
    let mut fds = [
        PollFd::new(src.as_fd(), PollFlags::POLLIN),
        PollFd::new(dst.as_fd(), PollFlags::POLLOUT),
    ];
    if poll(&mut fds, PollTimeout::ZERO).is_err() {
        return Blocked::Neither;
    }
    // Hang-ups and errors count as ready: the next splice reports them.
    let any = |fd: &PollFd, flag: PollFlags| {
        fd.revents()
            .is_some_and(|r| r.intersects(flag | PollFlags::POLLHUP | PollFlags::POLLERR))
    };
    if !any(&fds[1], PollFlags::POLLOUT) {
        Blocked::Dst
    } else if !any(&fds[0], PollFlags::POLLIN) {
        Blocked::Src
    } else {
        Blocked::Neither
    }
}

/// read(2)/write(2), for `Mode::Copy` and for pairs splice refuses.
/// Readiness is unambiguous here: each call touches one side.
///
/// Two speeds. A trickle (lines) is read into a small buffer on the stack
/// of a plain function and written at once: per line one read, one write,
/// and no buffer held while the connection waits (a thousand idle streams
/// hold none). A read that fills it switches to a buffer on the heap that
/// grows while reads keep filling it, up to `COPY_MAX`, so bulk moves in few
/// large calls. It is kept while the source pauses between bursts (bulk
/// output outruns its producer now and then) and freed when a read brings
/// no more than a trickle again.
async fn copy_loop(
    src: &AsyncFd<OwnedFd>,
    dst: &AsyncFd<OwnedFd>,
    budget: &mut Budget<impl FnMut(usize)>,
) -> Result<Pumped, Failed> {
    let (reading, writing) = (Failed::at(Side::Source), Failed::at(Side::Destination));
    let mut bulk: Option<Vec<u8>> = None;
    loop {
        if budget.left == 0 {
            return Ok(Pumped::Limit);
        }
        let mut ready = src.readable().await.map_err(|e| reading(fdio::errno(&e)))?;
        let Some(buf) = bulk.as_mut() else {
            let ask = budget.ask(COPY_SMALL);
            match copy_small(src.get_ref(), dst.get_ref(), ask)? {
                Small::EndOfFile => return Ok(Pumped::EndOfFile),
                Small::Dry => ready.clear_ready(),
                Small::Copied { read, rest, failed } => {
                    budget.read(read);
                    budget.spend(read - rest.len());
                    if let Some(errno) = failed {
                        return Err(writing(errno));
                    }
                    write_all(dst, &rest, budget).await.map_err(&writing)?;
                    if read == ask && ask == COPY_SMALL {
                        bulk = Some(vec![0u8; COPY_BULK]);
                    } else {
                        // A short read: the source is dry for now. (A newer
                        // readiness event survives the clear: tokio checks.)
                        ready.clear_ready();
                    }
                }
            }
            continue;
        };
        let want = budget.ask(buf.len());
        let read = ready.try_io(|fd| loop {
            match fdio::read(fd.get_ref(), &mut buf[..want]) {
                Err(Errno::EINTR) => continue,
                other => break other.map_err(std::io::Error::from),
            }
        });
        let n = match read {
            Ok(Ok(0)) => return Ok(Pumped::EndOfFile),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(reading(fdio::errno(&e))),
            // Dry (try_io cleared the readiness): wait, buffer kept.
            Err(_would_block) => continue,
        };
        budget.read(n);
        write_all(dst, &buf[..n], budget).await.map_err(&writing)?;
        if n == buf.len() && buf.len() < COPY_MAX {
            buf.resize(buf.len() * 4, 0);
        } else if n < want {
            ready.clear_ready();
            if n < COPY_SMALL {
                bulk = None;
            }
        }
    }
}

/// The stack buffer of a trickle.
const COPY_SMALL: usize = 16 * 1024;
/// The heap buffer's first size, and its largest.
const COPY_BULK: usize = 64 * 1024;
const COPY_MAX: usize = 1 << 20;

enum Small {
    EndOfFile,
    /// Nothing to read (EAGAIN).
    Dry,
    /// `read` bytes were read; `rest` of them could not be written yet,
    /// or at all (`failed`: the destination's error, once they are counted).
    Copied {
        read: usize,
        rest: Vec<u8>,
        failed: Option<Errno>,
    },
}

/// One read into a buffer on the stack of a plain function (not of the
/// future, which every idle connection would carry), written at once.
fn copy_small(src: &OwnedFd, dst: &OwnedFd, ask: usize) -> Result<Small, Failed> {
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
    let (mut written, mut failed) = (0, None);
    while written < read {
        match nix::unistd::write(dst, &buf[written..read]) {
            Ok(n) => written += n,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => break,
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    Ok(Small::Copied {
        read,
        rest: buf[written..read].to_vec(),
        failed,
    })
}

/// Writes all of `bytes` to `dst` as it takes them, counting each write.
async fn write_all(
    dst: &AsyncFd<OwnedFd>,
    bytes: &[u8],
    budget: &mut Budget<impl FnMut(usize)>,
) -> Result<(), Errno> {
    fdio::write_all(dst, bytes, |n| budget.spend(n)).await
}
