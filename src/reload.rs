//! How `systemctl reload` learns that the daemon has applied a file, or
//! refused it.
//!
//! systemd before 253 ends a reload job as soon as the `ExecReload=` command
//! exits, and `kill -HUP` exits at once: a client connecting right after
//! `systemctl reload` could still get the old command. So the daemon
//! publishes each reload's outcome, with a generation number, in the unit's
//! `RuntimeDirectory=`, and `splice-relay --reload PID` sends SIGHUP and waits
//! for the next generation: it exits 0 once new connections use the new file,
//! and 78 with the daemon's message when the file was refused.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const FILE: &str = "reload";

/// How long `--reload` waits for the daemon's answer.
const PATIENCE: Duration = Duration::from_secs(60);

/// The directory systemd made for the unit (`RUNTIME_DIRECTORY`, its first
/// entry), if any.
fn runtime_dir() -> Option<PathBuf> {
    let dirs = std::env::var_os("RUNTIME_DIRECTORY")?;
    std::env::split_paths(&dirs)
        .next()
        .filter(|p| p.is_absolute())
}

/// The daemon's side: where it publishes outcomes.
#[derive(Debug)]
pub struct Outcomes {
    file: Option<PathBuf>,
    generation: AtomicU64,
}

impl Outcomes {
    /// Reads `RUNTIME_DIRECTORY` (once, at start).
    pub fn from_env() -> Outcomes {
        let file = runtime_dir().map(|d| d.join(FILE));
        let generation = file.as_deref().and_then(read).map_or(0, |(g, _)| g);
        Outcomes {
            file,
            generation: AtomicU64::new(generation),
        }
    }

    /// Publishes the outcome of the reload that just finished. Written to a
    /// temporary name and renamed, so a reader never sees half a line.
    pub fn publish(&self, outcome: &Result<(), String>) {
        let Some(file) = &self.file else { return };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let line = match outcome {
            Ok(()) => format!("{generation} ok\n"),
            Err(e) => format!("{generation} failed: {e}\n"),
        };
        let tmp = file.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, line).and_then(|()| std::fs::rename(&tmp, file)) {
            tracing::warn!(file = %file.display(), error = %e, "cannot publish the reload outcome");
        }
    }
}

/// `(generation, Ok | Err(message))` from the outcome file.
fn read(file: &Path) -> Option<(u64, Result<(), String>)> {
    let text = std::fs::read_to_string(file).ok()?;
    let (generation, rest) = text.trim_end().split_once(' ')?;
    let outcome = match rest.strip_prefix("failed: ") {
        Some(message) => Err(message.to_owned()),
        None => Ok(()),
    };
    Some((generation.parse().ok()?, outcome))
}

/// Why `--reload` did not confirm a reload.
pub enum ReloadError {
    /// The daemon refused the file; its message.
    Config(String),
    /// The request itself failed.
    Failed(String),
}

/// The `ExecReload=` side: SIGHUP to `pid`, then wait for its answer.
pub fn request(pid: i32) -> Result<(), ReloadError> {
    let failed = |what: String| ReloadError::Failed(what);
    let dir = runtime_dir().ok_or_else(|| {
        failed("--reload needs RUNTIME_DIRECTORY (RuntimeDirectory= in the unit); use kill -HUP without it".into())
    })?;
    let file = dir.join(FILE);
    let before = read(&file).map_or(0, |(g, _)| g);
    // Watch before signalling, so the answer cannot come unseen.
    let inotify =
        Inotify::init(InitFlags::IN_CLOEXEC).map_err(|e| failed(format!("inotify: {e}")))?;
    inotify
        .add_watch(
            &dir,
            AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE,
        )
        .map_err(|e| failed(format!("cannot watch {}: {e}", dir.display())))?;
    kill(Pid::from_raw(pid), Signal::SIGHUP)
        .map_err(|e| failed(format!("cannot signal pid {pid}: {e}")))?;
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some((generation, outcome)) = read(&file) {
            if generation > before {
                return outcome.map_err(ReloadError::Config);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(failed(format!(
                "pid {pid} did not answer within {} s",
                PATIENCE.as_secs()
            )));
        }
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(&inotify),
            PollFlags::POLLIN,
        )];
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        if poll(&mut fds, timeout).is_ok_and(|n| n > 0) {
            let _ = inotify.read_events();
        }
    }
}
