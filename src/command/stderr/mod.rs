//! The command's stderr, logged line by line with the connection's fields
//! (`CONN`, `SERVICE`, `PID`, `STREAM=stderr`), by one thread for every
//! command, so a command that writes a lot to stderr never blocks on it, and
//! a command that writes nothing there costs a map entry, not a task.
//!
//! # Bounds
//!
//! Whatever a command writes, what its stderr may log is bounded, per
//! connection (see `lines`):
//!
//! - a line longer than [`MAX_LINE`] (4 KiB) is cut into pieces of that
//!   size, each logged as a line of its own;
//! - at most [`LINES_PER_SECOND`] (100) lines and [`BYTES_PER_SECOND`]
//!   (64 KiB) a second are logged, after a burst of up to [`LINES_BURST`]
//!   (200) lines and [`BYTES_BURST`] (128 KiB): two token buckets, a line
//!   needing one token of the first and its length in the second.
//!
//! What is over the bound is read all the same (the command never waits on
//! its stderr) and dropped, counted in lines and bytes. One warning,
//! `stderr lines dropped: …` (fields `DROPPED_LINES`, `DROPPED_BYTES`),
//! reports each episode: [`REPORT_EVERY`] (1 s) after its first dropped
//! line, so once a second while a flood lasts and within a second of its
//! end; what is still unreported when the connection ends is reported then.
//!
//! # The reader thread
//!
//! One thread, `stderr`, waits in epoll(7) on every command's stderr pipe.
//! Each wake reads each ready pipe once (at most 64 KiB), so a pipe that is
//! always full takes its turn with the others, and never the event loop's
//! threads. The lines go to the log's queue, which never blocks (see
//! `crate::log`); the `stream` field marks them as a command's lines there,
//! the first dropped when the log cannot keep up. At a command's end,
//! [`StderrLog::finish`] takes the pipe out of the thread's hands and logs
//! what is already written, without waiting for more.

mod lines;

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::PollTimeout;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

use lines::Lines;
#[cfg(doc)]
use lines::{BYTES_BURST, BYTES_PER_SECOND, LINES_BURST, LINES_PER_SECOND, MAX_LINE, REPORT_EVERY};

use super::Tag;

/// One command's stderr, read by the thread until end-of-file or until
/// [`StderrLog::finish`] (or a drop) takes it back.
pub struct StderrLog {
    id: u64,
    entry: Arc<Mutex<Entry>>,
}

struct Entry {
    fd: OwnedFd,
    lines: Lines,
    /// Logged to its end: the thread and `finish` leave it alone.
    done: bool,
}

/// The reader thread's side: its epoll, and the pipes it reads, by the id
/// each is registered with.
struct Readers {
    epoll: Epoll,
    entries: Mutex<HashMap<u64, Arc<Mutex<Entry>>>>,
    next: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The thread, started by [`start`] (or the first command).
static READERS: LazyLock<Result<&'static Readers, String>> = LazyLock::new(|| {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
        .map_err(|e| format!("cannot create the stderr readers' epoll: {e}"))?;
    let readers: &'static Readers = Box::leak(Box::new(Readers {
        epoll,
        entries: Mutex::default(),
        next: AtomicU64::new(1),
    }));
    std::thread::Builder::new()
        .name("stderr".into())
        // Room for one read's buffer (64 KiB) and the logging under it.
        .stack_size(256 << 10)
        .spawn(move || readers.run())
        .map_err(|e| format!("cannot start the stderr reader thread: {e}"))?;
    Ok(readers)
});

/// Starts the reader thread (call once, early in start-up); a failure is
/// logged here, and each command's start reports it again.
pub fn start() {
    if let Err(e) = &*READERS {
        tracing::error!("{e}");
    }
}

impl StderrLog {
    /// Hands `fd` (the daemon's end of a command's stderr pipe) to the
    /// reader thread, its lines logged as `tag`'s; call before the command
    /// starts, and [`StderrLog::started`] once it has.
    pub fn watch(fd: OwnedFd, tag: Tag) -> io::Result<StderrLog> {
        let readers = READERS.as_ref().map_err(|e| io::Error::other(e.clone()))?;
        crate::fdio::set_nonblocking(&fd, true)?;
        let id = readers.next.fetch_add(1, Ordering::Relaxed);
        let event = EpollEvent::new(EpollFlags::EPOLLIN, id);
        let entry = Arc::new(Mutex::new(Entry {
            fd,
            lines: Lines::new(tag),
            done: false,
        }));
        lock(&readers.entries).insert(id, Arc::clone(&entry));
        if let Err(e) = readers.epoll.add(&lock(&entry).fd, event) {
            lock(&readers.entries).remove(&id);
            return Err(e.into());
        }
        Ok(StderrLog { id, entry })
    }

    /// The command started as `pid`: its lines carry it.
    pub fn started(&self, pid: i32) {
        lock(&self.entry).lines.pid = pid;
    }

    /// Takes the pipe back from the thread, logs what is already written
    /// (without waiting for more: a process outside the command's group may
    /// still hold the pipe) and the drops not reported yet, and closes the
    /// daemon's end.
    pub fn finish(self) {
        drop(self);
    }
}

impl Drop for StderrLog {
    fn drop(&mut self) {
        if let Ok(readers) = &*READERS {
            lock(&readers.entries).remove(&self.id);
        }
        let mut entry = lock(&self.entry);
        if entry.done {
            return;
        }
        entry.done = true;
        if let Ok(readers) = &*READERS {
            let _ = readers.epoll.delete(&entry.fd);
        }
        let Entry { fd, lines, .. } = &mut *entry;
        lines.what_is_written(fd);
        lines.rest();
    }
}

impl Readers {
    fn run(&self) {
        let mut events = vec![EpollEvent::empty(); 64];
        // The pipes with drops to report, checked at each wake.
        let mut flooding: Vec<(u64, Arc<Mutex<Entry>>)> = Vec::new();
        loop {
            let timeout = next_report(&flooding);
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => {
                    tracing::error!(error = %e, "the stderr reader cannot wait; commands' stderr is not logged");
                    return;
                }
            };
            for event in &events[..n] {
                let id = event.data();
                let Some(entry) = lock(&self.entries).get(&id).cloned() else {
                    continue;
                };
                if self.read(id, &entry) && !flooding.iter().any(|(i, _)| *i == id) {
                    flooding.push((id, entry));
                }
            }
            let now = Instant::now();
            flooding.retain(|(_, entry)| {
                let mut e = lock(entry);
                if e.done {
                    return false;
                }
                if e.lines.report_due().is_some_and(|at| now >= at) {
                    e.lines.report();
                }
                e.lines.report_due().is_some()
            });
        }
    }

    /// Reads the pipe registered as `id` once; at its end, logs the rest
    /// and lets it go. Whether drops are waiting to be reported.
    fn read(&self, id: u64, entry: &Mutex<Entry>) -> bool {
        let mut e = lock(entry);
        if e.done {
            return false;
        }
        let Entry { fd, lines, done } = &mut *e;
        match lines.read_once(fd) {
            Ok(true) | Err(Errno::EAGAIN) => lines.report_due().is_some(),
            Ok(false) | Err(_) => {
                lines.rest();
                *done = true;
                let _ = self.epoll.delete(&*fd);
                lock(&self.entries).remove(&id);
                false
            }
        }
    }
}

/// How long the thread may wait: until the first report due, if any.
fn next_report(flooding: &[(u64, Arc<Mutex<Entry>>)]) -> PollTimeout {
    let due = flooding
        .iter()
        .filter_map(|(_, e)| lock(e).lines.report_due())
        .min();
    match due {
        None => PollTimeout::NONE,
        Some(at) => {
            let ms = at.saturating_duration_since(Instant::now()).as_millis();
            // Rounded up: a wake just before the due time would find nothing due.
            PollTimeout::try_from(ms.saturating_add(1).min(60_000) as i32)
                .unwrap_or(PollTimeout::MAX)
        }
    }
}

#[cfg(test)]
mod tests;
