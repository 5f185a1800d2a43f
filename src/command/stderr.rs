//! The command's stderr, logged line by line with the connection's fields
//! (`CONN`, `SERVICE`, `PID`, `STREAM=stderr`), by a task of its own, so a
//! command that writes a lot to stderr never blocks on it.
//!
//! # Bounds
//!
//! Whatever a command writes, what its stderr may log is bounded, per
//! connection:
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
//! # Sharing the event loop
//!
//! Each read waits on the pipe's readiness, an await that counts against
//! tokio's cooperative budget, takes at most [`READ_SIZE`] bytes, and the
//! task yields to the scheduler every [`YIELD_EVERY`] reads besides: a pipe
//! that is always full cannot keep a runtime worker, or the timers, from
//! the other connections. The lines go to the log's queue, which never
//! blocks (see `crate::log`); the `stream` field marks them as a command's
//! lines there, the first dropped when the log cannot keep up.

use std::os::fd::OwnedFd;
use std::time::Duration;

use nix::errno::Errno;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Tag;
use crate::fdio;

/// Longest stderr line logged as one record; longer lines are cut into
/// pieces of this size, each logged as a line.
const MAX_LINE: usize = 4096;

/// Lines a connection's stderr may log each second, once its burst is spent.
const LINES_PER_SECOND: u32 = 100;

/// Lines a connection's stderr may log at once.
const LINES_BURST: u32 = 200;

/// Bytes a connection's stderr may log each second, once its burst is spent.
const BYTES_PER_SECOND: u32 = 64 * 1024;

/// Bytes a connection's stderr may log at once.
const BYTES_BURST: u32 = 128 * 1024;

/// How long after its first dropped line an episode of drops is reported.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// The most one read takes from the pipe.
const READ_SIZE: usize = 64 * 1024;

/// Reads between two yields to the scheduler.
const YIELD_EVERY: u32 = 8;

/// The command's stderr, logged line by line with the connection's fields,
/// by a task of its own until end-of-file or until told to finish.
pub struct StderrLog {
    finish: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl StderrLog {
    pub fn start(fd: AsyncFd<OwnedFd>, tag: Tag, pid: i32) -> StderrLog {
        let (finish, finished) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut lines = Lines {
                pending: Vec::new(),
                tag,
                pid,
                budget: Budget::full(Instant::now()),
                dropped: Dropped::default(),
            };
            let told = tokio::select! {
                () = lines.until_end(&fd) => false,
                _ = finished => true,
            };
            if told {
                lines.what_is_written(&fd);
            }
            lines.rest();
        });
        StderrLog { finish, task }
    }

    /// Logs what is already written and waits until the last line is out.
    /// Bounded: a process outside the command's group may still be writing.
    pub async fn finish(self) {
        let _ = self.finish.send(());
        let _ = self.task.await;
    }
}

struct Lines {
    /// The start of a line whose end has not been read yet.
    pending: Vec<u8>,
    tag: Tag,
    pid: i32,
    budget: Budget,
    dropped: Dropped,
}

impl Lines {
    /// Logs lines until the command (and everything sharing its stderr)
    /// closes it; reports an episode of drops when it is due, even while
    /// the pipe is quiet.
    async fn until_end(&mut self, fd: &AsyncFd<OwnedFd>) {
        let mut reads: u32 = 0;
        loop {
            let due = self.dropped.due();
            let read = fdio::read_with(fd, |fd| self.read_once(fd));
            let outcome = match due {
                None => Some(read.await),
                // The timer boxed: only a flood needs it, and the task's
                // future is held by every connection while it lives.
                Some(at) => tokio::select! {
                    r = read => Some(r),
                    () = Box::pin(tokio::time::sleep_until(at)) => None,
                },
            };
            match outcome {
                Some(Ok(true)) | None => {}
                Some(Ok(false) | Err(_)) => return,
            }
            // While a flood lasts the read never waits: the report is due here.
            if self.dropped.due().is_some_and(|at| Instant::now() >= at) {
                self.report();
            }
            reads = reads.wrapping_add(1);
            if reads % YIELD_EVERY == 0 {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Logs what is already written, without waiting for more (at most 16
    /// reads).
    fn what_is_written(&mut self, fd: &AsyncFd<OwnedFd>) {
        for _ in 0..16 {
            if self.read_once(fd.get_ref()) != Ok(true) {
                break;
            }
        }
    }

    /// Reads once and takes each complete line (or each `MAX_LINE` bytes of
    /// an overlong one); `Ok(false)` at end-of-file.
    fn read_once(&mut self, fd: &OwnedFd) -> Result<bool, Errno> {
        let mut buf = [0u8; READ_SIZE];
        let n = loop {
            match nix::unistd::read(fd, &mut buf) {
                Err(Errno::EINTR) => continue,
                r => break r?,
            }
        };
        if n == 0 {
            return Ok(false);
        }
        self.budget.refill(Instant::now());
        self.take(&buf[..n]);
        Ok(true)
    }

    /// Cuts `bytes` into lines, the first one continuing `pending`; keeps
    /// the start of the last one if its end is not there yet.
    fn take(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = MAX_LINE - self.pending.len();
            // A newline right after a full line ends that line, and no other.
            let window = &bytes[..bytes.len().min(room + 1)];
            if let Some(end) = window.iter().position(|&b| b == b'\n') {
                self.line_ending(&window[..end]);
                bytes = &bytes[end + 1..];
            } else if window.len() > room {
                self.line_ending(&window[..room]);
                bytes = &bytes[room..];
            } else {
                self.pending.extend_from_slice(window);
                bytes = &[];
            }
        }
    }

    /// A line whose last bytes are `tail`, after what is pending.
    fn line_ending(&mut self, tail: &[u8]) {
        if self.pending.is_empty() {
            self.line(tail);
        } else {
            let mut line = std::mem::take(&mut self.pending);
            line.extend_from_slice(tail);
            self.line(&line);
            line.clear();
            self.pending = line;
        }
    }

    /// Logs `line` if the bounds allow it, else counts it as dropped.
    fn line(&mut self, line: &[u8]) {
        if self.budget.take(line.len()) {
            self.emit(line);
        } else {
            self.dropped.count(line.len());
        }
    }

    /// At the end: the last line, if it had no newline, and the drops not
    /// reported yet.
    fn rest(&mut self) {
        if !self.pending.is_empty() {
            self.budget.refill(Instant::now());
            let rest = std::mem::take(&mut self.pending);
            self.line(&rest);
        }
        self.report();
    }

    fn emit(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        tracing::info!(
            conn = self.tag.conn,
            service = &*self.tag.service,
            pid = self.pid,
            stream = "stderr",
            "{}",
            text.trim_end_matches('\r')
        );
    }

    /// Reports the episode of drops counted so far, if any, and starts
    /// counting anew.
    fn report(&mut self) {
        let Some(first) = self.dropped.first else {
            return;
        };
        let Dropped { lines, bytes, .. } = std::mem::take(&mut self.dropped);
        let over = Instant::now()
            .saturating_duration_since(first)
            .as_secs_f64();
        tracing::warn!(
            conn = self.tag.conn,
            service = &*self.tag.service,
            pid = self.pid,
            dropped_lines = lines,
            dropped_bytes = bytes,
            "stderr lines dropped: {lines} line(s), {bytes} byte(s) in {over:.1} s, over the \
             bound of {LINES_PER_SECOND} lines and {} KiB a second",
            BYTES_PER_SECOND / 1024
        );
    }
}

/// What the bounds still allow: a token bucket for lines, one for bytes.
struct Budget {
    lines: f64,
    bytes: f64,
    at: Instant,
}

impl Budget {
    fn full(now: Instant) -> Budget {
        Budget {
            lines: f64::from(LINES_BURST),
            bytes: f64::from(BYTES_BURST),
            at: now,
        }
    }

    /// Adds what the time since the last refill allows, up to the bursts.
    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.lines = (self.lines + secs * f64::from(LINES_PER_SECOND)).min(f64::from(LINES_BURST));
        self.bytes = (self.bytes + secs * f64::from(BYTES_PER_SECOND)).min(f64::from(BYTES_BURST));
    }

    /// Takes what a line of `len` bytes needs, if both buckets have it.
    fn take(&mut self, len: usize) -> bool {
        let len = len as f64;
        if self.lines < 1.0 || self.bytes < len {
            return false;
        }
        self.lines -= 1.0;
        self.bytes -= len;
        true
    }
}

/// Lines dropped since the last report.
#[derive(Default)]
struct Dropped {
    lines: u64,
    bytes: u64,
    /// When the first of them was dropped; None: nothing to report.
    first: Option<Instant>,
}

impl Dropped {
    fn count(&mut self, len: usize) {
        self.lines += 1;
        self.bytes += len as u64;
        self.first.get_or_insert_with(Instant::now);
    }

    /// When the report of these drops is due, if there are any.
    fn due(&self) -> Option<Instant> {
        self.first.map(|t| t + REPORT_EVERY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines() -> Lines {
        Lines {
            pending: Vec::new(),
            tag: Tag {
                conn: 1,
                service: "t".into(),
            },
            pid: 1,
            budget: Budget::full(Instant::now()),
            dropped: Dropped::default(),
        }
    }

    #[test]
    fn the_bounds_allow_a_burst_then_a_rate() {
        let t0 = Instant::now();
        let mut b = Budget::full(t0);
        let taken = (0..1000).filter(|_| b.take(20)).count();
        assert_eq!(taken, LINES_BURST as usize);
        b.refill(t0 + Duration::from_millis(500));
        let taken = (0..1000).filter(|_| b.take(20)).count();
        assert_eq!(taken, LINES_PER_SECOND as usize / 2);
        // Long lines spend the bytes first: 4 KiB lines, 128 KiB at once.
        let mut b = Budget::full(t0);
        let taken = (0..1000).filter(|_| b.take(MAX_LINE)).count();
        assert_eq!(taken, BYTES_BURST as usize / MAX_LINE);
        // Never more than the burst, however long it rested.
        b.refill(t0 + Duration::from_secs(3600));
        let taken = (0..1000).filter(|_| b.take(MAX_LINE)).count();
        assert_eq!(taken, BYTES_BURST as usize / MAX_LINE);
    }

    #[test]
    fn a_flood_is_counted_not_logged() {
        let mut l = lines();
        let flood = b"spam spam spam spam\n".repeat(10_000);
        l.take(&flood);
        assert_eq!(l.dropped.lines, 10_000 - u64::from(LINES_BURST));
        assert_eq!(l.dropped.bytes, 19 * l.dropped.lines);
        assert!(l.dropped.due().is_some());
        l.report();
        assert!(l.dropped.due().is_none() && l.dropped.lines == 0);
    }

    /// The documented bounds, in numbers: 200 lines or 128 KiB at once,
    /// then 100 lines and 64 KiB a second.
    #[test]
    fn the_bounds_are_the_documented_ones() {
        let t0 = Instant::now();
        let mut b = Budget::full(t0);
        assert_eq!((0..1000).filter(|_| b.take(1)).count(), 200);
        b.refill(t0 + Duration::from_secs(1));
        assert_eq!((0..1000).filter(|_| b.take(1)).count(), 100);
        let mut b = Budget::full(t0);
        assert_eq!((0..1000).filter(|_| b.take(1024)).count(), 128);
        b.refill(t0 + Duration::from_secs(1));
        assert_eq!((0..1000).filter(|_| b.take(1024)).count(), 64);
    }

    /// A line longer than `MAX_LINE` is cut at `MAX_LINE` bytes, counting
    /// those that came in an earlier read.
    #[test]
    fn an_overlong_line_in_pieces_is_cut_at_max_line() {
        let mut l = lines();
        l.take(&[b'a'; 100]);
        assert_eq!(taken(&l), 0.0, "no line ended yet");
        let mut rest = vec![b'a'; MAX_LINE];
        rest.push(b'\n');
        l.take(&rest);
        // MAX_LINE bytes (100 of them pending), then the last 100.
        assert_eq!(taken(&l), 2.0);
        assert!(l.pending.is_empty());
    }

    /// A pipe whose read end is registered, non-blocking, and its write end.
    fn pipe() -> (AsyncFd<OwnedFd>, std::fs::File) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
        let r = fdio::register(r, tokio::io::Interest::READABLE).unwrap();
        // Room for what the tests write before anything reads.
        let _ = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
        (r, std::fs::File::from(w))
    }

    /// Lines logged so far (the refills between reads add a fraction).
    fn taken(l: &Lines) -> f64 {
        (f64::from(LINES_BURST) - l.budget.lines).round()
    }

    #[tokio::test]
    async fn until_end_takes_every_line_then_returns_at_the_end_of_file() {
        use std::io::Write;
        let (r, mut w) = pipe();
        w.write_all(b"one\ntwo\nthr").unwrap();
        drop(w);
        let mut l = lines();
        tokio::time::timeout(Duration::from_secs(10), l.until_end(&r))
            .await
            .expect("until_end returns at the end of file");
        assert_eq!(taken(&l), 2.0);
        assert_eq!(l.pending, b"thr");
        l.rest();
        assert_eq!(taken(&l), 3.0);
    }

    /// A flood's drops are reported once a second, not at every read: a
    /// flood read at once is still counted when the pipe ends.
    #[tokio::test]
    async fn drops_are_reported_when_due_not_before() {
        use std::io::Write;
        let (r, mut w) = pipe();
        w.write_all(&b"x\n".repeat(300)).unwrap();
        drop(w);
        let mut l = lines();
        tokio::time::timeout(Duration::from_secs(10), l.until_end(&r))
            .await
            .unwrap();
        assert_eq!(l.dropped.lines, 100, "reported before it was due");
    }

    /// What is already written is taken without waiting for more, however
    /// many reads it needs, while the writer stays open.
    #[tokio::test]
    async fn what_is_written_takes_it_all_and_does_not_wait() {
        use std::io::Write;
        let (r, mut w) = pipe();
        // 1,000 lines of 200 bytes: four reads.
        let line = [b"y".repeat(199), b"\n".to_vec()].concat();
        w.write_all(&line.repeat(1000)).unwrap();
        let mut l = lines();
        l.what_is_written(&r);
        assert_eq!(taken(&l) as u64 + l.dropped.lines, 1000);
        assert!(l.pending.is_empty());
        drop(w);
    }

    /// finish() ends the log even while something still holds the pipe
    /// open (a process that left the command's group): the daemon's end
    /// of it is closed once finish() returns.
    #[tokio::test]
    async fn finish_ends_the_log_while_the_pipe_is_held_open() {
        use std::io::Write;
        let (r, mut w) = pipe();
        w.write_all(b"last words\n").unwrap();
        let tag = Tag {
            conn: 1,
            service: "t".into(),
        };
        let log = StderrLog::start(r, tag, 1);
        tokio::time::timeout(Duration::from_secs(10), log.finish())
            .await
            .expect("finish() is bounded");
        let after = w.write(b"more\n").map_err(|e| e.raw_os_error());
        assert_eq!(after, Err(Some(libc::EPIPE)), "the log still reads");
    }

    #[test]
    fn lines_are_cut_at_max_line_and_joined_across_reads() {
        let mut l = lines();
        // A line exactly MAX_LINE long, its newline in the next read.
        l.take(&[b'a'; MAX_LINE - 10]);
        l.take(&[b'a'; 10]);
        assert_eq!(l.pending.len(), MAX_LINE);
        l.take(b"\n");
        assert!(l.pending.is_empty());
        // One line, not two, and no empty one after it.
        assert_eq!(l.budget.lines, f64::from(LINES_BURST) - 1.0);
        // A line of 2.5 × MAX_LINE: two pieces now, the rest pending.
        l.take(&[b'b'; MAX_LINE * 5 / 2]);
        assert_eq!(l.budget.lines, f64::from(LINES_BURST) - 3.0);
        assert_eq!(l.pending.len(), MAX_LINE / 2);
        l.rest();
        assert_eq!((f64::from(LINES_BURST) - l.budget.lines).round(), 4.0);
    }
}
