//! The daemon under test, started the way systemd starts it: listening
//! sockets at fd 3 onwards and no other descriptor above 2, `LISTEN_FDS`,
//! `LISTEN_FDNAMES`, `LISTEN_PID` equal to the daemon's own pid (and, when
//! asked, `WATCHDOG_USEC` with `WATCHDOG_PID`), and a `NOTIFY_SOCKET` read
//! here, so tests wait for READY=1 (and the other notifications) instead of
//! sleeping; each notification is timed as the test receives it. Its
//! stderr is kept line by line (`SPLICE_RELAY_TEST_ECHO=1` echoes it), and
//! the tests wait on it for log lines and connection records.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};

use super::{procfs, Record, BIN, PATIENCE};

/// The shell between the fork and the daemon, run with the daemon's command
/// line as its arguments. From the environment, each removed before the exec:
/// - `SR_KEEP`: the first descriptor not passed. It closes that one and every
///   one above, so the daemon starts with 0, 1, 2 and its sockets whatever
///   the test runner left open without close-on-exec, as under systemd
///   (bash, since dash cannot name a descriptor above 9);
/// - `SR_FDS`, `SR_NAMES`: `LISTEN_FDS`, `LISTEN_FDNAMES`, and `LISTEN_PID`
///   its own pid, which the daemon keeps across the exec;
/// - `SR_OWN_PID`: `LISTEN_PID` its own pid, the rest as given (raw_listen);
/// - `SR_WATCHDOG`: `WATCHDOG_USEC`, and `WATCHDOG_PID` its own pid;
/// - `SR_NOFILE`: `ulimit -n`, the soft and the hard limit; `SR_NOFILE_SOFT`
///   (in `env`) the soft one alone;
/// - `SR_CGROUP`: it moves itself into that cgroup.
const TRAMPOLINE: &str = r#"
for f in /proc/self/fd/*; do
    n=${f##*/}
    if [ "$n" -ge "$SR_KEEP" ]; then eval "exec $n>&-"; fi
done
if [ -n "$SR_FDS" ]; then export LISTEN_PID=$$ LISTEN_FDS=$SR_FDS LISTEN_FDNAMES=$SR_NAMES; fi
if [ -n "$SR_OWN_PID" ]; then export LISTEN_PID=$$; fi
if [ -n "$SR_WATCHDOG" ]; then export WATCHDOG_USEC=$SR_WATCHDOG WATCHDOG_PID=$$; fi
if [ -n "$SR_NOFILE" ]; then ulimit -n "$SR_NOFILE" || exit 125; fi
if [ -n "$SR_NOFILE_SOFT" ]; then ulimit -S -n "$SR_NOFILE_SOFT" || exit 125; fi
if [ -n "$SR_CGROUP" ]; then echo $$ > "$SR_CGROUP/cgroup.procs" || exit 125; fi
unset SR_KEEP SR_FDS SR_NAMES SR_OWN_PID SR_WATCHDOG SR_NOFILE SR_NOFILE_SOFT SR_CGROUP
exec "$0" "$@"
"#;

/// A socket to pass to the daemon, with its FileDescriptorName=.
pub struct Passed {
    pub fd: OwnedFd,
    pub name: String,
}

pub fn tcp_listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

pub fn pass_tcp(name: &str) -> (Passed, SocketAddr) {
    let (l, a) = tcp_listener();
    let passed = Passed {
        fd: l.into(),
        name: name.into(),
    };
    (passed, a)
}

pub fn pass_unix(path: &Path, name: &str) -> Passed {
    Passed {
        fd: UnixListener::bind(path).unwrap().into(),
        name: name.into(),
    }
}

#[derive(Default)]
pub struct Options {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Socket-activation variables set verbatim instead of the harness's
    /// (the sockets still go to fd 3 onwards).
    pub raw_listen: Option<RawListen>,
    /// RLIMIT_NOFILE, soft and hard, for the daemon (`ulimit -n` in the trampoline).
    pub nofile: Option<u64>,
    /// Run the daemon as this uid and gid, without supplementary groups. The
    /// temporary directory, the config and the notify socket are made
    /// accessible to it.
    pub user: Option<(u32, u32)>,
    /// Start the daemon inside this cgroup (its directory), as systemd starts
    /// a service inside the unit's cgroup.
    pub cgroup: Option<PathBuf>,
    /// The watchdog interval, set as systemd sets it for `WatchdogSec=`:
    /// `WATCHDOG_USEC` and `WATCHDOG_PID` the daemon's own pid.
    pub watchdog: Option<Duration>,
    /// The daemon's stderr is a pipe nobody reads until
    /// [`Daemon::read_log_now`] (a log sink that has stopped).
    pub log_unread: bool,
}

impl Options {
    /// Options that add `vars` to the daemon's environment.
    pub fn env(vars: &[(&str, &str)]) -> Options {
        let env = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Options {
            env: env.collect(),
            ..Options::default()
        }
    }

    /// Options that enable the watchdog with `interval`, as systemd does.
    pub fn watchdog(interval: Duration) -> Options {
        Options {
            watchdog: Some(interval),
            ..Options::default()
        }
    }

    /// Options that set the socket-activation variables as `raw` says.
    pub fn raw_listen(raw: RawListen) -> Options {
        Options {
            raw_listen: Some(raw),
            ..Options::default()
        }
    }
}

/// `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` exactly as given (None: unset).
#[derive(Default, Clone, Copy, Debug)]
pub struct RawListen {
    pub fds: Option<&'static str>,
    pub names: Option<&'static str>,
    pub pid: RawPid,
}

/// What `LISTEN_PID` is set to.
#[derive(Default, Clone, Copy, Debug)]
pub enum RawPid {
    /// The daemon's own pid, as systemd sets it.
    #[default]
    Own,
    Value(&'static str),
    Unset,
}

/// Notifications, read by a thread that drains the socket at once, as
/// systemd does: the daemon's sd_notify send blocks while the socket's queue
/// is full (net.unix.max_dgram_qlen, often 10 datagrams), and a blocked send
/// stalls the daemon (tests/faults/notify.rs).
struct Inbox {
    /// Each datagram with the time the reader received it.
    queue: Mutex<VecDeque<(Instant, String)>>,
    arrived: Condvar,
    /// While set, the socket is not read (a service manager that lags).
    paused: AtomicBool,
    /// Set to have the thread read what is queued, then end.
    stop: AtomicBool,
}

/// The daemon's stderr, line by line.
struct Log {
    state: Mutex<LogState>,
    grew: Condvar,
}

struct LogState {
    lines: Vec<String>,
    /// The daemon's stderr reached end-of-file: no line will be added.
    closed: bool,
}

/// A running daemon, killed on drop.
pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    notify_path: PathBuf,
    inbox: Arc<Inbox>,
    reader: Option<JoinHandle<()>>,
    /// Every notification taken so far (by [`Daemon::wait_note`] or
    /// [`Daemon::all_notes`]), one entry per datagram.
    pub notes: Vec<String>,
    log: Arc<Log>,
    /// The daemon's stderr, while `log_unread` keeps it unread.
    unread: Option<std::process::ChildStderr>,
}

impl Daemon {
    /// Starts the daemon on `config` with `sockets` at fd 3, 4, … and waits for READY=1.
    pub fn start(config: &str, sockets: Vec<Passed>) -> Daemon {
        let mut d = Daemon::spawn(config, sockets, Options::default());
        d.wait_note("READY=1");
        d
    }

    /// Starts the daemon without waiting for anything.
    pub fn spawn(config: &str, sockets: Vec<Passed>, opts: Options) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("splice-relay.toml");
        std::fs::write(&config_path, config).unwrap();
        let notify_path = dir.path().join("notify");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        if opts.user.is_some() {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path, m: u32| {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
            };
            mode(dir.path(), 0o755);
            mode(&config_path, 0o644);
            mode(&notify_path, 0o666);
        }
        let (inbox, reader) = read_notifications(notify);

        let names: Vec<String> = sockets.iter().map(|s| s.name.clone()).collect();
        let count = sockets.len();
        let mappings = sockets
            .into_iter()
            .enumerate()
            .map(|(i, s)| FdMapping {
                parent_fd: s.fd,
                child_fd: 3 + i as i32,
            })
            .collect();
        // What only the child can know or do (its own pid, its descriptor
        // table, its limits, its cgroup), done by a shell that then execs the
        // daemon in its place: see TRAMPOLINE.
        let mut cmd = Command::new("/bin/bash");
        cmd.arg("-c")
            .arg(TRAMPOLINE)
            .arg(BIN)
            .arg("--config")
            .arg(&config_path)
            .args(&opts.args)
            .env("SR_KEEP", (3 + count).to_string())
            .env_remove("JOURNAL_STREAM")
            .env_remove("RUST_LOG")
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // What would change the trampoline itself: a file bash reads first,
        // options (xtrace writes to the daemon's stderr), functions that
        // stand in for the builtins it uses.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("BASH_FUNC_")
                || ["BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS"].contains(&&*name)
            {
                cmd.env_remove(&*name);
            }
        }
        match &opts.raw_listen {
            None if count > 0 => {
                cmd.env("SR_FDS", count.to_string())
                    .env("SR_NAMES", names.join(":"));
            }
            None => {}
            Some(raw) => {
                for (var, value) in [("LISTEN_FDS", raw.fds), ("LISTEN_FDNAMES", raw.names)] {
                    match value {
                        Some(v) => cmd.env(var, v),
                        None => cmd.env_remove(var),
                    };
                }
                match raw.pid {
                    RawPid::Own => cmd.env("SR_OWN_PID", "1").env_remove("LISTEN_PID"),
                    RawPid::Value(v) => cmd.env("LISTEN_PID", v),
                    RawPid::Unset => cmd.env_remove("LISTEN_PID"),
                };
            }
        }
        if let Some(interval) = opts.watchdog {
            cmd.env("SR_WATCHDOG", interval.as_micros().to_string());
        }
        if let Some(n) = opts.nofile {
            cmd.env("SR_NOFILE", n.to_string());
        }
        if let Some(cgroup) = &opts.cgroup {
            cmd.env("SR_CGROUP", cgroup);
        }
        if let Some((uid, gid)) = opts.user {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        cmd.fd_mappings(mappings).unwrap();
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Log {
            state: Mutex::new(LogState {
                lines: Vec::new(),
                closed: false,
            }),
            grew: Condvar::new(),
        });
        let unread = if opts.log_unread {
            Some(stderr)
        } else {
            read_log(stderr, &log);
            None
        };
        Daemon {
            child,
            dir,
            config_path,
            notify_path,
            inbox,
            reader: Some(reader),
            notes: Vec::new(),
            log,
            unread,
        }
    }

    /// Starts reading the daemon's stderr, left unread so far (`log_unread`).
    pub fn read_log_now(&mut self) {
        let stderr = self.unread.take().expect("the log is read already");
        read_log(stderr, &self.log);
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    // --- Notifications

    /// Stops (true) or resumes (false) reading the notify socket.
    pub fn pause_notifications(&self, paused: bool) {
        self.inbox.paused.store(paused, Ordering::Relaxed);
    }

    /// Waits for a notification datagram containing `needle` and returns it.
    /// Datagrams received on the way are kept in `notes`.
    pub fn wait_note(&mut self, needle: &str) -> String {
        self.wait_note_timed(needle).1
    }

    /// [`Daemon::wait_note`], with the time the test received the datagram.
    pub fn wait_note_timed(&mut self, needle: &str) -> (Instant, String) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let next = {
                let mut q = self.inbox.queue.lock().unwrap();
                if q.is_empty() {
                    q = self
                        .inbox
                        .arrived
                        .wait_timeout(q, Duration::from_millis(100))
                        .unwrap()
                        .0;
                }
                q.pop_front()
            };
            if let Some((at, note)) = next {
                self.notes.push(note.clone());
                if note.contains(needle) {
                    return (at, note);
                }
                continue;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                // Sent just before the exit, maybe, and not read yet.
                if self.reader.is_some() {
                    self.stop_reading();
                    continue;
                }
                panic!(
                    "daemon exited ({status}) before notifying {needle:?}; got {:?}; log:\n{}",
                    self.notes,
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no notification {needle:?}; got {:?}; log:\n{}",
                self.notes,
                self.log_text()
            );
        }
    }

    /// Every notification the daemon sent, in order, once it has exited: the
    /// socket is read to its end, so one missing here was never sent.
    pub fn all_notes(&mut self) -> &[String] {
        assert!(
            self.child.try_wait().unwrap().is_some(),
            "all_notes: the daemon still runs (wait_exit first)"
        );
        self.stop_reading();
        let rest: Vec<String> = self
            .inbox
            .queue
            .lock()
            .unwrap()
            .drain(..)
            .map(|(_, note)| note)
            .collect();
        self.notes.extend(rest);
        &self.notes
    }

    /// Every notification received from now until `deadline`, with the time
    /// the test received it (also kept in `notes`). It looks at the socket
    /// only, never at the process, so it serves while the daemon's threads
    /// are held (see [`super::HeldThreads`]).
    pub fn notes_until(&mut self, deadline: Instant) -> Vec<(Instant, String)> {
        let mut out = Vec::new();
        let mut q = self.inbox.queue.lock().unwrap();
        loop {
            while let Some((at, note)) = q.pop_front() {
                self.notes.push(note.clone());
                out.push((at, note));
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return out;
            };
            q = self.inbox.arrived.wait_timeout(q, left).unwrap().0;
        }
    }

    /// Every notification the daemon has sent up to now, with the time the
    /// test received it (also kept in `notes`). A datagram socket keeps the
    /// order of what is sent to it, so the test sends a mark of its own and
    /// reads up to it: what the daemon sent before is before the mark.
    pub fn notes_so_far(&mut self) -> Vec<(Instant, String)> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mark = format!("TEST-MARK={}", NEXT.fetch_add(1, Ordering::Relaxed));
        UnixDatagram::unbound()
            .unwrap()
            .send_to(mark.as_bytes(), &self.notify_path)
            .unwrap();
        let deadline = Instant::now() + PATIENCE;
        let mut out = Vec::new();
        let mut q = self.inbox.queue.lock().unwrap();
        loop {
            while let Some((at, note)) = q.pop_front() {
                if note == mark {
                    return out;
                }
                self.notes.push(note.clone());
                out.push((at, note));
            }
            let left = deadline.checked_duration_since(Instant::now());
            let left = left.unwrap_or_else(|| panic!("{mark} did not come back; got {out:?}"));
            q = self.inbox.arrived.wait_timeout(q, left).unwrap().0;
        }
    }

    /// Has the reader take what is queued on the socket and end.
    fn stop_reading(&mut self) {
        self.inbox.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the notification reader panicked");
        }
    }

    // --- The log

    /// Waits until `found` gives Some for the lines logged so far (it is
    /// called again as lines arrive, and may keep its own cursor). Fails
    /// after [`PATIENCE`], or at once when stderr has closed, saying `what`
    /// was awaited.
    fn wait_for<T>(&self, what: &str, mut found: impl FnMut(&[String]) -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        let mut state = self.log.state.lock().unwrap();
        loop {
            if let Some(t) = found(&state.lines) {
                return t;
            }
            let tail = |lines: &[String]| lines[lines.len().saturating_sub(60)..].join("\n");
            assert!(
                !state.closed,
                "{what}: not logged before the daemon's stderr closed; log tail:\n{}",
                tail(&state.lines)
            );
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                panic!(
                    "{what}: not logged within {PATIENCE:?}; log tail:\n{}",
                    tail(&state.lines)
                );
            };
            state = self.log.grew.wait_timeout(state, left).unwrap().0;
        }
    }

    /// Waits for a log line containing every one of `needles`; returns it.
    pub fn wait_log(&self, needles: &[&str]) -> String {
        self.wait_line_from(0, |l| needles.iter().all(|n| l.contains(n)))
            .1
    }

    /// Waits for a line at index `from` or later for which `pick` is true;
    /// returns its index and the line. Each line is looked at once per call.
    pub fn wait_line_from(
        &self,
        from: usize,
        mut pick: impl FnMut(&str) -> bool,
    ) -> (usize, String) {
        let mut next = from;
        self.wait_for(&format!("a matching line from line {from} on"), |lines| {
            while next < lines.len() {
                if pick(&lines[next]) {
                    return Some((next, lines[next].clone()));
                }
                next += 1;
            }
            None
        })
    }

    /// Log lines containing every one of `needles`.
    pub fn log_lines(&self, needles: &[&str]) -> Vec<String> {
        let state = self.log.state.lock().unwrap();
        state
            .lines
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .cloned()
            .collect()
    }

    pub fn log_text(&self) -> String {
        self.log.state.lock().unwrap().lines.join("\n")
    }

    /// Lines logged so far; a cursor for [`Daemon::wait_line_from`] and
    /// [`Daemon::wait_record_from`].
    pub fn log_len(&self) -> usize {
        self.log.state.lock().unwrap().lines.len()
    }

    /// The TCP address the daemon bound itself (`listen = "127.0.0.1:0"`),
    /// from its "listening" line.
    pub fn bound_tcp_addr(&self) -> SocketAddr {
        let line = self.wait_log(&["listening", "listener=127.0.0.1:"]);
        let addr = line.rsplit("listener=").next().unwrap().trim();
        addr.parse()
            .unwrap_or_else(|e| panic!("{addr:?}: {e}; in {line}"))
    }

    // --- Connection records

    /// Every connection record logged so far.
    pub fn records(&self) -> Vec<Record> {
        let state = self.log.state.lock().unwrap();
        state
            .lines
            .iter()
            .filter_map(|l| Record::from_line(l))
            .collect()
    }

    /// Waits until at least `n` connections have their record; returns all
    /// the records. Counts as lines arrive, so it suits logs of 100,000 lines.
    pub fn wait_records(&self, n: usize) -> Vec<Record> {
        self.wait_records_where(n, |_| true)
    }

    /// Waits until at least `n` records satisfy `pick`; returns those.
    pub fn wait_records_where(
        &self,
        n: usize,
        mut pick: impl FnMut(&Record) -> bool,
    ) -> Vec<Record> {
        let (mut seen, mut count) = (0, 0);
        self.wait_for(&format!("{n} connection records"), |lines| {
            count += lines[seen..]
                .iter()
                .filter_map(|l| Record::from_line(l))
                .filter(&mut pick)
                .count();
            seen = lines.len();
            (count >= n).then_some(())
        });
        self.records().into_iter().filter(pick).collect()
    }

    /// Waits for the record of connection `conn` (the daemon numbers them
    /// from 1) and returns it; a second record for it fails.
    pub fn wait_record(&self, conn: u64) -> Record {
        let record = self.wait_record_from(0, |r| r.conn == conn);
        let all: Vec<Record> = self
            .records()
            .into_iter()
            .filter(|r| r.conn == conn)
            .collect();
        assert_eq!(
            all.len(),
            1,
            "connection {conn} has {} records: {all:#?}",
            all.len()
        );
        record
    }

    /// Waits for the first record for which `pick` is true.
    pub fn wait_record_where(&self, pick: impl FnMut(&Record) -> bool) -> Record {
        self.wait_record_from(0, pick)
    }

    /// Waits for the first record at line `from` or later for which `pick`
    /// is true.
    pub fn wait_record_from(&self, from: usize, mut pick: impl FnMut(&Record) -> bool) -> Record {
        let mut next = from;
        self.wait_for(&format!("a matching record from line {from} on"), |lines| {
            while next < lines.len() {
                let record = Record::from_line(&lines[next]);
                next += 1;
                if let Some(r) = record.filter(&mut pick) {
                    return Some(r);
                }
            }
            None
        })
    }

    // --- The process

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the daemon to exit; fails after PATIENCE.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = &mut self.child;
        let status = match super::poll(PATIENCE, || child.try_wait().unwrap()) {
            Some(status) => status,
            None => panic!("daemon did not exit; log:\n{}", self.log_text()),
        };
        // What it logged is all read before the caller looks at the log:
        // the reader thread may still be behind the exit.
        let deadline = Instant::now() + PATIENCE;
        let mut state = self.log.state.lock().unwrap();
        while !state.closed {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            state = self.log.grew.wait_timeout(state, left).unwrap().0;
        }
        status
    }

    /// Processes whose parent is the daemon (commands, running or zombie).
    pub fn children(&self) -> Vec<i32> {
        procfs::children_of(self.pid())
    }

    /// Open descriptors of the daemon.
    pub fn fd_count(&self) -> usize {
        procfs::fd_count(self.pid())
    }

    /// The daemon's descriptor count without a STATUS= socket of the moment
    /// (it opens one for each it sends, at most once a second): the least of
    /// a few looks 10 ms apart. A leaked descriptor is in every look.
    pub fn steady_fd_count(&self) -> usize {
        (0..5)
            .map(|i| {
                if i > 0 {
                    std::thread::sleep(Duration::from_millis(10));
                }
                self.fd_count()
            })
            .min()
            .unwrap()
    }

    /// Descriptors and pipes with no connection running, for
    /// [`Daemon::assert_fds_back`].
    pub fn fd_baseline(&self) -> (usize, usize) {
        (self.steady_fd_count(), procfs::pipe_fd_count(self.pid()))
    }

    /// Waits (up to 2 s) for the daemon's descriptors and pipes to be back to
    /// `baseline`, then asserts they are: one look could catch a STATUS=
    /// socket; a descriptor that stays is a leak.
    pub fn assert_fds_back(&self, baseline: (usize, usize)) {
        let pid = self.pid();
        let now = || (self.fd_count(), procfs::pipe_fd_count(pid));
        if now() != baseline {
            eprintln!(
                "descriptors: {baseline:?} (all, pipes) expected, a first look found {:?}",
                procfs::fd_targets(pid)
            );
        }
        let back = super::poll(Duration::from_secs(2), || (now() == baseline).then_some(()));
        assert!(
            back.is_some(),
            "descriptors and pipes {:?}, not back to {baseline:?}: {:?}",
            now(),
            procfs::fd_targets(pid)
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.inbox.stop.store(true, Ordering::Relaxed);
        // Killing a daemon that has already exited fails: nothing to do then.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the thread that reads `notify` into the returned inbox.
fn read_notifications(notify: UnixDatagram) -> (Arc<Inbox>, JoinHandle<()>) {
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let inbox = Arc::new(Inbox {
        queue: Mutex::new(VecDeque::new()),
        arrived: Condvar::new(),
        paused: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });
    let shared = Arc::clone(&inbox);
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        let take = |n: usize, buf: &[u8]| {
            let at = Instant::now();
            let note = String::from_utf8_lossy(&buf[..n]).into_owned();
            shared.queue.lock().unwrap().push_back((at, note));
            shared.arrived.notify_all();
        };
        while !shared.stop.load(Ordering::Relaxed) {
            if shared.paused.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            // A timeout, to look at the flags again.
            if let Ok(n) = notify.recv(&mut buf) {
                take(n, &buf);
            }
        }
        // Whatever was sent before the stop is queued on the socket.
        notify.set_nonblocking(true).unwrap();
        while let Ok(n) = notify.recv(&mut buf) {
            take(n, &buf);
        }
    });
    (inbox, reader)
}

/// Starts the thread that keeps the daemon's stderr, line by line, in `log`.
fn read_log(stderr: std::process::ChildStderr, log: &Arc<Log>) {
    let sink = Arc::clone(log);
    let echo = std::env::var_os("SPLICE_RELAY_TEST_ECHO").is_some();
    std::thread::spawn(move || {
        // Lossy: a line that is not UTF-8 is still a line to look at.
        for line in BufReader::new(stderr).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            if echo {
                eprintln!("daemon: {line}");
            }
            sink.state.lock().unwrap().lines.push(line);
            sink.grew.notify_all();
        }
        sink.state.lock().unwrap().closed = true;
        sink.grew.notify_all();
    });
}
