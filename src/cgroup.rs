//! Containment by cgroup v2: each connection's command in a cgroup of its own,
//! under a subtree delegated to the daemon.
//!
//! Whose subtree: the cgroup systemd delegated to the unit (`Delegate=yes`
//! marks it with the `user.delegate` and `trusted.delegate` attributes), or
//! one an operator names with `delegated_cgroup`. The daemon never takes over
//! a cgroup nobody delegated: run by hand from the root cgroup, it uses
//! process groups. In its subtree it lives in a leaf of its own, `daemon/`
//! (cgroup v2 lets a cgroup with processes have no controllers enabled for
//! its children), and makes `conn-N/` beside it for connection N. systemd
//! runs `ExecReload=` in `.control/`, which the daemon leaves alone.
//!
//! A connection's cgroup is made before its command starts, with the
//! service's limits written in; the command starts in it (see `sys::spawn`);
//! it is emptied by SIGTERM to every process, then `cgroup.kill`; its usage
//! is read for the record, and it is removed.

use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::sys::signal::{kill, Signal};
use nix::sys::stat::Mode;
use nix::unistd::Pid;
use tokio::io::Interest;

/// The daemon's own leaf in its subtree.
pub const DAEMON_LEAF: &str = "daemon";
/// Where systemd runs a delegated unit's control processes (`ExecReload=`).
const CONTROL: &str = ".control";
/// The prefix of connections' cgroups.
const CONNECTION: &str = "conn-";

/// A cgroup v2 subtree the daemon may use, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    Delegated {
        /// The subtree's root directory, e.g.
        /// `/sys/fs/cgroup/system.slice/splice-relay.service`.
        root: PathBuf,
        /// Who delegated it, for the start-up line.
        by: String,
        /// The controllers it has (its `cgroup.controllers`).
        controllers: Vec<String>,
    },
    None(String),
}

impl Offer {
    /// Finds the subtree: `explicit` (the config's `delegated_cgroup`), or
    /// the daemon's own cgroup if it is marked delegated. Reads only.
    pub fn probe(explicit: Option<&Path>) -> Offer {
        match explicit {
            Some(dir) => Self::explicit(dir),
            None => Self::own(),
        }
    }

    fn explicit(dir: &Path) -> Offer {
        let is_v2 = nix::sys::statfs::statfs(dir)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC);
        if !is_v2 {
            return Offer::None(format!(
                "delegated_cgroup {}: not a cgroup v2 directory",
                dir.display()
            ));
        }
        Offer::Delegated {
            root: dir.to_owned(),
            by: "named by delegated_cgroup".into(),
            controllers: controllers(dir),
        }
    }

    fn own() -> Offer {
        let (mount, path) = match own_cgroup() {
            Ok(found) => found,
            Err(why) => return Offer::None(why),
        };
        let dir = join(&mount, &path);
        // Once the daemon is in its leaf (and `--check`, run by ExecReload=,
        // in `.control`), the subtree is the parent.
        let candidates = match dir.file_name().map(|n| n.as_bytes()) {
            Some(b"daemon" | b".control") => vec![dir.parent().unwrap_or(&dir).to_owned(), dir],
            _ => vec![dir],
        };
        for candidate in &candidates {
            if let Some(by) = delegated_by(candidate) {
                return Offer::Delegated {
                    root: candidate.clone(),
                    by,
                    controllers: controllers(candidate),
                };
            }
        }
        Offer::None(format!(
            "the daemon's cgroup {} is not delegated to it (no user.delegate or trusted.delegate \
             attribute: set Delegate=yes in the unit, or name one with delegated_cgroup)",
            candidates[candidates.len() - 1].display()
        ))
    }

    /// Whether `controller` can be enabled for connections' cgroups.
    pub fn has(&self, controller: &str) -> bool {
        matches!(self, Offer::Delegated { controllers, .. } if controllers.iter().any(|c| c == controller))
    }
}

/// The cgroup v2 mount point and this process's path in it.
fn own_cgroup() -> Result<(PathBuf, String), String> {
    let text = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let Some(path) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
        return Err("no cgroup v2 hierarchy (a cgroup v1 host)".into());
    };
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    // Fields: id parent major:minor root mount-point options … - fstype …
    let mount = mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let fstype = right.split(' ').next()?;
        let mut fields = left.split(' ');
        let root = fields.nth(3)?;
        let point = fields.next()?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape(point)))
    });
    match mount {
        Some(m) => Ok((m, path.to_owned())),
        None => Err("the cgroup v2 hierarchy is not mounted".into()),
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        match u8::from_str_radix(rest.get(i + 1..i + 4).unwrap_or(""), 8) {
            Ok(b) => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            Err(_) => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn join(mount: &Path, path: &str) -> PathBuf {
    mount.join(path.trim_start_matches('/'))
}

/// Who marked `dir` delegated: systemd sets `trusted.delegate` (readable only
/// with CAP_SYS_ADMIN) and, since 251, `user.delegate` (readable by the
/// unit's own user too).
fn delegated_by(dir: &Path) -> Option<String> {
    ["user.delegate", "trusted.delegate"]
        .into_iter()
        .find(|name| crate::sys::getxattr(dir, name).is_some_and(|v| v.trim_ascii() == b"1"))
        .map(|name| format!("delegated by the service manager ({name})"))
}

fn controllers(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// A service's limits for each connection's cgroup, as systemd names them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// `memory.max`, bytes (None: no limit).
    pub memory_max: Option<u64>,
    /// `memory.high`, bytes.
    pub memory_high: Option<u64>,
    /// `cpu.max`: percent of one CPU (`CPUQuota=`).
    pub cpu_quota: Option<u32>,
    /// `cpu.weight`, 1–10000.
    pub cpu_weight: Option<u32>,
    /// `pids.max`.
    pub tasks_max: Option<u64>,
    /// `io.weight`, 1–10000.
    pub io_weight: Option<u32>,
}

/// The period `cpu_quota` is measured over (systemd's default CPUQuotaPeriodSec=).
const CPU_PERIOD_USEC: u64 = 100_000;

impl Limits {
    /// The files to write, with their contents, and the controller each needs.
    pub fn files(&self) -> Vec<(&'static str, &'static str, String)> {
        let mut out = Vec::new();
        if let Some(v) = self.memory_max {
            out.push(("memory", "memory.max", v.to_string()));
        }
        if let Some(v) = self.memory_high {
            out.push(("memory", "memory.high", v.to_string()));
        }
        if let Some(pct) = self.cpu_quota {
            // As systemd: at least 1 ms per period.
            let quota = (u64::from(pct) * CPU_PERIOD_USEC / 100).max(1000);
            out.push(("cpu", "cpu.max", format!("{quota} {CPU_PERIOD_USEC}")));
        }
        if let Some(v) = self.cpu_weight {
            out.push(("cpu", "cpu.weight", v.to_string()));
        }
        if let Some(v) = self.tasks_max {
            out.push(("pids", "pids.max", v.to_string()));
        }
        if let Some(v) = self.io_weight {
            out.push(("io", "io.weight", format!("default {v}")));
        }
        out
    }

    /// The controllers these limits need.
    pub fn controllers(&self) -> Vec<&'static str> {
        let mut c: Vec<_> = self.files().into_iter().map(|(c, _, _)| c).collect();
        c.dedup();
        c
    }
}

/// Sets up what the configuration asks for: with a delegated subtree
/// (`offer`), the daemon moves into its leaf there and enables the
/// `controllers` the services' limits need. Returns the subtree (None:
/// process groups) and the one start-up line that says which containment
/// the daemon uses, and why.
pub fn set_up(
    offer: &Offer,
    controllers: &[&'static str],
) -> Result<(Option<Tree>, String), SetupError> {
    let (root, by) = match offer {
        Offer::None(why) => return Ok((None, format!("containment: process groups ({why})"))),
        Offer::Delegated { root, by, .. } => (root, by),
    };
    crate::sys::probe_clone3();
    let tree = Tree::set_up(root)?;
    tree.enable(controllers)?;
    let limits = match controllers.is_empty() {
        true => "no limits set".to_owned(),
        false => format!("controllers for limits: {}", controllers.join(" ")),
    };
    let line = format!(
        "containment: a cgroup per connection in {} ({by}); {limits}; commands start in their cgroup by {}",
        root.display(),
        crate::sys::cgroup_spawn_method()
    );
    Ok((Some(tree), line))
}

/// The daemon's subtree, once it lives in its leaf.
#[derive(Debug, Clone)]
pub struct Tree {
    root: PathBuf,
}

/// Why the subtree could not be set up; it names the file and the errno.
#[derive(Debug)]
pub struct SetupError(pub String);

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn failed(what: &str, path: &Path, e: impl fmt::Display) -> SetupError {
    SetupError(format!("{what} {}: {e}", path.display()))
}

impl Tree {
    /// Moves the daemon into `ROOT/daemon` and removes what a previous run
    /// left (cgroups of connections it did not end, after a crash). Call
    /// before any thread but the main one exists, and before any command.
    pub fn set_up(root: &Path) -> Result<Tree, SetupError> {
        let leaf = root.join(DAEMON_LEAF);
        // A leaf an earlier run left is made anew where it can be (it is
        // empty once that run is gone): after a cgroup.kill of the subtree,
        // Linux (seen on 6.18) SIGKILLs every child a process in the old
        // leaf clones into a new cgroup, so each command would die at once.
        let _ = fs::remove_dir(&leaf);
        match fs::create_dir(&leaf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(failed("cannot create", &leaf, e)),
        }
        let procs = leaf.join("cgroup.procs");
        fs::write(&procs, std::process::id().to_string())
            .map_err(|e| failed("cannot move the daemon into", &procs, e))?;
        let tree = Tree {
            root: root.to_owned(),
        };
        tree.remove_stale();
        Ok(tree)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Enables `controllers` for the connections' cgroups (they must be in
    /// the root's `cgroup.controllers`, which the config's check proved).
    pub fn enable(&self, controllers: &[&str]) -> Result<(), SetupError> {
        let path = self.root.join("cgroup.subtree_control");
        let enabled = fs::read_to_string(&path).unwrap_or_default();
        let missing: Vec<String> = controllers
            .iter()
            .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
            .map(|c| format!("+{c}"))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        fs::write(&path, missing.join(" ")).map_err(|e| {
            failed(
                &format!("cannot write {:?} to", missing.join(" ")),
                &path,
                e,
            )
        })
    }

    /// Ends and removes the connections' cgroups a previous run left.
    fn remove_stale(&self) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.as_bytes().starts_with(CONNECTION.as_bytes()) || name == CONTROL {
                continue;
            }
            let dir = entry.path();
            let _ = fs::write(dir.join("cgroup.kill"), "1");
            match remove_when_empty(&dir) {
                Ok(()) => {
                    tracing::warn!(cgroup = %dir.display(), "removed a connection's cgroup left by an earlier run, after ending its processes")
                }
                Err(e) => {
                    tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove a connection's cgroup left by an earlier run")
                }
            }
        }
    }

    /// Makes connection `conn`'s cgroup with `limits` written in.
    pub fn create(&self, conn: u64, limits: &Limits) -> io::Result<Cgroup> {
        let path = self.root.join(format!("{CONNECTION}{conn}"));
        fs::create_dir(&path).map_err(|e| describe(e, "cannot create", &path))?;
        let cgroup = Cgroup::open(path)?;
        for (_, file, value) in limits.files() {
            let at = cgroup.path.join(file);
            fs::write(&at, &value)
                .map_err(|e| describe(e, &format!("cannot write {value:?} to"), &at))?;
        }
        Ok(cgroup)
    }
}

fn describe(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("{what} {}: {}", path.display(), crate::fdio::reason(&e)),
    )
}

/// Removes a cgroup whose processes are being killed, retrying while the
/// kernel still counts one (EBUSY) for up to a second. Blocking: for the
/// start-up and for a cgroup dropped without [`Cgroup::remove`].
fn remove_when_empty(dir: &Path) -> io::Result<()> {
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
    fn open(path: PathBuf) -> io::Result<Cgroup> {
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

    fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_written_as_systemd_writes_them() {
        let limits = Limits {
            memory_max: Some(512 << 20),
            memory_high: None,
            cpu_quota: Some(50),
            cpu_weight: Some(200),
            tasks_max: Some(32),
            io_weight: Some(10),
        };
        assert_eq!(
            limits.files(),
            vec![
                ("memory", "memory.max", "536870912".into()),
                ("cpu", "cpu.max", "50000 100000".into()),
                ("cpu", "cpu.weight", "200".into()),
                ("pids", "pids.max", "32".into()),
                ("io", "io.weight", "default 10".into()),
            ]
        );
        assert_eq!(limits.controllers(), vec!["memory", "cpu", "pids", "io"]);
        let tiny = Limits {
            cpu_quota: Some(0),
            ..Limits::default()
        };
        assert_eq!(
            tiny.files()[0].2,
            "1000 100000",
            "at least 1 ms, as systemd"
        );
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/x\"), r"/x\");
    }

    #[test]
    fn a_directory_that_is_not_cgroup2_is_not_offered() {
        let dir = tempfile::tempdir().unwrap();
        match Offer::probe(Some(dir.path())) {
            Offer::None(why) => assert!(why.ends_with("not a cgroup v2 directory"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
