//! Bulk streams on threads of their own.
//!
//! A stream whose output has turned bulk (`HANDOFF` bytes through the copy
//! loop's bulk buffer in large reads, while another stream is bulk too:
//! [`worth_a_thread`]) moves from the event loop to a thread of its own,
//! one of at most [`most_threads`] at once. There it moves with
//! plain read(2) and write(2) through the same buffer, and waits in poll(2)
//! on its two descriptors alone. It comes back to the event loop when it
//! slows: its source dry for `DRY`, `TRICKLES` trickles in a row, or its
//! destination full for the copy loop's stall time. So a few bulk streams
//! hold a thread each, and idle and slow streams, however many, hold none.
//!
//! Why a thread: the event loop's workers are shared by every connection.
//! A bulk stream on them is one task among the others, woken through the
//! loop (one worker's poll sees the event, another may run the task), and
//! its share of the CPU is the loop's. On a thread, the kernel schedules
//! the stream as a task of its own, as it does each process of socat or
//! of a C relay with a thread per connection, and wakes it as soon as its
//! socket has room. `bench/results/bulk-threads.md` has what it measured.
//!
//! What the loop guarantees holds on the thread: the bytes are counted as
//! they move, by the same budget (so `max_bytes` stays exact and
//! `idle_timeout` sees the traffic); no more is read than the destination
//! has room for (a stalled client's output waits in the command's socket
//! pair, not in the daemon); and the connection decides the end: dropping
//! its wait for the thread ([`Cancel`]) stops the thread at its next call or
//! wake, and the thread's copies of the descriptors close as it returns.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::io::unix::AsyncFd;

use super::copy::{COPY_SMALL, STALL, TRICKLES};
use super::{Budget, Failed, Pumped, Side};
use crate::fdio::{self, Room};
use crate::sys::Pages;

/// Bytes through the copy loop's bulk buffer, without it being freed,
/// before the stream moves to a thread: a few milliseconds of bulk output,
/// far more than a burst of lines.
const HANDOFF: u64 = 4 << 20;

/// What a read must bring on average, over those bytes, for the stream to
/// move: a producer that writes in small pieces (`head -c` writes 8 KiB)
/// would wake the event loop at each write while its stream is on a thread
/// (the event loop still watches the descriptor), and that costs more than
/// the thread saves. Measured in `bench/results/bulk-threads.md`.
const LARGE_READS: u64 = 64 * 1024;

/// How long a source on a thread may stay dry before its stream goes back
/// to the event loop.
const DRY: Duration = Duration::from_millis(50);

/// A bulk thread's stack: it holds no buffer (the bytes are in [`Pages`]).
const STACK: usize = 64 * 1024;

/// How many bulk threads may run at once: four for each CPU the daemon may
/// use (at least 4). Beyond it, bulk streams stay on the event loop.
fn most_threads() -> usize {
    static MOST: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MOST.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cpus * 4).clamp(4, 256)
    })
}

/// How many bulk threads run now.
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// A place among the bulk threads, held by one while it runs.
struct Slot;

impl Slot {
    fn take() -> Option<Slot> {
        RUNNING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < most_threads()).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Streams with a bulk buffer on the event loop now.
static ON_LOOP: AtomicUsize = AtomicUsize::new(0);

/// Whether a stream on the event loop has a bulk buffer, counted in
/// [`ON_LOOP`] while it says so.
#[derive(Default)]
pub(super) struct Marked(bool);

impl Marked {
    pub(super) fn set(&mut self, bulk: bool) {
        if bulk != self.0 {
            if bulk {
                ON_LOOP.fetch_add(1, Ordering::AcqRel);
            } else {
                ON_LOOP.fetch_sub(1, Ordering::AcqRel);
            }
            self.0 = bulk;
        }
    }
}

impl Drop for Marked {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// Whether a stream on the event loop with a bulk buffer, `through` bytes
/// through it in `reads` reads, should move to a thread: once it has moved
/// `HANDOFF` in large reads, and another stream is bulk too. One bulk
/// stream alone has the event loop's attention, and moves faster there
/// (`bench/results/bulk-threads.md`); several share its workers, and each
/// moves faster on a thread of its own.
pub(super) fn worth_a_thread(through: u64, reads: u64) -> bool {
    worth(through, reads, || {
        ON_LOOP.load(Ordering::Acquire) + RUNNING.load(Ordering::Acquire)
    })
}

/// [`worth_a_thread`], given how many streams are bulk now (this one too),
/// which is asked last: the counts other streams change are read only once
/// a stream has moved `HANDOFF`, not at each of its reads.
fn worth(through: u64, reads: u64, bulk: impl FnOnce() -> usize) -> bool {
    through >= HANDOFF && through / reads.max(1) >= LARGE_READS && bulk() >= 2
}

/// What an [`offload`] came back with.
pub(super) enum Offload {
    /// No thread was free (or none could start): the stream stays on the
    /// event loop, with its buffer.
    Stayed(Pages),
    /// The source ended, or the budget was spent.
    Done(Pumped),
    /// The stream slowed: the event loop takes it again, with the buffer
    /// (none if the destination stalled, as the loop frees it then) and the
    /// bytes read that the destination has not taken yet.
    Back { buf: Option<Pages>, held: Vec<u8> },
}

/// Moves the stream on a thread of its own until it slows, ends, or fails;
/// `buf` is the copy loop's bulk buffer, empty. The budget's counts go on
/// from the thread as the bytes move; what is left of it comes back.
pub(super) async fn offload<F>(
    src: &AsyncFd<OwnedFd>,
    dst: &AsyncFd<OwnedFd>,
    buf: Pages,
    budget: &mut Budget<F>,
) -> Result<Offload, Failed>
where
    F: FnMut(usize) + Clone + Send + 'static,
{
    let Some(slot) = Slot::take() else {
        return Ok(Offload::Stayed(buf));
    };
    // The thread's own copies of the descriptors: the connection may close
    // its own at any time (it decides the end), and a number closed under
    // a thread may be reused by another connection.
    let (Ok(from), Ok(to), Ok((woken, wake))) = (
        src.get_ref().try_clone(),
        dst.get_ref().try_clone(),
        nix::unistd::pipe2(OFlag::O_CLOEXEC),
    ) else {
        return Ok(Offload::Stayed(buf));
    };
    let stop = Arc::new(AtomicBool::new(false));
    let job = Job {
        src: from,
        dst: to,
        budget: budget.clone(),
        stop: Arc::clone(&stop),
        woken,
    };
    let cancel = Cancel { stop, _wake: wake };
    let (tell, told) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("bulk".into())
        .stack_size(STACK)
        .spawn(move || {
            let _slot = slot;
            let _ = tell.send(job.run(buf));
        });
    if let Err(e) = spawned {
        // The buffer went with the closure; the loop makes another.
        tracing::debug!("no bulk thread ({e}); relaying on the event loop");
        return Ok(Offload::Back {
            buf: None,
            held: Vec::new(),
        });
    }
    let Ok((ended, left, buf)) = told.await else {
        // The thread panicked: what it held is lost, and so is the stream.
        return Err(Failed {
            errno: Errno::EIO,
            side: Side::Either,
        });
    };
    drop(cancel);
    budget.left = left;
    Ok(match ended? {
        Ended::Done(pumped) => Offload::Done(pumped),
        Ended::Slowed => Offload::Back {
            buf: Some(buf),
            held: Vec::new(),
        },
        // The loop frees its buffer when the destination stalls.
        Ended::Stalled(held) => Offload::Back { buf: None, held },
    })
}

/// Stops the thread when the connection stops waiting for it: the flag for
/// a thread between calls, the pipe's closing for one asleep in poll(2).
struct Cancel {
    stop: Arc<AtomicBool>,
    _wake: OwnedFd,
}

impl Drop for Cancel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // `_wake` closes after this: the thread's poll sees the hang-up.
    }
}

/// How a thread's run ended (a stop ends it too, but nobody waits then).
enum Ended {
    Done(Pumped),
    /// The source ran dry or to a trickle.
    Slowed,
    /// The destination took nothing for the stall time: the bytes it has
    /// not taken.
    Stalled(Vec<u8>),
}

/// What a thread owns while it moves a stream.
struct Job<F> {
    src: OwnedFd,
    dst: OwnedFd,
    budget: Budget<F>,
    stop: Arc<AtomicBool>,
    /// The read end of the pipe that [`Cancel`] closes.
    woken: OwnedFd,
}

/// What a wait in poll(2) saw.
enum Wait {
    Ready,
    TimedOut,
    Stopped,
}

/// A thread's result: how it ended, what is left of the budget, the buffer.
type Run = (Result<Ended, Failed>, u64, Pages);

impl<F: FnMut(usize)> Job<F> {
    fn run(mut self, mut buf: Pages) -> Run {
        let ended = self.relay(&mut buf);
        (ended, self.budget.left, buf)
    }

    /// The copy loop's bulk path, blocking in poll(2) where the loop would
    /// wait for the event loop.
    fn relay(&mut self, buf: &mut [u8]) -> Result<Ended, Failed> {
        let (reading, writing) = (Failed::at(Side::Source), Failed::at(Side::Destination));
        let mut room = Room::of(&self.dst);
        let mut trickles = 0u8;
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(Ended::Slowed);
            }
            if self.budget.left == 0 {
                return Ok(Ended::Done(Pumped::Limit));
            }
            let want = self.budget.ask(buf.len());
            let space = room.for_read(&self.dst, want);
            if space == 0 {
                match self.wait(&self.dst, PollFlags::POLLOUT, STALL) {
                    Wait::Ready => continue,
                    Wait::TimedOut | Wait::Stopped => return Ok(Ended::Stalled(Vec::new())),
                }
            }
            let ask = want.min(space);
            let n = match fdio::read(&self.src, &mut buf[..ask]) {
                Ok(0) => return Ok(Ended::Done(Pumped::EndOfFile)),
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => match self.wait(&self.src, PollFlags::POLLIN, DRY) {
                    Wait::Ready => continue,
                    Wait::TimedOut | Wait::Stopped => return Ok(Ended::Slowed),
                },
                Err(e) => return Err(reading(e)),
            };
            self.budget.read(n);
            let mut at = 0;
            while at < n {
                match nix::unistd::write(&self.dst, &buf[at..n]) {
                    Ok(w) => {
                        at += w;
                        self.budget.spend(w);
                        room.took(w);
                    }
                    Err(Errno::EINTR) => {}
                    Err(Errno::EAGAIN) => {
                        room.full();
                        match self.wait(&self.dst, PollFlags::POLLOUT, STALL) {
                            Wait::Ready => {}
                            Wait::TimedOut | Wait::Stopped => {
                                return Ok(Ended::Stalled(buf[at..n].to_vec()));
                            }
                        }
                    }
                    Err(e) => return Err(writing(e)),
                }
            }
            if n < COPY_SMALL {
                trickles += 1;
                if trickles >= TRICKLES {
                    return Ok(Ended::Slowed);
                }
            } else {
                trickles = 0;
            }
        }
    }

    /// Waits until `fd` is ready for `events` (or has an error or a hang-up
    /// that the next call reports), for at most `limit`, or until stopped.
    fn wait(&self, fd: &OwnedFd, events: PollFlags, limit: Duration) -> Wait {
        let timeout = PollTimeout::try_from(limit).unwrap_or(PollTimeout::MAX);
        loop {
            let mut fds = [
                PollFd::new(fd.as_fd(), events),
                PollFd::new(self.woken.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, timeout) {
                Ok(0) => return Wait::TimedOut,
                Ok(_) if fds[1].any().unwrap_or(true) => return Wait::Stopped,
                Ok(_) => return Wait::Ready,
                Err(Errno::EINTR) => continue,
                // Not with two open descriptors; the next call says more.
                Err(_) => return Wait::Ready,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 4 MiB in reads of 64 KiB on average, beside another bulk stream:
    /// each of the three conditions is needed.
    #[test]
    fn a_stream_moves_after_4_mib_in_large_reads_beside_another() {
        assert!(worth(HANDOFF, HANDOFF / LARGE_READS, || 2));
        assert!(worth(HANDOFF * 2, 1, || 5));
        // Not yet 4 MiB.
        assert!(!worth(HANDOFF - 1, 1, || 2));
        // Reads a little under 64 KiB on average.
        assert!(!worth(HANDOFF, HANDOFF / LARGE_READS + 1, || 2));
        // Alone.
        assert!(!worth(HANDOFF, 1, || 1));
    }
}
