//! The log's queue: records formatted where they are logged wait here, in
//! order and bounded, for the one thread that writes them out.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tracing::Metadata;
use tracing_subscriber::fmt::MakeWriter;

/// Bytes of formatted records the queue holds at most.
pub(super) const CAPACITY: usize = 4 << 20;

/// A command's stderr lines are queued only while the queue holds less.
pub(super) const STDERR_SHARE: usize = 1 << 20;

/// How long a wait for the writer lasts without progress (see the module
/// documentation).
pub(super) const PATIENCE: Duration = Duration::from_secs(1);

/// Records lost are reported at most this often.
pub(super) const REPORT_EVERY: Duration = Duration::from_secs(1);

/// The most the writer takes from the queue for one write to stderr.
pub(super) const BATCH: usize = 64 * 1024;

/// Which records go first when the queue fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    /// A line of a command's stderr (it has a `stream` field).
    CommandStderr,
    /// Everything else: connection records, the daemon's own lines.
    Other,
}

impl Class {
    pub(super) fn of(meta: &Metadata<'_>) -> Class {
        if meta.fields().field("stream").is_some() {
            Class::CommandStderr
        } else {
            Class::Other
        }
    }
}

/// Where the writer thread writes.
pub(super) enum Output {
    /// Readable lines, on stderr.
    Stream(Box<dyn Write + Send>),
    /// Native-protocol datagrams to journald, one per record.
    Journal { socket: UnixDatagram, path: PathBuf },
}

impl Output {
    /// A socket to journald at `path`, if it takes an (empty) datagram.
    pub(super) fn journal(path: &Path) -> io::Result<Output> {
        let socket = UnixDatagram::unbound()?;
        socket.send_to(&[], path)?;
        Ok(Output::Journal {
            socket,
            path: path.to_owned(),
        })
    }

    /// Writes `records`, blocking as long as the sink makes it. A record
    /// the sink refuses is lost (nothing better can be done with it).
    pub(super) fn write(&mut self, records: &[Vec<u8>], joined: &mut Vec<u8>) {
        match self {
            Output::Stream(w) => {
                joined.clear();
                for r in records {
                    joined.extend_from_slice(r);
                }
                let _ = w.write_all(joined);
                let _ = w.flush();
            }
            Output::Journal { socket, path } => {
                for r in records {
                    let _ = socket.send_to(r, &*path);
                }
            }
        }
    }
}

/// The queue between the threads that log and the one that writes.
pub(super) struct Sink {
    pub(super) queue: Mutex<Queue>,
    /// A record was queued (the writer waits on it).
    pub(super) queued: Condvar,
    /// Records were written (waits for the writer wait on it).
    pub(super) written: Condvar,
}

#[derive(Default)]
pub(super) struct Queue {
    pub(super) records: VecDeque<Vec<u8>>,
    /// Bytes of the records queued or being written.
    pub(super) bytes: usize,
    /// Records queued since the start, and written (or lost) since.
    pub(super) pushed: u64,
    pub(super) done: u64,
    /// A wait for the writer gave up: none waits until it makes progress.
    pub(super) stuck: bool,
    pub(super) lost: Lost,
}

/// Records dropped since the last report.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Lost {
    pub(super) stderr_lines: u64,
    pub(super) others: u64,
    pub(super) since: Option<Instant>,
}

impl Queue {
    /// Queues `record` if its class's share of the queue has room for it;
    /// else counts it as lost. Returns its number when it is queued.
    pub(super) fn offer(&mut self, class: Class, record: Vec<u8>) -> Option<u64> {
        let limit = match class {
            Class::CommandStderr => STDERR_SHARE,
            Class::Other => CAPACITY,
        };
        if self.bytes + record.len() > limit {
            match class {
                Class::CommandStderr => self.lost.stderr_lines += 1,
                Class::Other => self.lost.others += 1,
            }
            self.lost.since.get_or_insert_with(Instant::now);
            return None;
        }
        self.bytes += record.len();
        self.records.push_back(record);
        self.pushed += 1;
        Some(self.pushed)
    }

    /// The records of the next write: from the front, `BATCH` bytes or
    /// one record, whichever is more. They stay counted in `bytes` until
    /// written.
    pub(super) fn next_batch(&mut self) -> Vec<Vec<u8>> {
        let mut size = 0;
        let mut batch = Vec::new();
        while let Some(r) = self.records.front() {
            if !batch.is_empty() && size + r.len() > BATCH {
                break;
            }
            size += r.len();
            batch.extend(self.records.pop_front());
        }
        batch
    }

    /// The losses to report now, if any: once the queue has room again for
    /// every class, at most once every `REPORT_EVERY`.
    pub(super) fn report_due(&mut self, last: Option<Instant>, now: Instant) -> Option<Lost> {
        let recent = last.is_some_and(|t| now < t + REPORT_EVERY);
        if self.lost.since.is_none() || recent || self.bytes >= STDERR_SHARE {
            return None;
        }
        Some(std::mem::take(&mut self.lost))
    }
}

impl Sink {
    /// A queue, and the thread that writes it to `output`.
    pub(super) fn start(output: Output) -> Arc<Sink> {
        let sink = Arc::new(Sink {
            queue: Mutex::new(Queue::default()),
            queued: Condvar::new(),
            written: Condvar::new(),
        });
        let writer = Arc::clone(&sink);
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || writer.write_out(output))
            .expect("cannot start the thread that writes the log");
        sink
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a formatted record, or counts it as lost if there is no room.
    /// Never waits for the writer, but on the main thread outside the
    /// event loop (see the module documentation).
    pub(super) fn push(&self, class: Class, record: Vec<u8>) {
        let mut q = self.lock();
        let Some(number) = q.offer(class, record) else {
            return;
        };
        self.queued.notify_one();
        if waits_for_its_records() {
            self.wait_done(q, number);
        }
    }

    /// Waits until what is queued now is written (see [`Sink::wait_done`]).
    pub(super) fn flush(&self) {
        let q = self.lock();
        let last = q.pushed;
        self.wait_done(q, last);
    }

    /// Waits until record `number` is written, unless the writer makes no
    /// progress for `PATIENCE` (or made none since an earlier wait gave up).
    pub(super) fn wait_done(&self, mut q: MutexGuard<'_, Queue>, number: u64) {
        let mut deadline = Instant::now() + PATIENCE;
        let mut done = q.done;
        while q.done < number && !q.stuck {
            if q.done > done {
                done = q.done;
                deadline = Instant::now() + PATIENCE;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                q.stuck = true;
                break;
            };
            q = self
                .written
                .wait_timeout(q, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The writer thread: writes what is queued, in order, and reports
    /// what was lost.
    pub(super) fn write_out(&self, mut output: Output) {
        let mut joined = Vec::new();
        let mut last_report = None;
        loop {
            let (batch, lost) = {
                let mut q = self.lock();
                loop {
                    let lost = q.report_due(last_report, Instant::now());
                    if lost.is_some() || !q.records.is_empty() {
                        break (q.next_batch(), lost);
                    }
                    // Losses not yet reported wait for REPORT_EVERY to pass.
                    q = if q.lost.since.is_some() {
                        self.queued
                            .wait_timeout(q, REPORT_EVERY)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0
                    } else {
                        self.queued.wait(q).unwrap_or_else(PoisonError::into_inner)
                    };
                }
            };
            if let Some(lost) = lost {
                last_report = Some(Instant::now());
                report(lost);
            }
            if batch.is_empty() {
                continue;
            }
            output.write(&batch, &mut joined);
            let mut q = self.lock();
            q.bytes -= batch.iter().map(Vec::len).sum::<usize>();
            q.done += batch.len() as u64;
            q.stuck = false;
            self.written.notify_all();
        }
    }
}

/// Logs that records were lost (from the writer thread, which only queues
/// it: it never waits on itself).
pub(super) fn report(lost: Lost) {
    let over = lost.since.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let total = lost.stderr_lines + lost.others;
    tracing::warn!(
        dropped_records = total,
        dropped_stderr_lines = lost.stderr_lines,
        "the log could not keep up: {total} record(s) dropped in {over:.1} s, {} of them \
         commands' stderr lines",
        lost.stderr_lines
    );
}

/// Whether this thread waits for its records to be written: the main
/// thread does, before the event loop runs and after it has ended.
pub(super) fn waits_for_its_records() -> bool {
    std::thread::current().name() == Some("main") && tokio::runtime::Handle::try_current().is_err()
}

/// The readable lines' writer: each record, as the fmt layer writes it,
/// goes to the queue whole.
pub(super) struct Queued(pub(super) Arc<Sink>);

impl<'a> MakeWriter<'a> for Queued {
    type Writer = Entry<'a>;

    fn make_writer(&'a self) -> Entry<'a> {
        Entry {
            sink: &self.0,
            class: Class::Other,
            record: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Entry<'a> {
        Entry {
            sink: &self.0,
            class: Class::of(meta),
            record: Vec::new(),
        }
    }
}

/// One record on its way to the queue, queued when dropped.
pub(super) struct Entry<'a> {
    pub(super) sink: &'a Sink,
    pub(super) class: Class,
    pub(super) record: Vec<u8>,
}

impl Write for Entry<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.record.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        if !self.record.is_empty() {
            self.sink.push(self.class, std::mem::take(&mut self.record));
        }
    }
}
