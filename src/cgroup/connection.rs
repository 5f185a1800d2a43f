//! One connection's cgroup: where its command starts, signalling and
//! killing what is in it, waiting until it is empty, what it used, removal.

use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::sys::signal::{kill, Signal};
use nix::sys::stat::Mode;
use nix::unistd::Pid;
use tokio::io::Interest;

pub(super) fn describe(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("{what} {}: {}", path.display(), crate::fdio::reason(&e)),
    )
}

/// Removes a cgroup whose processes are being killed, retrying while the
/// kernel still counts one (EBUSY) for up to a second. Blocking: for the
/// start-up and for a cgroup dropped without [`Cgroup::remove`].
pub(super) fn remove_when_empty(dir: &Path) -> io::Result<()> {
    for _ in 0..100 {
        match fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            other => return other,
        }
    }
    fs::remove_dir(dir)
}

/// One connection's cgroup, removed by [`Cgroup::remove`] once empty (or,
/// dropped without it, killed and removed by a thread of its own).
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    /// The directory, for `CLONE_INTO_CGROUP`.
    dir: OwnedFd,
    /// Its `cgroup.procs`, for a child that joins by itself.
    procs: OwnedFd,
}

/// What a connection's processes used, from its cgroup; None where the
/// kernel or the delegated controllers do not tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time, user and system (`cpu.stat` usage_usec: present even
    /// without the cpu controller).
    pub cpu_usec: Option<u64>,
    /// Most memory at once (`memory.peak`, Linux 5.19, memory controller).
    pub memory_peak: Option<u64>,
    /// Most processes and threads at once (`pids.peak`, Linux 6.1, pids controller).
    pub tasks_peak: Option<u64>,
    /// Processes the OOM killer ended (`memory.events` oom_kill).
    pub oom_kills: Option<u64>,
}

impl Cgroup {
    pub(super) fn open(path: PathBuf) -> io::Result<Cgroup> {
        let dir = open(
            &path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| describe(e.into(), "cannot open", &path))?;
        let procs_path = path.join("cgroup.procs");
        let procs = open(
            &procs_path,
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| describe(e.into(), "cannot open", &procs_path))?;
        Ok(Cgroup { path, dir, procs })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where `sys::spawn` starts the command.
    pub fn place(&self) -> crate::sys::Place<'_> {
        crate::sys::Place::Cgroup {
            dir: self.dir.as_fd(),
            procs: self.procs.as_fd(),
        }
    }

    /// Sends `signal` to every process in the cgroup. A process that forks
    /// while this runs may leave a child unsignalled; `kill` ends those.
    pub fn signal_all(&self, signal: Signal) {
        let mut signalled = Vec::new();
        // Until a pass finds no process it has not signalled yet.
        for _ in 0..8 {
            let pids = self.pids();
            let fresh: Vec<i32> = pids
                .into_iter()
                .filter(|p| !signalled.contains(p))
                .collect();
            if fresh.is_empty() {
                return;
            }
            for pid in fresh {
                // ESRCH: it has just exited.
                let _ = kill(Pid::from_raw(pid), signal);
                signalled.push(pid);
            }
        }
    }

    /// The processes in the cgroup. A process the daemon's pid namespace
    /// cannot name shows as 0 there, and kill(0) would signal the daemon's
    /// own process group: such entries are left out (as systemd does).
    fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .filter(|&pid: &i32| pid > 0)
            .collect()
    }

    /// SIGKILL to every process in the cgroup, forks in flight included
    /// (`cgroup.kill`, Linux 5.14).
    pub fn kill(&self) {
        if let Err(e) = fs::write(self.path.join("cgroup.kill"), "1") {
            tracing::warn!(cgroup = %self.path.display(), error = %e, "cannot write cgroup.kill; killing its processes one by one");
            self.signal_all(Signal::SIGKILL);
        }
    }

    /// Whether any live process is in it (`populated` in `cgroup.events`).
    /// A zombie does not count, so the command need not be reaped first.
    pub fn populated(&self) -> bool {
        fs::read_to_string(self.path.join("cgroup.events"))
            .map(|t| t.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    }

    /// Resolves once no live process is left in the cgroup. The kernel
    /// signals a change of `cgroup.events` as a priority event on it (at
    /// most 100 a second), so this waits without polling.
    pub async fn emptied(&self) {
        let path = self.path.join("cgroup.events");
        let events = fs::File::open(&path)
            .and_then(|f| crate::fdio::register(OwnedFd::from(f), Interest::PRIORITY));
        let events = match events {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot watch; checking every 100 ms instead");
                while self.populated() {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                return;
            }
        };
        // Registered before the first look, so a change in between is seen.
        while self.populated() {
            match events.ready(Interest::PRIORITY).await {
                Ok(mut ready) => ready.clear_ready(),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
    }

    /// What the connection's processes used.
    pub fn usage(&self) -> Usage {
        let read = |file: &str| fs::read_to_string(self.path.join(file)).ok();
        let keyed = |text: Option<String>, key: &str| {
            text?.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok()).flatten()
            })
        };
        Usage {
            cpu_usec: keyed(read("cpu.stat"), "usage_usec"),
            memory_peak: read("memory.peak").and_then(|t| t.trim().parse().ok()),
            tasks_peak: read("pids.peak").and_then(|t| t.trim().parse().ok()),
            oom_kills: keyed(read("memory.events"), "oom_kill"),
        }
    }

    /// The directory, for tests and messages.
    pub fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }
}

impl Cgroup {
    /// Removes the cgroup, ending what is still in it first.
    pub async fn remove(mut self) {
        if self.populated() {
            self.kill();
            self.emptied().await;
        }
        let path = std::mem::take(&mut self.path);
        if let Err(e) = fs::remove_dir(&path) {
            tracing::warn!(cgroup = %path.display(), error = %e, "cannot remove a connection's cgroup");
        }
    }
}

impl Drop for Cgroup {
    /// Only when `remove` did not run (a connection's task that ended early).
    fn drop(&mut self) {
        if self.path.as_os_str().is_empty() {
            return;
        }
        self.kill();
        let path = std::mem::take(&mut self.path);
        if fs::remove_dir(&path).is_err() {
            std::thread::spawn(move || {
                if let Err(e) = remove_when_empty(&path) {
                    tracing::warn!(cgroup = %path.display(), error = %e, "cannot remove a connection's cgroup");
                }
            });
        }
    }
}
