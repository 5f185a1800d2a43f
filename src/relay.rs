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

/// Size of the user-space buffer on the read/write path.
const COPY_BUFFER: usize = 64 * 1024;

/// How the bytes move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// splice(2), falling back to copying where a pair refuses it.
    Splice,
    /// read(2)/write(2) through a buffer.
    Copy,
}

/// How a [`pump`] ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pumped {
    /// The source reached end-of-file and everything read was written.
    EndOfFile,
    /// `max` bytes were written; the rest stays in the source.
    Limit,
}

/// Moves everything from `src` to `dst` until `src` reaches end-of-file, or
/// `max` bytes have moved. `moved` is called with each write's length.
///
/// `chunk` bounds one splice call (the pipe's size is a good value). An error
/// is the errno of whichever side failed; the caller knows which end is the
/// socket and decides what the errno means.
pub async fn pump(
    src: &AsyncFd<OwnedFd>,
    dst: &AsyncFd<OwnedFd>,
    mode: Mode,
    chunk: usize,
    max: Option<u64>,
    moved: impl FnMut(usize),
) -> Result<Pumped, Errno> {
    let mut budget = Budget {
        left: max.unwrap_or(u64::MAX),
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
    moved: F,
}

impl<F: FnMut(usize)> Budget<F> {
    fn spend(&mut self, n: usize) {
        self.left -= n as u64;
        (self.moved)(n);
    }

    /// At most `want`, within what is left.
    fn ask(&self, want: usize) -> usize {
        want.min(usize::try_from(self.left).unwrap_or(usize::MAX))
    }
}

enum Spliced {
    Done(Result<Pumped, Errno>),
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
            (Err(e), _) | (_, Err(e)) => return Spliced::Done(Err(fdio::errno(&e))),
        };
        let ask = budget.ask(chunk);
        match splice(src.get_ref(), None, dst.get_ref(), None, ask, flags) {
            Ok(0) if really_ended(src.get_ref()) => return Spliced::Done(Ok(Pumped::EndOfFile)),
            Ok(0) => return Spliced::Fallback("splice(2) stopped at a TCP urgent mark"),
            Ok(n) => {
                budget.spend(n);
                stuck = 0;
                // Less than asked: one end is probably drained or full. One
                // poll says which, instead of a splice that would return
                // EAGAIN and then the same poll. (Hang-up counts as ready, so
                // end-of-file is still seen by the next splice.)
                if n < ask {
                    match blocked_side(src.get_ref(), dst.get_ref()) {
                        Side::Dst => writable.clear_ready(),
                        Side::Src => readable.clear_ready(),
                        Side::Neither => {}
                    }
                }
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => match blocked_side(src.get_ref(), dst.get_ref()) {
                Side::Dst => writable.clear_ready(),
                Side::Src => readable.clear_ready(),
                Side::Neither => {
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
            Err(e) => return Spliced::Done(Err(e)),
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

enum Side {
    Src,
    Dst,
    Neither,
}

/// Which end made splice return `EAGAIN`: one poll(2) of both, no waiting.
fn blocked_side(src: &OwnedFd, dst: &OwnedFd) -> Side {
    let mut fds = [
        PollFd::new(src.as_fd(), PollFlags::POLLIN),
        PollFd::new(dst.as_fd(), PollFlags::POLLOUT),
    ];
    if poll(&mut fds, PollTimeout::ZERO).is_err() {
        return Side::Neither;
    }
    // Hang-ups and errors count as ready: the next splice reports them.
    let any = |fd: &PollFd, flag: PollFlags| {
        fd.revents()
            .is_some_and(|r| r.intersects(flag | PollFlags::POLLHUP | PollFlags::POLLERR))
    };
    if !any(&fds[1], PollFlags::POLLOUT) {
        Side::Dst
    } else if !any(&fds[0], PollFlags::POLLIN) {
        Side::Src
    } else {
        Side::Neither
    }
}

/// read(2)/write(2) through a buffer, for `Mode::Copy` and for pairs splice
/// refuses. Readiness is unambiguous here: each call touches one side.
async fn copy_loop(
    src: &AsyncFd<OwnedFd>,
    dst: &AsyncFd<OwnedFd>,
    budget: &mut Budget<impl FnMut(usize)>,
) -> Result<Pumped, Errno> {
    // The buffer exists only while data moves: an idle connection (a slow
    // stream between two lines) holds none.
    let mut slot: Option<Vec<u8>> = None;
    loop {
        if budget.left == 0 {
            return Ok(Pumped::Limit);
        }
        let mut ready = src.readable().await.map_err(|e| fdio::errno(&e))?;
        let buf = slot.get_or_insert_with(|| vec![0u8; COPY_BUFFER]);
        let want = budget.ask(buf.len());
        let read = ready.try_io(|fd| {
            nix::unistd::read(fd.get_ref(), &mut buf[..want]).map_err(std::io::Error::from)
        });
        let len = match read {
            Ok(Ok(0)) => return Ok(Pumped::EndOfFile),
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => return Err(fdio::errno(&e)),
            // Drained: give the buffer back while waiting for more.
            Err(_would_block) => {
                slot = None;
                continue;
            }
        };
        let mut done = 0;
        while done < len {
            let n = fdio::write_with(dst, |fd| nix::unistd::write(fd, &buf[done..len])).await?;
            done += n;
            budget.spend(n);
        }
    }
}
