//! A shared command's output, fanned out: each client of the command has a
//! pipe of its own (its connection reads it as it would read a command's
//! stdout), and the fan-out fills every client's pipe from the command's.
//!
//! Two ways, as the service's `transfer` says:
//! - **tee** (`transfer = "splice"`): tee(2) duplicates the command's pipe's
//!   pages into each client's pipe without copying them; the command's pipe
//!   is then emptied by a splice to /dev/null, or, when some client or the
//!   replay needs the bytes, by one read into a [`Chunk`];
//! - **copy** (the default): one read(2) into a chunk, one write(2) into
//!   each client's pipe.
//!
//! Either way a client whose pipe cannot take everything at once gets the
//! rest later, from its backlog: a queue of chunks it shares with the other
//! clients and the replay (a chunk is read once and counted once, however
//! many clients hold it). A backlog never passes `max_lag`: past it the
//! client is dropped (`lagging = "drop"`: its connection ends with the
//! reason `lagging`), or the command is not read until the backlog is back
//! under it (`lagging = "wait"`). So the daemon holds at most about
//! `max_lag` + `replay` of a shared command's output, whatever its clients
//! do.
//!
//! tee(2) cannot resume part-way: it duplicates from the start of the
//! unread data. A client's pipe that took only part of a tee gets the rest
//! from its backlog, and is not teed to again until its backlog is empty,
//! so every client gets every byte once, in order.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::fcntl::{splice, tee, SpliceFFlags};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::flag::Flag;
use crate::fdio;
use crate::sys;

/// The most a fan-out round takes from the command's pipe.
const MAX_ROUND: usize = 1 << 20;

/// A piece of the command's output, read once and shared by every backlog
/// and the replay that hold it.
#[derive(Clone)]
pub struct Chunk {
    /// (An `Arc<Vec>`, not an `Arc<[u8]>`: the read's buffer is moved in,
    /// not copied.)
    bytes: Arc<Vec<u8>>,
    start: usize,
}

impl Chunk {
    fn new(bytes: Vec<u8>) -> Chunk {
        Chunk {
            bytes: Arc::new(bytes),
            start: 0,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[self.start..]
    }

    pub fn len(&self) -> usize {
        self.bytes.len() - self.start
    }

    /// The same chunk without its first `n` bytes.
    pub fn skip(&self, n: usize) -> Chunk {
        Chunk {
            bytes: Arc::clone(&self.bytes),
            start: (self.start + n).min(self.bytes.len()),
        }
    }
}

/// How the fan-out fills the clients' pipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    Tee,
    Copy,
}

/// One client's side of the fan-out: the writing end of its pipe and its
/// backlog, shared by the fan-out and the client's writer task.
pub struct Feed {
    pipe: AsyncFd<OwnedFd>,
    backlog: Mutex<Backlog>,
    /// Wakes the writer: its backlog grew, or it should stop.
    wake: Notify,
    /// Raised when the client is dropped for lagging.
    pub lag: Arc<Flag>,
}

#[derive(Default)]
struct Backlog {
    chunks: VecDeque<Chunk>,
    len: u64,
    /// The output has ended: the writer ends once the backlog is written.
    closing: bool,
    /// The client is gone, or was dropped: nothing more is written.
    gone: bool,
}

impl Backlog {
    fn push(&mut self, chunk: Chunk) {
        if chunk.len() > 0 {
            self.len += chunk.len() as u64;
            self.chunks.push_back(chunk);
        }
    }

    /// `n` bytes of the first chunk were written.
    fn written(&mut self, n: usize) {
        self.len -= n as u64;
        if let Some(front) = self.chunks.front_mut() {
            if n >= front.len() {
                self.chunks.pop_front();
            } else {
                *front = front.skip(n);
            }
        }
    }
}

impl Feed {
    /// A feed into `pipe` (the writing end of a client's pipe, nonblocking,
    /// registered), starting with `first` (the replay).
    pub fn new(pipe: AsyncFd<OwnedFd>, first: Vec<Chunk>) -> Arc<Feed> {
        let mut backlog = Backlog::default();
        for chunk in first {
            backlog.push(chunk);
        }
        Arc::new(Feed {
            pipe,
            backlog: Mutex::new(backlog),
            wake: Notify::new(),
            lag: Arc::default(),
        })
    }

    fn backlog(&self) -> MutexGuard<'_, Backlog> {
        self.backlog.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the client is behind by, in bytes the daemon holds for it.
    pub fn behind(&self) -> u64 {
        self.backlog().len
    }

    pub fn is_gone(&self) -> bool {
        self.backlog().gone
    }

    /// The output has ended: the writer writes what is left, then closes.
    pub fn close(&self) {
        self.backlog().closing = true;
        self.wake.notify_one();
    }

    /// Adds `chunk` to the backlog (the writer writes it).
    pub fn push(&self, chunk: &Chunk) {
        let mut backlog = self.backlog();
        if !backlog.gone {
            backlog.push(chunk.clone());
            drop(backlog);
            self.wake.notify_one();
        }
    }

    /// The client fell `max_lag` behind: it gets nothing more.
    pub fn drop_lagging(&self) {
        let mut backlog = self.backlog();
        backlog.gone = true;
        backlog.chunks.clear();
        backlog.len = 0;
        drop(backlog);
        self.lag.raise();
        self.wake.notify_one();
    }

    /// The client left: nothing more is written.
    pub fn leave(&self) {
        self.backlog().gone = true;
        self.wake.notify_one();
    }

    /// Writes the backlog into the client's pipe as it takes it, until the
    /// output has ended and all is written (then the pipe closes with the
    /// last reference), or the client is gone. `progress` is told when a
    /// backlog shrinks (a command waiting for its slowest client goes on).
    pub async fn write(self: Arc<Feed>, progress: Arc<Notify>) {
        loop {
            // Wait for something to write.
            loop {
                let woken = self.wake.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                {
                    let backlog = self.backlog();
                    if backlog.gone || (backlog.closing && backlog.chunks.is_empty()) {
                        return;
                    }
                    if !backlog.chunks.is_empty() {
                        break;
                    }
                }
                woken.await;
            }
            // Write it as the pipe takes it.
            loop {
                let Ok(mut ready) = self.pipe.writable().await else {
                    self.leave();
                    return;
                };
                let mut backlog = self.backlog();
                if backlog.gone {
                    return;
                }
                let Some(front) = backlog.chunks.front() else {
                    break;
                };
                match ready.try_io(|fd| {
                    nix::unistd::write(fd.get_ref(), front.as_slice()).map_err(std::io::Error::from)
                }) {
                    Ok(Ok(n)) => {
                        backlog.written(n);
                        progress.notify_one();
                    }
                    // EPIPE: the connection closed its end. (A command
                    // waiting for this client goes on.)
                    Ok(Err(_)) => {
                        backlog.gone = true;
                        progress.notify_one();
                        return;
                    }
                    Err(_would_block) => {}
                }
            }
        }
    }
}

/// What one round of the fan-out did.
pub enum Round {
    /// This many bytes of output were fanned out.
    Moved(Chunk),
    /// Moved this many bytes that nobody needed in user space (tee, and
    /// no backlog nor replay).
    Discarded(usize),
    /// The command's output ended.
    Ended,
    /// Nothing to read yet.
    Dry,
}

/// The fan-out of one shared command: its output pipe, and /dev/null to
/// empty it into when every client took its tee.
pub struct Fanout {
    pub source: AsyncFd<OwnedFd>,
    null: OwnedFd,
    way: Way,
}

impl Fanout {
    pub fn new(source: AsyncFd<OwnedFd>, way: Way) -> std::io::Result<Fanout> {
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")?
            .into();
        Ok(Fanout { source, null, way })
    }

    /// One round: waits for output, then gives it to every feed in `feeds`
    /// (their pipes first, what they cannot take to their backlogs).
    /// `keep` says the bytes are wanted in user space anyway (the replay).
    /// Cancel-safe: it awaits only before it takes anything.
    pub async fn round(
        &self,
        feeds: &(dyn Fn() -> Vec<Arc<Feed>> + Sync),
        keep: bool,
    ) -> Result<Round, Errno> {
        let mut ready = self.source.readable().await.map_err(|e| fdio::errno(&e))?;
        let fd = self.source.get_ref();
        let available = sys::readable_bytes(fd.as_fd()).map_err(|e| fdio::errno(&e))?;
        if available == 0 {
            // End-of-file, or nothing yet: a read of nothing tells which.
            let mut probe = [0u8; 4096];
            return match ready
                .try_io(|fd| fdio::read(fd.get_ref(), &mut probe).map_err(std::io::Error::from))
            {
                Ok(Ok(0)) => Ok(Round::Ended),
                Ok(Ok(n)) => {
                    let chunk = Chunk::new(probe[..n].to_vec());
                    self.give(&feeds(), &chunk, &[]);
                    Ok(Round::Moved(chunk))
                }
                Ok(Err(e)) => Err(fdio::errno(&e)),
                Err(_would_block) => Ok(Round::Dry),
            };
        }
        let want = available.min(MAX_ROUND);
        let feeds = feeds();
        match self.way {
            Way::Copy => {
                let chunk = self.read(want)?;
                self.give(&feeds, &chunk, &[]);
                Ok(Round::Moved(chunk))
            }
            Way::Tee => {
                let teed: Vec<Option<usize>> = feeds.iter().map(|f| self.tee(f, want)).collect();
                // (A client that is gone needs nothing.)
                let whole = (teed.iter().zip(&feeds)).all(|(t, f)| *t == Some(want) || f.is_gone());
                if whole && !keep {
                    return self.discard(want).map(Round::Discarded);
                }
                let chunk = self.read(want)?;
                self.give(&feeds, &chunk, &teed);
                Ok(Round::Moved(chunk))
            }
        }
    }

    /// Empties `n` bytes that FIONREAD said are there (and every client
    /// has had teed) into /dev/null: nothing is copied.
    fn discard(&self, n: usize) -> Result<usize, Errno> {
        let mut gone = 0;
        while gone < n {
            let flags = SpliceFFlags::SPLICE_F_NONBLOCK;
            match splice(
                self.source.get_ref(),
                None,
                &self.null,
                None,
                n - gone,
                flags,
            ) {
                Ok(0) => break,
                Ok(k) => gone += k,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(gone)
    }

    /// Reads `n` bytes that FIONREAD said are there.
    fn read(&self, n: usize) -> Result<Chunk, Errno> {
        let mut buf = vec![0u8; n];
        let mut got = 0;
        while got < n {
            match fdio::read(self.source.get_ref(), &mut buf[got..]) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) if got > 0 => break,
                Err(e) => return Err(e),
            }
        }
        buf.truncate(got);
        Ok(Chunk::new(buf))
    }

    /// Tees up to `n` bytes into a feed whose backlog is empty: how many it
    /// took (None: it has a backlog, or is gone, and takes nothing now).
    fn tee(&self, feed: &Feed, n: usize) -> Option<usize> {
        let mut backlog = feed.backlog();
        if backlog.gone || !backlog.chunks.is_empty() {
            return None;
        }
        let flags = SpliceFFlags::SPLICE_F_NONBLOCK;
        match tee(self.source.get_ref(), feed.pipe.get_ref(), n, flags) {
            Ok(k) => Some(k),
            Err(Errno::EAGAIN) => Some(0),
            Err(_) => {
                // EPIPE: the connection closed its end.
                backlog.gone = true;
                None
            }
        }
    }

    /// Gives `chunk` to each feed: what was teed to it already (`teed`, in
    /// the order of `feeds`; empty: nothing was), then straight into its
    /// pipe if its backlog is empty, and the rest to its backlog.
    fn give(&self, feeds: &[Arc<Feed>], chunk: &Chunk, teed: &[Option<usize>]) {
        for (i, feed) in feeds.iter().enumerate() {
            let mut backlog = feed.backlog();
            if backlog.gone {
                continue;
            }
            let sent = match teed.get(i) {
                Some(Some(n)) => *n,
                // It had a backlog: the whole chunk goes behind it.
                Some(None) => 0,
                None if backlog.chunks.is_empty() => {
                    match nix::unistd::write(feed.pipe.get_ref(), chunk.as_slice()) {
                        Ok(n) => n,
                        Err(Errno::EAGAIN) => 0,
                        Err(_) => {
                            backlog.gone = true;
                            continue;
                        }
                    }
                }
                None => 0,
            };
            if sent < chunk.len() {
                backlog.push(chunk.skip(sent));
                drop(backlog);
                feed.wake.notify_one();
            }
        }
    }
}

/// The latest output, up to `limit` bytes, for clients that join.
pub struct Replay {
    chunks: VecDeque<Chunk>,
    len: usize,
    limit: usize,
    /// The replay starts in the middle of a line (the byte before it, left
    /// out, was not a newline).
    mid_line: bool,
}

impl Replay {
    pub fn new(limit: u64) -> Replay {
        Replay {
            chunks: VecDeque::new(),
            len: 0,
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            mid_line: false,
        }
    }

    pub fn wanted(&self) -> bool {
        self.limit > 0
    }

    pub fn push(&mut self, chunk: &Chunk) {
        if self.limit == 0 {
            return;
        }
        self.len += chunk.len();
        self.chunks.push_back(chunk.clone());
        while self.len > self.limit {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let over = (self.len - self.limit).min(front.len());
            self.mid_line = front.as_slice()[over - 1] != b'\n';
            self.len -= over;
            if over == front.len() {
                self.chunks.pop_front();
            } else {
                *front = front.skip(over);
            }
        }
    }

    /// What a new client gets first; with `lines`, from the start of a
    /// line (the replay may begin in the middle of one).
    pub fn take(&self, lines: bool) -> Vec<Chunk> {
        let mut chunks: Vec<Chunk> = self.chunks.iter().cloned().collect();
        if lines && self.mid_line {
            while let Some(first) = chunks.first_mut() {
                match first.as_slice().iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        *first = first.skip(i + 1);
                        break;
                    }
                    None => {
                        chunks.remove(0);
                    }
                }
            }
        }
        chunks.retain(|c| c.len() > 0);
        chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(s: &str) -> Chunk {
        Chunk::new(s.as_bytes().to_vec())
    }

    fn text(chunks: &[Chunk]) -> String {
        chunks
            .iter()
            .map(|c| String::from_utf8_lossy(c.as_slice()).into_owned())
            .collect()
    }

    #[test]
    fn the_replay_keeps_the_latest_bytes_and_starts_text_at_a_line() {
        let mut r = Replay::new(10);
        assert!(r.take(false).is_empty());
        r.push(&chunk("one\ntwo\n"));
        assert_eq!(
            text(&r.take(true)),
            "one\ntwo\n",
            "under the limit: all of it"
        );
        r.push(&chunk("three\n"));
        // The last 10 bytes begin with a whole line.
        assert_eq!(text(&r.take(false)), "two\nthree\n");
        assert_eq!(text(&r.take(true)), "two\nthree\n");
        r.push(&chunk("four"));
        assert_eq!(text(&r.take(true)), "three\nfour");
        r.push(&chunk("\n"));
        assert_eq!(text(&r.take(false)), "hree\nfour\n");
        assert_eq!(text(&r.take(true)), "four\n");
        r.push(&chunk("fivesix\n"));
        assert_eq!(text(&r.take(false)), "r\nfivesix\n");
        assert_eq!(
            text(&r.take(true)),
            "fivesix\n",
            "a part of a line is left out"
        );
        let none = Replay::new(0);
        assert!(!none.wanted());
    }

    #[test]
    fn a_backlog_counts_what_is_left_of_its_chunks() {
        let mut b = Backlog::default();
        b.push(chunk("hello "));
        b.push(chunk(""));
        b.push(chunk("world"));
        assert_eq!((b.len, b.chunks.len()), (11, 2));
        b.written(4);
        assert_eq!(
            (b.len, text(&b.chunks.iter().cloned().collect::<Vec<_>>())),
            (7, "o world".into())
        );
        b.written(2);
        assert_eq!((b.len, b.chunks.len()), (5, 1));
    }
}
