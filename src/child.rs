//! The command of one connection: spawned in its own process group, watched
//! through a pidfd, ended group-wide, and always reaped.
//!
//! Spawning goes through `std::process::Command`, which uses posix_spawn
//! (vfork-class, no copy of the daemon's memory) as long as no `pre_exec`, uid,
//! gid or groups are set. Only a service with `user`, `group`, `rlimit_*` or
//! `nice` sets one (see `runas`), and pays for a fork instead. Reaping is ours alone: no
//! SIGCHLD handler, no `waitpid(-1)`. The pidfd turns readable when the command
//! exits, and the zombie is kept until its leftover process group has been
//! killed, so the group id cannot be reused by another connection's command
//! before we signal it.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{pipe2, Pid};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::config::{Service, StdinMode};
use crate::peer::Peer;
use crate::{os, sys};

/// A running command and the daemon's ends of its standard streams.
pub struct Spawned {
    pub child: Child,
    /// Read end of the command's stdout pipe, nonblocking (None with a socket).
    pub stdout: Option<OwnedFd>,
    /// Write end of the command's stdin pipe, nonblocking (`stdin = "client"`).
    pub stdin: Option<OwnedFd>,
    /// Read end of the command's stderr pipe, nonblocking.
    pub stderr: OwnedFd,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
}

impl fmt::Display for Exit {
    /// `0`, `1`, … or a signal name such as `SIGTERM`: one field, always present.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "{c}"),
            Exit::Signal(s) => f.write_str(s.as_str()),
        }
    }
}

/// Spawns `service`'s command for a connection from `peer`.
///
/// `base_env` is the daemon's environment as read at start, minus the
/// variables meant for the daemon alone. With `socket` (`transfer =
/// "direct"`) the socket, already blocking, is the command's stdin and
/// stdout; otherwise both are pipes to the daemon.
pub fn spawn(
    service: &Service,
    base_env: &[(OsString, OsString)],
    peer: &Peer,
    socket: Option<&OwnedFd>,
) -> io::Result<Spawned> {
    // Every end close-on-exec: posix_spawn's dup2 onto 0/1/2 clears the flag
    // on the copy the command gets, and no other connection's command
    // inherits them. The command's ends stay blocking: a plain write(2) must
    // never see EAGAIN.
    let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC)?;
    os::set_nonblocking(&err_r, true)?;
    let (stdin_cmd, stdout_cmd, stdin_ours, stdout_ours) = match socket {
        Some(sock) => (
            Stdio::from(sock.try_clone()?),
            Stdio::from(sock.try_clone()?),
            None,
            None,
        ),
        None => {
            let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC)?;
            set_pipe_size(&out_w, service.pipe_size);
            os::set_nonblocking(&out_r, true)?;
            match service.stdin {
                StdinMode::Null => (Stdio::null(), Stdio::from(out_w), None, Some(out_r)),
                StdinMode::Client => {
                    let (r, w) = pipe2(OFlag::O_CLOEXEC)?;
                    os::set_nonblocking(&w, true)?;
                    (Stdio::from(r), Stdio::from(out_w), Some(w), Some(out_r))
                }
            }
        }
    };

    let mut cmd = Command::new(&service.program);
    cmd.arg0(&service.argv[0])
        .args(&service.argv[1..])
        .env_clear()
        .envs(base_env.iter().map(|(k, v)| (k, v)))
        .envs(service.env.iter().map(|(k, v)| (k, v)))
        .envs(peer.env())
        .current_dir(&service.working_directory)
        .process_group(0)
        .stdin(stdin_cmd)
        .stdout(stdout_cmd)
        .stderr(Stdio::from(err_w));
    if !service.run_as.is_empty() {
        sys::apply_before_exec(&mut cmd, &service.run_as);
    }
    let spawned = cmd.spawn();
    // The Command owns our copies of the command's pipe ends: drop it now, or
    // the stdout pipe would never report end-of-file.
    drop(cmd);
    let std_child = spawned.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "failed to spawn {}: {}",
                service.program.display(),
                os::reason(&e)
            ),
        )
    })?;
    let pid = Pid::from_raw(std_child.id() as i32);
    // std's Child neither waits nor kills on drop; the pid is ours to reap.
    drop(std_child);
    let child = Child::watch(pid)?;
    Ok(Spawned {
        child,
        stdout: stdout_ours,
        stdin: stdin_ours,
        stderr: err_r,
    })
}

/// A spawned command, leader of its own process group.
pub struct Child {
    pid: Pid,
    pidfd: AsyncFd<OwnedFd>,
    reaped: bool,
}

impl Child {
    fn watch(pid: Pid) -> io::Result<Child> {
        let pidfd = match sys::pidfd_open(pid).and_then(|fd| sys::register(fd, Interest::READABLE))
        {
            Ok(fd) => fd,
            Err(e) => {
                // Without a pidfd we cannot wait for it: end it now.
                let _ = killpg(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                return Err(io::Error::new(e.kind(), format!("pidfd_open({pid}): {e}")));
            }
        };
        Ok(Child {
            pid,
            pidfd,
            reaped: false,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Resolves when the command (the group leader) has exited.
    pub async fn exited(&self) {
        // Readable for good once the process is a zombie; nothing to clear.
        let _ = self.pidfd.readable().await;
    }

    /// Sends `signal` to the command's whole process group.
    pub fn signal_group(&self, signal: Signal) {
        // ESRCH: the group is already gone, which is what we wanted.
        let _ = killpg(self.pid, signal);
    }

    /// Waits up to `wait` for the command to exit on its own; then SIGTERM to
    /// its group, and SIGKILL after `grace`. Returns when the leader has exited.
    pub async fn end(&self, wait: Duration, grace: Duration) {
        if tokio::time::timeout(wait, self.exited()).await.is_ok() {
            return;
        }
        self.signal_group(Signal::SIGTERM);
        if tokio::time::timeout(grace, self.exited()).await.is_ok() {
            return;
        }
        self.signal_group(Signal::SIGKILL);
        self.exited().await;
    }

    /// Kills what is left of the process group and reaps the command. Call after
    /// [`Child::exited`]: the leader's zombie still holds the group id, so the
    /// SIGKILL reaches only this command's leftovers.
    pub fn reap(mut self) -> io::Result<Exit> {
        self.signal_group(Signal::SIGKILL);
        self.reaped = true;
        match waitpid(self.pid, None)? {
            WaitStatus::Exited(_, code) => Ok(Exit::Code(code)),
            WaitStatus::Signaled(_, sig, _) => Ok(Exit::Signal(sig)),
            other => Err(io::Error::other(format!(
                "unexpected wait status {other:?}"
            ))),
        }
    }
}

impl Drop for Child {
    /// A connection task that ends early (a panic, the runtime shutting down)
    /// still leaves no process and no zombie behind.
    fn drop(&mut self) {
        if !self.reaped {
            self.signal_group(Signal::SIGKILL);
            let _ = waitpid(self.pid, None);
        }
    }
}

/// Set while the kernel refuses the configured pipe size, so the fallback
/// is logged once per episode rather than once per connection.
static PIPE_REFUSED: AtomicBool = AtomicBool::new(false);

/// Grows the pipe to `size`. Where the kernel refuses (above
/// /proc/sys/fs/pipe-max-size, or over the per-user pipe quota,
/// fs.pipe-user-pages-soft), halves it down to 64 KiB; past that the pipe keeps
/// the size the kernel gave it (a single page under the quota) and still works.
fn set_pipe_size(fd: &OwnedFd, size: usize) {
    let mut want = size;
    let mut first_error = None;
    loop {
        let Ok(n) = i32::try_from(want) else {
            return;
        };
        match fcntl(fd.as_fd(), FcntlArg::F_SETPIPE_SZ(n)) {
            Ok(_) => break,
            Err(e) => {
                first_error.get_or_insert(e);
                if want <= 64 * 1024 {
                    want = 0;
                    break;
                }
                want /= 2;
            }
        }
    }
    match first_error {
        Some(e) if !PIPE_REFUSED.swap(true, Ordering::Relaxed) => {
            let got = fcntl(fd.as_fd(), FcntlArg::F_GETPIPE_SZ).unwrap_or(0);
            tracing::warn!(
                pipe_size = size,
                got,
                error = %e.desc(),
                "the kernel refuses pipes of pipe_size ({size} bytes; pipe-max-size or the per-user pipe quota); using smaller pipes ({got} bytes now) until it allows them again"
            );
        }
        None if want == size && PIPE_REFUSED.swap(false, Ordering::Relaxed) => {
            tracing::info!(pipe_size = size, "pipes of pipe_size are allowed again");
        }
        _ => {}
    }
}
