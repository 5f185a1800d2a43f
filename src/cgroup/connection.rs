//! One connection's cgroup: where its command starts, signalling and
//! killing what is in it, waiting until it is empty, what it used, removal.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

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

/// One connection's cgroup. Made by the daemon's pool (see `pool`), which
/// takes it back once it is empty and its usage is read; dropped instead
/// (a connection's task that ended early), it is killed and removed by a
/// thread of its own.
///
/// The files it is read and signalled through stay open for its whole life,
/// so a command's start and end open none.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    /// The directory, for `CLONE_INTO_CGROUP`.
    dir: OwnedFd,
    /// Its `cgroup.procs`, for a child that joins by itself.
    procs: OwnedFd,
    /// `cgroup.events`, read in place for `populated`.
    events: File,
    counters: Counters,
    /// `cgroup.kill` was written: the cgroup is not reused, for Linux (seen
    /// on 6.18) then SIGKILLs each process cloned into it from outside.
    killed: AtomicBool,
}

/// The peaks a cgroup's usage is read from, open for its life (None: the
/// kernel or the enabled controllers do not have them), and where its
/// other counters stood when it was last taken back, so that a command's
/// usage is its own.
#[derive(Debug)]
struct Counters {
    /// The memory controller is enabled for it (`memory.current` is there).
    memory: bool,
    memory_peak: Option<Peak>,
    tasks_peak: Option<Peak>,
    /// `cpu.stat` usage_usec and `memory.events` oom_kill at the last renewal.
    base_cpu_usec: u64,
    base_oom_kills: u64,
}

/// A `*.peak` file. Written to, it starts again from the current value for
/// reads through the same open file (`memory.peak` since Linux 6.12): a
/// cgroup whose peaks cannot be reset is never reused.
#[derive(Debug)]
struct Peak {
    file: File,
    resettable: bool,
}

impl Peak {
    fn open(path: &Path) -> Option<Peak> {
        if let Ok(file) = OpenOptions::new().read(true).write(true).open(path) {
            // A write is the reset; where it is refused, the peak is for life.
            let resettable = (&file).write_all(b"reset").is_ok();
            return Some(Peak { file, resettable });
        }
        let file = File::open(path).ok()?;
        Some(Peak {
            file,
            resettable: false,
        })
    }
}

/// The whole text of a cgroup file open for its life, read from its start.
fn read_text(file: &File) -> Option<String> {
    let mut buf = [0u8; 1024];
    let n = file.read_at(&mut buf, 0).ok()?;
    std::str::from_utf8(&buf[..n]).ok().map(str::to_owned)
}

fn number(text: Option<String>) -> Option<u64> {
    text?.trim().parse().ok()
}

/// The value of `key` in a flat keyed file (`cpu.stat`, `memory.events`).
fn keyed(text: Option<String>, key: &str) -> Option<u64> {
    text?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Most memory a cgroup taken back may still hold (kernel objects and page
/// cache its command left), for it to be reused: above it, the next command
/// would start with another's charges against its `memory_max`.
const REUSE_MEMORY_MAX: u64 = 1 << 20;

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
        let events_path = path.join("cgroup.events");
        let events =
            File::open(&events_path).map_err(|e| describe(e, "cannot open", &events_path))?;
        let counters = Counters {
            memory: path.join("memory.current").exists(),
            memory_peak: Peak::open(&path.join("memory.peak")),
            tasks_peak: Peak::open(&path.join("pids.peak")),
            base_cpu_usec: 0,
            base_oom_kills: 0,
        };
        Ok(Cgroup {
            path,
            dir,
            procs,
            events,
            counters,
            killed: AtomicBool::new(false),
        })
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
        self.killed.store(true, Ordering::Relaxed);
        if let Err(e) = fs::write(self.path.join("cgroup.kill"), "1") {
            tracing::warn!(cgroup = %self.path.display(), error = %e, "cannot write cgroup.kill; killing its processes one by one");
            self.signal_all(Signal::SIGKILL);
        }
    }

    /// Whether any live process is in it (`populated` in `cgroup.events`).
    /// A zombie does not count, so the command need not be reaped first.
    pub fn populated(&self) -> bool {
        read_text(&self.events).is_some_and(|t| t.lines().any(|l| l == "populated 1"))
    }

    /// Resolves once no live process is left in the cgroup. The kernel
    /// signals a change of `cgroup.events` as a priority event on it (at
    /// most 100 a second), so this waits without polling.
    pub async fn emptied(&self) {
        let events = self
            .events
            .try_clone()
            .and_then(|f| crate::fdio::register(OwnedFd::from(f), Interest::PRIORITY));
        let events = match events {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(cgroup = %self.path.display(), error = %e, "cannot watch cgroup.events; checking every 100 ms instead");
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

    /// What the connection's processes used: since the cgroup was made, or
    /// since the pool last took it back.
    pub fn usage(&self) -> Usage {
        let c = &self.counters;
        // A peak made after the cgroup (a reload enabled its controller) is
        // read where it is.
        let peak = |p: &Option<Peak>, file: &str| match p {
            Some(p) => number(read_text(&p.file)),
            None => number(self.read(file)),
        };
        Usage {
            cpu_usec: keyed(self.read("cpu.stat"), "usage_usec")
                .map(|v| v.saturating_sub(c.base_cpu_usec)),
            memory_peak: peak(&c.memory_peak, "memory.peak"),
            tasks_peak: peak(&c.tasks_peak, "pids.peak"),
            oom_kills: keyed(self.read("memory.events"), "oom_kill")
                .map(|v| v.saturating_sub(c.base_oom_kills)),
        }
    }

    fn read(&self, file: &str) -> Option<String> {
        fs::read_to_string(self.path.join(file)).ok()
    }

    /// Makes an empty cgroup ready for another command, once its last
    /// command's usage (`used`, from [`Cgroup::usage`]) is read: its peaks
    /// start again, and its counters count from where `used` leaves them.
    /// False where that cannot be done so that the next record says only
    /// what its own command used (a peak the kernel cannot reset), where
    /// what the last command left would weigh on the next (more than
    /// [`REUSE_MEMORY_MAX`] still charged), or where its processes were ended
    /// by `cgroup.kill` (see `killed`): such a cgroup is removed instead.
    pub(super) fn renew(&mut self, used: &Usage) -> bool {
        if self.killed.load(Ordering::Relaxed) {
            return false;
        }
        let c = &mut self.counters;
        let peaks = [&c.memory_peak, &c.tasks_peak];
        if peaks
            .iter()
            .any(|p| p.as_ref().is_some_and(|p| !p.resettable))
        {
            return false;
        }
        if c.memory
            && number(fs::read_to_string(self.path.join("memory.current")).ok())
                .is_some_and(|m| m > REUSE_MEMORY_MAX)
        {
            return false;
        }
        for peak in peaks.into_iter().flatten() {
            if (&peak.file).write_all(b"reset").is_err() {
                return false;
            }
        }
        // Empty since `used` was read: the counters stand where it says.
        c.base_cpu_usec += used.cpu_usec.unwrap_or(0);
        c.base_oom_kills += used.oom_kills.unwrap_or(0);
        true
    }

    /// The directory, for tests and messages.
    pub fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }
}

impl Drop for Cgroup {
    /// Removes the cgroup: at once where it is empty (the pool did not keep
    /// it); else (a connection's task that ended early) its processes are
    /// killed and a thread of its own removes it once they are gone.
    fn drop(&mut self) {
        if fs::remove_dir(&self.path).is_ok() {
            return;
        }
        self.kill();
        let path = std::mem::take(&mut self.path);
        std::thread::spawn(move || {
            if let Err(e) = remove_when_empty(&path) {
                tracing::warn!(cgroup = %path.display(), error = %e, "cannot remove a connection's cgroup");
            }
        });
    }
}
