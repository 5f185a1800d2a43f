//! Logging: structured records to the journal under systemd, readable lines
//! on stderr otherwise.
//!
//! Fields are written as journal fields (`service` becomes `SERVICE`, and so on)
//! so that `journalctl -u splice-relay SERVICE=name` selects one service. The
//! filter comes from `RUST_LOG` when set, else from the config's `log_level`,
//! and follows the config on reload.
//!
//! # Never blocked by its own log
//!
//! No thread that logs writes to the log itself. A record is formatted
//! where it is logged (the readable line, or the journal's native-protocol
//! datagram) and put in a bounded queue; one thread of its own writes the
//! queue out, and is the only one that waits on a stderr pipe nobody drains
//! or on a journald that lags. Records that find the queue full are dropped
//! and counted, and once the writer catches up (at most once a second) one
//! warning says how many were lost.
//!
//! Under pressure a command's stderr lines (records with a `stream` field)
//! go first: they are queued only while the queue holds less than
//! `STDERR_SHARE` (1 MiB), everything else (the connections' records
//! above all) up to `CAPACITY` (4 MiB). One queue, so the log keeps the
//! order in which records were logged.
//!
//! Before the event loop runs and after it has ended, the main thread waits
//! for its own records to be written, and dropping [`Level`] (as the daemon
//! stops) waits for what is queued: an exit right after does not lose them.
//! Each such wait gives up after `PATIENCE` (1 s) without progress, and
//! none waits again until the writer has made some.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Bytes of formatted records the queue holds at most.
const CAPACITY: usize = 4 << 20;

/// A command's stderr lines are queued only while the queue holds less.
const STDERR_SHARE: usize = 1 << 20;

/// How long a wait for the writer lasts without progress (see the module
/// documentation).
const PATIENCE: Duration = Duration::from_secs(1);

/// Records lost are reported at most this often.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// The most the writer takes from the queue for one write to stderr.
const BATCH: usize = 64 * 1024;

/// Where journald takes native-protocol datagrams.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Changes the log filter of a running daemon. Dropped as the daemon stops,
/// it waits for the queued records to be written (see the module
/// documentation).
pub struct Level {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
    sink: Arc<Sink>,
}

impl Level {
    /// Applies the config's `log_level`, unless `RUST_LOG` decides.
    pub fn set(&self, level: &str) {
        if let (Some(h), Ok(filter)) = (&self.handle, level.parse::<EnvFilter>()) {
            let _ = h.reload(filter);
        }
    }
}

impl Drop for Level {
    fn drop(&mut self) {
        self.sink.flush();
    }
}

/// Installs the global subscriber and starts the thread that writes the
/// log. `level` is the config's `log_level`.
pub fn init(level: &str) -> Level {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<EnvFilter>().ok());
    let env_decides = from_env.is_some();
    let filter =
        from_env.unwrap_or_else(|| level.parse().unwrap_or_else(|_| EnvFilter::new("info")));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);

    let journal = if stderr_is_journal() {
        Output::journal(Path::new(JOURNAL_SOCKET)).ok()
    } else {
        None
    };
    let sink = match journal {
        Some(output) => {
            let sink = Sink::start(output);
            registry.with(Journal::new(Arc::clone(&sink))).init();
            sink
        }
        None => {
            let sink = Sink::start(Output::Stream(Box::new(io::stderr())));
            registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(Queued(Arc::clone(&sink)))
                        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
                        .with_target(false),
                )
                .init();
            sink
        }
    };
    Level {
        handle: (!env_decides).then_some(handle),
        sink,
    }
}

/// True when stderr is connected to the journal: systemd sets `JOURNAL_STREAM`
/// to the device and inode of that stream, and we check it is still ours
/// (a shell started from a unit inherits the variable, but not the stream).
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    match nix::sys::stat::fstat(io::stderr().as_fd()) {
        Ok(st) => dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino),
        Err(_) => false,
    }
}

/// Which records go first when the queue fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// A line of a command's stderr (it has a `stream` field).
    CommandStderr,
    /// Everything else: connection records, the daemon's own lines.
    Other,
}

impl Class {
    fn of(meta: &Metadata<'_>) -> Class {
        if meta.fields().field("stream").is_some() {
            Class::CommandStderr
        } else {
            Class::Other
        }
    }
}

/// Where the writer thread writes.
enum Output {
    /// Readable lines, on stderr.
    Stream(Box<dyn Write + Send>),
    /// Native-protocol datagrams to journald, one per record.
    Journal { socket: UnixDatagram, path: PathBuf },
}

impl Output {
    /// A socket to journald at `path`, if it takes an (empty) datagram.
    fn journal(path: &Path) -> io::Result<Output> {
        let socket = UnixDatagram::unbound()?;
        socket.send_to(&[], path)?;
        Ok(Output::Journal {
            socket,
            path: path.to_owned(),
        })
    }

    /// Writes `records`, blocking as long as the sink makes it. A record
    /// the sink refuses is lost (nothing better can be done with it).
    fn write(&mut self, records: &[Vec<u8>], joined: &mut Vec<u8>) {
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
struct Sink {
    queue: Mutex<Queue>,
    /// A record was queued (the writer waits on it).
    queued: Condvar,
    /// Records were written (waits for the writer wait on it).
    written: Condvar,
}

#[derive(Default)]
struct Queue {
    records: VecDeque<Vec<u8>>,
    /// Bytes of the records queued or being written.
    bytes: usize,
    /// Records queued since the start, and written (or lost) since.
    pushed: u64,
    done: u64,
    /// A wait for the writer gave up: none waits until it makes progress.
    stuck: bool,
    lost: Lost,
}

/// Records dropped since the last report.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
struct Lost {
    stderr_lines: u64,
    others: u64,
    since: Option<Instant>,
}

impl Queue {
    /// Queues `record` if its class's share of the queue has room for it;
    /// else counts it as lost. Returns its number when it is queued.
    fn offer(&mut self, class: Class, record: Vec<u8>) -> Option<u64> {
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
    fn next_batch(&mut self) -> Vec<Vec<u8>> {
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
    fn report_due(&mut self, last: Option<Instant>, now: Instant) -> Option<Lost> {
        let recent = last.is_some_and(|t| now < t + REPORT_EVERY);
        if self.lost.since.is_none() || recent || self.bytes >= STDERR_SHARE {
            return None;
        }
        Some(std::mem::take(&mut self.lost))
    }
}

impl Sink {
    /// A queue, and the thread that writes it to `output`.
    fn start(output: Output) -> Arc<Sink> {
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

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a formatted record, or counts it as lost if there is no room.
    /// Never waits for the writer, but on the main thread outside the
    /// event loop (see the module documentation).
    fn push(&self, class: Class, record: Vec<u8>) {
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
    fn flush(&self) {
        let q = self.lock();
        let last = q.pushed;
        self.wait_done(q, last);
    }

    /// Waits until record `number` is written, unless the writer makes no
    /// progress for `PATIENCE` (or made none since an earlier wait gave up).
    fn wait_done(&self, mut q: MutexGuard<'_, Queue>, number: u64) {
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
    fn write_out(&self, mut output: Output) {
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
fn report(lost: Lost) {
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
fn waits_for_its_records() -> bool {
    std::thread::current().name() == Some("main") && tokio::runtime::Handle::try_current().is_err()
}

/// The readable lines' writer: each record, as the fmt layer writes it,
/// goes to the queue whole.
struct Queued(Arc<Sink>);

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
struct Entry<'a> {
    sink: &'a Sink,
    class: Class,
    record: Vec<u8>,
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

/// Records in journald's native protocol, queued like any other record:
/// `PRIORITY` (ERROR 3, WARN 4, INFO 5, DEBUG 6, TRACE 7), `TARGET`,
/// `CODE_FILE`, `CODE_LINE`, `SYSLOG_IDENTIFIER=splice-relay`, `MESSAGE`,
/// and each of the event's fields under its name in capitals.
struct Journal {
    sink: Arc<Sink>,
}

impl Journal {
    fn new(sink: Arc<Sink>) -> Journal {
        Journal { sink }
    }

    /// The datagram of `event`.
    fn format(event: &Event<'_>) -> Vec<u8> {
        let meta = event.metadata();
        let mut buf = Vec::with_capacity(256);
        let priority = match *meta.level() {
            tracing::Level::ERROR => b"3",
            tracing::Level::WARN => b"4",
            tracing::Level::INFO => b"5",
            tracing::Level::DEBUG => b"6",
            tracing::Level::TRACE => b"7",
        };
        put_field(&mut buf, "PRIORITY", |b| b.extend_from_slice(priority));
        put_field(&mut buf, "TARGET", |b| {
            b.extend_from_slice(meta.target().as_bytes())
        });
        if let Some(file) = meta.file() {
            put_field(&mut buf, "CODE_FILE", |b| {
                b.extend_from_slice(file.as_bytes())
            });
        }
        if let Some(line) = meta.line() {
            put_field(&mut buf, "CODE_LINE", |b| {
                let _ = write!(b, "{line}");
            });
        }
        put_field(&mut buf, "SYSLOG_IDENTIFIER", |b| {
            b.extend_from_slice(b"splice-relay")
        });
        event.record(&mut Fields(&mut buf));
        buf
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for Journal {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        self.sink
            .push(Class::of(event.metadata()), Journal::format(event));
    }
}

/// An event's fields, as journal fields.
struct Fields<'a>(&'a mut Vec<u8>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        put_field(self.0, field.name(), |b| {
            b.extend_from_slice(value.as_bytes())
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        put_field(self.0, field.name(), |b| {
            let _ = write!(b, "{value:?}");
        });
    }
}

/// Appends a field in the native protocol's length-prefixed form, which
/// takes any value: `NAME`, newline, the value's length (64 bits, little
/// endian), the value, newline. The name as journald wants it: `.` becomes
/// `_`, leading `_` and characters other than ASCII letters, digits and `_`
/// are left out, letters in capitals.
fn put_field(buf: &mut Vec<u8>, name: &str, value: impl FnOnce(&mut Vec<u8>)) {
    buf.extend(
        name.bytes()
            .map(|c| if c == b'.' { b'_' } else { c })
            .skip_while(|&c| c == b'_')
            .filter(|&c| c == b'_' || c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_uppercase()),
    );
    buf.push(b'\n');
    let at = buf.len();
    buf.extend_from_slice(&[0; 8]);
    value(buf);
    let len = (buf.len() - at - 8) as u64;
    buf[at..at + 8].copy_from_slice(&len.to_le_bytes());
    buf.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize) -> Vec<u8> {
        vec![b'x'; n]
    }

    /// A command's stderr lines are refused once the queue holds
    /// `STDERR_SHARE`; records still fit up to `CAPACITY`; both are counted.
    #[test]
    fn stderr_lines_are_dropped_first() {
        let mut q = Queue::default();
        let mut stderr_queued = 0;
        while q.offer(Class::CommandStderr, record(1000)).is_some() {
            stderr_queued += 1;
        }
        assert_eq!(stderr_queued, STDERR_SHARE / 1000);
        assert_eq!(q.lost.stderr_lines, 1);
        let mut others = 0;
        while q.offer(Class::Other, record(1000)).is_some() {
            others += 1;
        }
        assert_eq!(stderr_queued + others, CAPACITY / 1000);
        assert_eq!((q.lost.stderr_lines, q.lost.others), (1, 1));
        assert!(q.offer(Class::CommandStderr, record(10)).is_none());
        // Reported once there is room again, then not within REPORT_EVERY.
        let now = Instant::now();
        assert_eq!(q.report_due(None, now), None, "still full");
        while q.bytes >= STDERR_SHARE {
            let written: usize = q.next_batch().iter().map(Vec::len).sum();
            q.bytes -= written;
        }
        let lost = q.report_due(None, now).unwrap();
        assert_eq!((lost.stderr_lines, lost.others), (2, 1));
        q.offer(Class::Other, record(CAPACITY + 1));
        assert_eq!(q.report_due(Some(now), now), None, "too soon");
        assert!(q.report_due(Some(now), now + REPORT_EVERY).is_some());
    }

    #[test]
    fn a_batch_is_one_record_at_least_and_keeps_the_order() {
        let mut q = Queue::default();
        for n in [BATCH * 2, 10, 20, BATCH - 20, 5] {
            q.offer(Class::Other, record(n));
        }
        let sizes = |b: Vec<Vec<u8>>| b.iter().map(Vec::len).collect::<Vec<_>>();
        assert_eq!(sizes(q.next_batch()), [BATCH * 2]);
        assert_eq!(sizes(q.next_batch()), [10, 20]);
        assert_eq!(sizes(q.next_batch()), [BATCH - 20, 5]);
        assert!(q.next_batch().is_empty());
    }

    /// A sink whose pipe nobody reads takes every record at once: those
    /// over its capacity are counted as lost, none blocks the caller.
    #[test]
    fn an_unread_pipe_blocks_no_one() {
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let sink = Sink::start(Output::Stream(Box::new(std::fs::File::from(write_end))));
        let started = Instant::now();
        for _ in 0..20_000 {
            sink.push(Class::Other, record(400));
        }
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "{took:?}");
        let q = sink.lock();
        assert!(q.lost.others > 0, "8 MB fit in a pipe and a 4 MiB queue?");
        assert!(q.bytes <= CAPACITY);
        drop(q);
        drop(read_end);
    }

    /// What the journal receives: the native protocol's fields.
    #[test]
    fn journal_datagrams_carry_the_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let journald = UnixDatagram::bind(&path).unwrap();
        let sink = Sink::start(Output::journal(&path).unwrap());
        let mut buf = vec![0u8; 65536];
        // The empty datagram that tells the socket is there.
        assert_eq!(journald.recv(&mut buf).unwrap(), 0);
        let subscriber = tracing_subscriber::registry().with(Journal::new(Arc::clone(&sink)));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                conn = 7,
                service = "a\nb",
                pid = 12,
                stream = "stderr",
                "hello"
            );
        });
        let n = journald.recv(&mut buf).unwrap();
        let fields = parse(&buf[..n]);
        let get = |k: &str| {
            fields
                .iter()
                .find(|(name, _)| name == k)
                .map(|(_, v)| v.as_str())
                .unwrap_or_else(|| panic!("no {k} in {fields:?}"))
        };
        assert_eq!(get("MESSAGE"), "hello");
        assert_eq!(get("PRIORITY"), "5");
        assert_eq!(get("SYSLOG_IDENTIFIER"), "splice-relay");
        assert_eq!(get("CONN"), "7");
        assert_eq!(get("SERVICE"), "a\nb");
        assert_eq!(get("PID"), "12");
        assert_eq!(get("STREAM"), "stderr");
        assert_eq!(get("TARGET"), module_path!());
        assert!(get("CODE_FILE").ends_with("log.rs"));
        get("CODE_LINE").parse::<u32>().unwrap();
    }

    /// Parses length-prefixed fields.
    fn parse(mut d: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while !d.is_empty() {
            let nl = d.iter().position(|&b| b == b'\n').unwrap();
            let name = String::from_utf8(d[..nl].to_vec()).unwrap();
            let len = u64::from_le_bytes(d[nl + 1..nl + 9].try_into().unwrap()) as usize;
            let value = String::from_utf8(d[nl + 9..nl + 9 + len].to_vec()).unwrap();
            assert_eq!(d[nl + 9 + len], b'\n');
            out.push((name, value));
            d = &d[nl + 10 + len..];
        }
        out
    }
}
