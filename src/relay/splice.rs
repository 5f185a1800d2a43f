//! The splice loop: splice(2) from the source to the destination as both
//! report ready; nothing is copied through user space.
//!
//! The two ends are registered with the event loop; the loop splices while
//! both report ready and stops on `EAGAIN`. The splices are nonblocking
//! (SPLICE_F_NONBLOCK, and the descriptors are O_NONBLOCK): a worker never
//! waits in the kernel for one connection.
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

use super::{Budget, Failed, Pumped, Side};
use crate::fdio;

/// How the splice loop stopped.
pub(super) enum Spliced {
    Done(Result<Pumped, Failed>),
    /// splice cannot go on with this pair; read/write can.
    Fallback(&'static str),
}

/// Rounds in a row in which splice says EAGAIN while poll says both ends are
/// ready. A TCP urgent byte does that for good (splice stops at the mark,
/// read(2) steps over it); a race clears after one round.
const STUCK_ROUNDS: u32 = 4;

pub(super) async fn splice_loop(
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
