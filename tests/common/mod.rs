//! Runs the real `splice-relay` binary the way systemd does: listening sockets
//! at fd 3 onwards, `LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID` equal to the
//! daemon's own pid, and a `NOTIFY_SOCKET` this harness reads, so tests wait
//! for READY=1 (and the other notifications) instead of sleeping.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};

pub const BIN: &str = env!("CARGO_BIN_EXE_splice-relay");

/// How long any wait in a test may take before it fails.
pub const PATIENCE: Duration = Duration::from_secs(30);

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
    (
        Passed {
            fd: l.into(),
            name: name.into(),
        },
        a,
    )
}

pub fn pass_unix(path: &Path, name: &str) -> Passed {
    let l = UnixListener::bind(path).unwrap();
    Passed {
        fd: l.into(),
        name: name.into(),
    }
}

/// A running daemon, killed on drop.
pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// Notifications read so far by a thread that drains the socket at once,
    /// as systemd does: the daemon's sd_notify send blocks while the socket's
    /// queue is full (net.unix.max_dgram_qlen, often 10 datagrams), and a
    /// blocked send stalls the daemon (tests/faults.rs,
    /// `a_lagging_service_manager_does_not_stop_the_daemon`).
    received: Arc<(Mutex<std::collections::VecDeque<String>>, Condvar)>,
    /// While set, the notify socket is not read (a service manager that lags).
    notify_paused: Arc<std::sync::atomic::AtomicBool>,
    /// Every notification received so far, one entry per datagram.
    pub notes: Vec<String>,
    log: Arc<(Mutex<Vec<String>>, Condvar)>,
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
}

/// `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` exactly as given (None: unset).
#[derive(Default, Clone)]
pub struct RawListen {
    pub fds: Option<String>,
    pub names: Option<String>,
    pub pid: RawPid,
}

/// What `LISTEN_PID` is set to.
#[derive(Default, Clone)]
pub enum RawPid {
    /// The daemon's own pid, as systemd sets it.
    #[default]
    Own,
    Value(String),
    Unset,
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
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let received = Arc::new((
            Mutex::new(std::collections::VecDeque::new()),
            Condvar::new(),
        ));
        let inbox = Arc::clone(&received);
        let notify_paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let paused = Arc::clone(&notify_paused);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            // Until the Daemon is dropped.
            while Arc::strong_count(&inbox) > 1 {
                if paused.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                if let Ok(n) = notify.recv(&mut buf) {
                    let (queue, cv) = &*inbox;
                    queue
                        .lock()
                        .unwrap()
                        .push_back(String::from_utf8_lossy(&buf[..n]).into_owned());
                    cv.notify_all();
                }
            }
        });

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
        // LISTEN_PID must be the daemon's pid, known only after the fork: a
        // shell sets it to its own pid and execs the daemon in its place.
        let mut cmd = Command::new("/bin/sh");
        // SR_OWN_PID: LISTEN_PID is the daemon's pid, the rest as given (raw_listen).
        // SR_NOFILE: dash's `ulimit -n` sets the soft and the hard limit;
        // SR_NOFILE_SOFT (in `env`) the soft one alone.
        cmd.arg("-c")
            .arg(r#"if [ -n "$SR_FDS" ]; then export LISTEN_PID=$$ LISTEN_FDS=$SR_FDS LISTEN_FDNAMES=$SR_NAMES; fi; if [ -n "$SR_OWN_PID" ]; then export LISTEN_PID=$$; fi; if [ -n "$SR_NOFILE" ]; then ulimit -n "$SR_NOFILE" || exit 125; fi; if [ -n "$SR_NOFILE_SOFT" ]; then ulimit -S -n "$SR_NOFILE_SOFT" || exit 125; fi; unset SR_FDS SR_NAMES SR_OWN_PID SR_NOFILE SR_NOFILE_SOFT; exec "$0" "$@""#)
            .arg(BIN)
            .arg("--config")
            .arg(&config_path)
            .args(&opts.args)
            .env_remove("JOURNAL_STREAM")
            .env_remove("RUST_LOG")
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        match &opts.raw_listen {
            None if count > 0 => {
                cmd.env("SR_FDS", count.to_string())
                    .env("SR_NAMES", names.join(":"));
            }
            None => {}
            Some(raw) => {
                for (var, value) in [("LISTEN_FDS", &raw.fds), ("LISTEN_FDNAMES", &raw.names)] {
                    match value {
                        Some(v) => cmd.env(var, v),
                        None => cmd.env_remove(var),
                    };
                }
                match &raw.pid {
                    RawPid::Own => cmd.env("SR_OWN_PID", "1").env_remove("LISTEN_PID"),
                    RawPid::Value(v) => cmd.env("LISTEN_PID", v),
                    RawPid::Unset => cmd.env_remove("LISTEN_PID"),
                };
            }
        }
        if let Some(n) = opts.nofile {
            cmd.env("SR_NOFILE", n.to_string());
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

        let log = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("SPLICE_RELAY_TEST_ECHO").is_some() {
                    eprintln!("daemon: {line}");
                }
                let (lines, cv) = &*sink;
                lines.lock().unwrap().push(line);
                cv.notify_all();
            }
        });
        Daemon {
            child,
            dir,
            config_path,
            received,
            notify_paused,
            notes: Vec::new(),
            log,
        }
    }

    /// Stops (true) or resumes (false) reading the notify socket.
    pub fn pause_notifications(&self, paused: bool) {
        self.notify_paused
            .store(paused, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for a notification datagram containing `needle` and returns it.
    /// Datagrams received on the way are kept in `notes`.
    pub fn wait_note(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let next = {
                let (queue, cv) = &*self.received;
                let mut q = queue.lock().unwrap();
                if q.is_empty() {
                    q = cv.wait_timeout(q, Duration::from_millis(100)).unwrap().0;
                }
                q.pop_front()
            };
            if let Some(note) = next {
                self.notes.push(note.clone());
                if note.contains(needle) {
                    return note;
                }
                continue;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "daemon exited ({status}) before notifying {needle:?}; log:\n{}",
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

    /// Waits for a log line containing every one of `needles`; returns it.
    pub fn wait_log(&self, needles: &[&str]) -> String {
        let (lines, cv) = &*self.log;
        let deadline = Instant::now() + PATIENCE;
        let mut guard = lines.lock().unwrap();
        loop {
            if let Some(l) = guard.iter().find(|l| needles.iter().all(|n| l.contains(n))) {
                return l.clone();
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| {
                    panic!("no log line with {needles:?}; log:\n{}", guard.join("\n"))
                });
            guard = cv.wait_timeout(guard, left).unwrap().0;
        }
    }

    /// Log lines containing every one of `needles`.
    pub fn log_lines(&self, needles: &[&str]) -> Vec<String> {
        let lines = self.log.0.lock().unwrap();
        lines
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .cloned()
            .collect()
    }

    /// The TCP address the daemon bound itself (`listen = "127.0.0.1:0"`),
    /// from its "listening" line.
    pub fn bound_tcp_addr(&self) -> SocketAddr {
        let line = self.wait_log(&["listening", "listener=127.0.0.1:"]);
        line.rsplit("listener=")
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    pub fn log_text(&self) -> String {
        self.log.0.lock().unwrap().join("\n")
    }

    /// Lines logged so far; a cursor for [`Daemon::wait_line_from`].
    pub fn log_len(&self) -> usize {
        self.log.0.lock().unwrap().len()
    }

    /// Waits for a line at index `from` or later for which `pick` is true;
    /// returns its index and the line. Each line is looked at once per call.
    pub fn wait_line_from(
        &self,
        from: usize,
        mut pick: impl FnMut(&str) -> bool,
    ) -> (usize, String) {
        let (lines, cv) = &*self.log;
        let deadline = Instant::now() + PATIENCE;
        let mut guard = lines.lock().unwrap();
        let mut next = from;
        loop {
            while next < guard.len() {
                if pick(&guard[next]) {
                    return (next, guard[next].clone());
                }
                next += 1;
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| {
                    panic!(
                        "no matching log line after line {from}; log tail:\n{}",
                        guard[guard.len().saturating_sub(40)..].join("\n")
                    )
                });
            guard = cv.wait_timeout(guard, left).unwrap().0;
        }
    }

    /// Waits until at least `n` lines contain every one of `needles`; returns
    /// how many do. Counts incrementally, so it suits logs of 100,000 lines.
    pub fn wait_count(&self, needles: &[&str], n: usize) -> usize {
        let (lines, cv) = &*self.log;
        let deadline = Instant::now() + PATIENCE;
        let mut guard = lines.lock().unwrap();
        let (mut seen, mut count) = (0, 0);
        loop {
            count += guard[seen..]
                .iter()
                .filter(|l| needles.iter().all(|x| l.contains(x)))
                .count();
            seen = guard.len();
            if count >= n {
                return count;
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| {
                    panic!(
                        "only {count} of {n} log lines with {needles:?}; log tail:\n{}",
                        guard[guard.len().saturating_sub(40)..].join("\n")
                    )
                });
            guard = cv.wait_timeout(guard, left).unwrap().0;
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the daemon to exit; fails after PATIENCE.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Open descriptors of the daemon.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Processes whose parent is the daemon (commands, running or zombie).
    pub fn children(&self) -> Vec<i32> {
        children_of(self.pid())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn children_of(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The fields after the parenthesised command name: state, ppid, …
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let ppid: i32 = rest.split(' ').nth(1).unwrap().parse().unwrap();
            if ppid == parent {
                out.push(pid);
            }
        }
    }
    out
}

/// The fields of /proc/PID/stat after the parenthesised command name, so
/// `fields[0]` is the state (field 3 of proc(5)), `fields[1]` the ppid, and so on.
pub fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split(' ').map(str::to_owned).collect())
}

/// Live (not zombie) processes whose process group is `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Some(f) = stat_fields(pid) {
            // proc(5): field 5 is pgrp; fields[0] is field 3.
            if f[2] == pgid.to_string() && f[0] != "Z" {
                out.push(pid);
            }
        }
    }
    out
}

/// User plus system CPU time of `pid`, in clock ticks (fields 14 and 15).
pub fn cpu_ticks(pid: i32) -> u64 {
    let f = stat_fields(pid).unwrap();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Clock ticks per second (`getconf CLK_TCK`).
pub fn clock_ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100, |t| t as u64)
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The open descriptors of `pid`: number and target (`pipe:[123]`, `socket:[…]`, paths).
pub fn fd_targets(pid: i32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(n) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(target) = std::fs::read_link(entry.path()) {
            out.push((n, target.to_string_lossy().into_owned()));
        }
    }
    out.sort();
    out
}

/// How many of `pid`'s descriptors are pipes.
pub fn pipe_fd_count(pid: i32) -> usize {
    fd_targets(pid)
        .iter()
        .filter(|(_, t)| t.starts_with("pipe:"))
        .count()
}

/// Waits (up to a second) for `pid` to be gone: a process killed by the
/// daemon dies a moment after the signal, and only its parent could wait for it.
pub fn gone_soon(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat[stat.rfind(')').unwrap() + 2..].starts_with('Z'),
        Err(_) => false,
    }
}

/// Connects and reads until end-of-file.
pub fn fetch(addr: SocketAddr) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

pub fn fetch_text(addr: SocketAddr) -> String {
    String::from_utf8(fetch(addr)).unwrap()
}

/// A one-service config running `command` (TOML array text) with `extra` lines.
pub fn one_service(command: &str, extra: &str) -> String {
    format!("[[service]]\nname = \"test\"\ncommand = {command}\nkill_grace = \"300ms\"\n{extra}\n")
}
