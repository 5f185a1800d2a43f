//! The rules a command's stderr is logged by: cut into lines, bounded by
//! two token buckets, what is over the bound counted and reported.
//! `Lines` reads from a non-blocking pipe; who calls it (the reader thread,
//! or `finish` at the end) is the parent module's.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::super::Tag;

/// Longest stderr line logged as one record; longer lines are cut into
/// pieces of this size, each logged as a line.
pub(super) const MAX_LINE: usize = 4096;

/// Lines a connection's stderr may log each second, once its burst is spent.
pub(super) const LINES_PER_SECOND: u32 = 100;

/// Lines a connection's stderr may log at once.
pub(super) const LINES_BURST: u32 = 200;

/// Bytes a connection's stderr may log each second, once its burst is spent.
pub(super) const BYTES_PER_SECOND: u32 = 64 * 1024;

/// Bytes a connection's stderr may log at once.
pub(super) const BYTES_BURST: u32 = 128 * 1024;

/// How long after its first dropped line an episode of drops is reported.
pub(super) const REPORT_EVERY: Duration = Duration::from_secs(1);

/// The most one read takes from the pipe.
pub(super) const READ_SIZE: usize = 64 * 1024;

/// One command's stderr as it is logged: the start of a line not ended
/// yet, who it belongs to, and its bounds.
pub(super) struct Lines {
    /// The start of a line whose end has not been read yet.
    pending: Vec<u8>,
    tag: Tag,
    /// The command's pid, once it started (0 before).
    pub(super) pid: i32,
    budget: Budget,
    dropped: Dropped,
}

impl Lines {
    pub(super) fn new(tag: Tag) -> Lines {
        Lines {
            pending: Vec::new(),
            tag,
            pid: 0,
            budget: Budget::full(Instant::now()),
            dropped: Dropped::default(),
        }
    }

    /// Lines logged so far (the refills between reads add a fraction), and
    /// lines dropped and not reported yet: for the tests.
    #[cfg(test)]
    pub(super) fn counts(&self) -> (u64, u64) {
        let logged = (f64::from(LINES_BURST) - self.budget.lines).round() as u64;
        (logged, self.dropped.lines)
    }

    /// When the report of the drops counted so far is due (None: none).
    pub(super) fn report_due(&self) -> Option<Instant> {
        self.dropped.due()
    }

    /// Logs what is already written, without waiting for more (at most 16
    /// reads).
    pub(super) fn what_is_written(&mut self, fd: &OwnedFd) {
        for _ in 0..16 {
            if self.read_once(fd) != Ok(true) {
                break;
            }
        }
    }

    /// Reads once and takes each complete line (or each `MAX_LINE` bytes of
    /// an overlong one); `Ok(false)` at end-of-file, `EAGAIN` when nothing
    /// is there.
    pub(super) fn read_once(&mut self, fd: &OwnedFd) -> Result<bool, Errno> {
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
    pub(super) fn rest(&mut self) {
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
    pub(super) fn report(&mut self) {
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

    /// Lines logged so far (the refills between reads add a fraction).
    fn taken(l: &Lines) -> f64 {
        (f64::from(LINES_BURST) - l.budget.lines).round()
    }

    /// A pipe whose read end is non-blocking, and its write end.
    fn pipe() -> (OwnedFd, std::fs::File) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
        // Room for what the tests write before anything reads.
        let _ = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
        (r, std::fs::File::from(w))
    }

    /// What is already written is taken without waiting for more, however
    /// many reads it needs, while the writer stays open.
    #[test]
    fn what_is_written_takes_it_all_and_does_not_wait() {
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

    /// At the end of the file, read_once says so, and the last line
    /// without a newline waits for rest().
    #[test]
    fn read_once_takes_lines_and_sees_the_end() {
        use std::io::Write;
        let (r, mut w) = pipe();
        w.write_all(b"one\ntwo\nthr").unwrap();
        let mut l = lines();
        assert_eq!(l.read_once(&r), Ok(true));
        assert_eq!(l.read_once(&r), Err(Errno::EAGAIN), "nothing more yet");
        drop(w);
        assert_eq!(l.read_once(&r), Ok(false));
        assert_eq!(l.budget.lines, f64::from(LINES_BURST) - 2.0);
        assert_eq!(l.pending, b"thr");
        l.rest();
        assert!((f64::from(LINES_BURST) - l.budget.lines - 3.0).abs() < 0.01);
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
