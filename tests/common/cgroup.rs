//! Cgroups for the daemon under test: made under this machine's cgroup v2
//! mount and marked as systemd marks the cgroup it delegates
//! (`user.delegate`, `trusted.delegate`), then removed with everything in
//! them. Root only.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::poll;

/// Set to 1 where every controller must be offered (tests/cgroups/run.sh's
/// VM): a test of a limit then fails rather than skips without it.
pub const REQUIRE_CONTROLLERS: &str = "SPLICE_RELAY_REQUIRE_CONTROLLERS";

/// Whether [`REQUIRE_CONTROLLERS`] is set to 1.
pub fn controllers_required() -> bool {
    std::env::var_os(REQUIRE_CONTROLLERS).is_some_and(|v| v == "1")
}

/// A cgroup made for one test.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    /// A cgroup delegated the way systemd's `Delegate=yes` marks one.
    pub fn delegated() -> TestCgroup {
        let cgroup = TestCgroup::plain();
        for name in ["user.delegate", "trusted.delegate"] {
            let status = std::process::Command::new("setfattr")
                .args(["-n", name, "-v", "1"])
                .arg(&cgroup.path)
                .status()
                .expect("setfattr (Debian's attr package)");
            assert!(status.success(), "setfattr {name}");
        }
        cgroup
    }

    /// A cgroup nobody delegated.
    pub fn plain() -> TestCgroup {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = mount().join(format!("sr-test-{}-{n}", std::process::id()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        TestCgroup { path }
    }

    /// Whether `controller` is offered to this cgroup (its
    /// `cgroup.controllers`), for `test`, which checks a limit that needs
    /// it. Where it is not (a hybrid host, whose memory, cpu and pids
    /// controllers are cgroup v1's), the test says so and returns false, so
    /// that the caller checks nothing; with `SPLICE_RELAY_REQUIRE_CONTROLLERS=1`
    /// (set by tests/cgroups/run.sh, whose VM has every controller) a
    /// missing controller fails the test instead.
    pub fn offers(&self, controller: &str, test: &str) -> bool {
        let controllers = std::fs::read_to_string(self.path.join("cgroup.controllers")).unwrap();
        if controllers.split_whitespace().any(|c| c == controller) {
            return true;
        }
        let why = format!(
            "the {controller} controller is not offered to {} (cgroup.controllers: {:?})",
            self.path.display(),
            controllers.trim()
        );
        assert!(
            !controllers_required(),
            "{test}: {why}, and {REQUIRE_CONTROLLERS}=1 requires it"
        );
        eprintln!("SKIPPED {test}: {why}, so its limit cannot be checked here");
        false
    }

    /// The commands' cgroups in it now (`slot-N`), in use or ready.
    pub fn slots(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(&self.path)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("slot-"))
            .collect();
        out.sort_by_key(|n| n[5..].parse::<u64>().unwrap_or(u64::MAX));
        out
    }

    /// The commands' cgroups with a live process in them.
    pub fn populated_slots(&self) -> Vec<String> {
        self.slots()
            .into_iter()
            .filter(|n| {
                std::fs::read_to_string(self.path.join(n).join("cgroup.events"))
                    .is_ok_and(|t| t.lines().any(|l| l == "populated 1"))
            })
            .collect()
    }

    /// Waits until no command's cgroup holds a process: once its record is
    /// written, a connection's cgroup is emptied and goes back to the
    /// daemon's pool of ready ones.
    pub fn wait_all_empty(&self) {
        let empty = poll(Duration::from_secs(5), || {
            self.populated_slots().is_empty().then_some(())
        });
        assert!(
            empty.is_some(),
            "cgroups in use: {:?}",
            self.populated_slots()
        );
    }

    /// The processes in its subtree, the daemon's included.
    pub fn procs(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for dir in walk(&self.path) {
            let text = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            out.extend(text.lines().filter_map(|l| l.parse::<i32>().ok()));
        }
        out
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        poll(Duration::from_secs(5), || {
            let mut dirs = walk(&self.path);
            dirs.reverse();
            for d in &dirs {
                let _ = std::fs::remove_dir(d);
            }
            (!self.path.exists()).then_some(())
        });
    }
}

/// A cgroup directory and every cgroup below it, parents first.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = std::fs::read_dir(&out[i]) {
            out.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        i += 1;
    }
    out
}

/// Where cgroup v2 is mounted: /sys/fs/cgroup on unified hosts,
/// /sys/fs/cgroup/unified on hybrid ones.
pub fn mount() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            right.starts_with("cgroup2 ").then(|| PathBuf::from(point))
        })
        .expect("a cgroup v2 mount")
}

/// Live processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // A zombie's command line is empty: only live processes match.
        if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            if String::from_utf8_lossy(&cmdline).contains(marker) {
                out.push(pid);
            }
        }
    }
    out
}

/// The session leaders among [`processes_with`]: what `setsid` started.
/// Not a loop's children, which carry the loop's command line from fork
/// until their exec, nor a connection's command (a process group's leader,
/// whose script may name the marker) before its own exec.
pub fn session_leaders_with(marker: &str) -> Vec<i32> {
    processes_with(marker)
        .into_iter()
        .filter(|&pid| super::stat(pid).is_some_and(|s| s.session == pid))
        .collect()
}
