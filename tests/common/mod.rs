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
    notify: UnixDatagram,
    /// Every notification received so far, one entry per datagram.
    pub notes: Vec<String>,
    log: Arc<(Mutex<Vec<String>>, Condvar)>,
}

#[derive(Default)]
pub struct Options {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
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
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();

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
        cmd.arg("-c")
            .arg(r#"if [ -n "$SR_FDS" ]; then export LISTEN_PID=$$ LISTEN_FDS=$SR_FDS LISTEN_FDNAMES=$SR_NAMES; fi; unset SR_FDS SR_NAMES; exec "$0" "$@""#)
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
        if count > 0 {
            cmd.env("SR_FDS", count.to_string())
                .env("SR_NAMES", names.join(":"));
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
            notify,
            notes: Vec::new(),
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for a notification datagram containing `needle` and returns it.
    /// Datagrams received on the way are kept in `notes`.
    pub fn wait_note(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        let mut buf = vec![0u8; 4096];
        loop {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let note = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.notes.push(note.clone());
                if note.contains(needle) {
                    return note;
                }
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

    pub fn log_text(&self) -> String {
        self.log.0.lock().unwrap().join("\n")
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
