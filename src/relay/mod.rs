//! Moving bytes between two descriptors as the event loop reports them
//! ready: no thread per connection, no busy loop.
//!
//! One [`pump`] moves a direction until its source ends: the command's
//! output to the client's socket, and with `stdin = "client"` the socket to
//! the command's stdin. Two ways, as the service's `transfer` says:
//!
//! - `splice`: splice(2), zero-copy, page references moved from the pipe to
//!   the socket; it falls back to copying where a pair refuses it;
//! - `copy`: read(2)/write(2) through a buffer sized to the flow (the
//!   default, through a socket pair: fewer wake-ups than splice for bulk).

mod bulk;
mod copy;
mod splice;

use std::os::fd::OwnedFd;

use nix::errno::Errno;
use tokio::io::unix::AsyncFd;

use copy::copy_loop;
use splice::{splice_loop, Spliced};

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
    moved: impl FnMut(usize) + Clone + Send + 'static,
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

/// What may still move, and who is told of what did (from a bulk thread
/// too: a copy of it goes there).
#[derive(Clone)]
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

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use tokio::io::Interest;

    use super::*;
    use crate::{fdio, sys};

    const MIB: usize = 1 << 20;

    /// A count of the bytes a pump says it moved.
    fn counter(total: &Arc<AtomicUsize>) -> impl FnMut(usize) + Clone + Send + 'static {
        let total = Arc::clone(total);
        move |n| {
            total.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// A pipe holding `bytes` (a pattern), registered for reading, its
    /// write end closed (end-of-file after the bytes).
    fn full_pipe(bytes: usize) -> AsyncFd<OwnedFd> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).unwrap();
        fcntl(&w, FcntlArg::F_SETPIPE_SZ(bytes as i32)).unwrap();
        let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
        assert_eq!(nix::unistd::write(&w, &data), Ok(bytes));
        fdio::register(r, Interest::READABLE).unwrap()
    }

    /// A client that reads nothing takes only what its socket holds: the
    /// rest of the output stays in the command's pipe, not in the relay;
    /// once it reads, everything arrives, in order.
    #[tokio::test]
    async fn a_reader_that_stops_leaves_the_output_in_the_pipe() {
        for mode in [Mode::Copy, Mode::Splice] {
            let src = full_pipe(MIB);
            let (ours, client) = UnixStream::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            let dst = fdio::register(ours.into(), Interest::WRITABLE).unwrap();
            let sent = Arc::new(AtomicUsize::new(0));
            let client = {
                let count = counter(&sent);
                let pumped = pump(&src, &dst, mode, MIB, (None, Count::Writes), count);
                tokio::pin!(pumped);
                let stalled = tokio::time::timeout(Duration::from_millis(300), &mut pumped).await;
                assert!(stalled.is_err(), "{mode:?}: nobody reads, so it cannot end");
                let left = sys::readable_bytes(src.get_ref().as_fd()).unwrap();
                let in_socket = sys::readable_bytes(client.as_fd()).unwrap();
                let held = MIB - left - in_socket;
                assert!(
                    held <= 4096,
                    "{mode:?}: the relay holds {held} bytes ({left} in the pipe, {in_socket} in the socket)"
                );
                let reader = std::thread::spawn(move || {
                    let mut got = Vec::new();
                    (&client).read_to_end(&mut got).unwrap();
                    got
                });
                assert_eq!(pumped.await, Ok(Pumped::EndOfFile), "{mode:?}");
                reader
            };
            drop(dst);
            let got = client.join().unwrap();
            let sent = sent.load(Ordering::Relaxed);
            assert_eq!(sent, MIB);
            assert!(got.len() == MIB && got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        }
    }

    /// `max` is exact however little room the destination has at a time.
    #[tokio::test]
    async fn the_limit_is_exact_through_a_slow_reader() {
        let src = full_pipe(MIB);
        let (ours, client) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let dst = fdio::register(ours.into(), Interest::WRITABLE).unwrap();
        let reader = std::thread::spawn(move || {
            let (mut got, mut buf) = (0, [0u8; 1000]);
            loop {
                std::thread::sleep(Duration::from_micros(200));
                match (&client).read(&mut buf) {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got += n,
                }
            }
        });
        let max = 300_001;
        let sent = Arc::new(AtomicUsize::new(0));
        let counted = (Some(max), Count::Writes);
        let pumped = pump(&src, &dst, Mode::Copy, MIB, counted, counter(&sent));
        assert_eq!(pumped.await, Ok(Pumped::Limit));
        drop(dst);
        assert_eq!(reader.join().unwrap(), max as usize);
        assert_eq!(sent.load(Ordering::Relaxed), max as usize);
    }
}
