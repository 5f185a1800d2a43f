//! The command of one connection: spawned in its own process group, watched
//! through a pidfd, ended group-wide, and always reaped.
//!
//! Spawning is `sys::spawn`: posix_spawn's technique (clone with CLONE_VM and
//! CLONE_VFORK, no copy of the daemon's memory) with only the work this
//! daemon needs in the child, the user switch, limits and nice of `runas`
//! included, and the pidfd from clone itself. Reaping is ours alone: no
//! SIGCHLD handler, no `waitpid(-1)`. The pidfd turns readable when the command
//! exits, and the zombie is kept until its leftover process group has been
//! killed, so the group id cannot be reused by another connection's command
//! before we signal it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
use nix::sys::signal::{killpg, Signal};
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{pipe2, Pid};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::config::{Service, StdinMode};
use crate::os;
use crate::peer::Peer;
use crate::runas::Limit;
use crate::sys::{self, Stage};

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
    // Every end close-on-exec: the child's dup2 onto 0/1/2 clears the flag
    // on the copy the command gets, and no other connection's command
    // inherits them. The command's ends stay blocking: a plain write(2) must
    // never see EAGAIN.
    let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).map_err(pipe_error)?;
    os::set_nonblocking(&err_r, true)?;
    // The command's stdin and stdout, and the daemon's ends of them.
    let (stdin_cmd, stdout_cmd, stdin_ours, stdout_ours): (OwnedFd, Option<OwnedFd>, _, _) =
        match socket {
            Some(sock) => (sock.try_clone()?, None, None, None),
            None => {
                let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC).map_err(pipe_error)?;
                set_pipe_size(&out_w, service.pipe_size);
                os::set_nonblocking(&out_r, true)?;
                match service.stdin {
                    StdinMode::Null => {
                        let null = open(
                            "/dev/null",
                            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                            Mode::empty(),
                        )?;
                        (null, Some(out_w), None, Some(out_r))
                    }
                    StdinMode::Client => {
                        let (r, w) = pipe2(OFlag::O_CLOEXEC).map_err(pipe_error)?;
                        os::set_nonblocking(&w, true)?;
                        (r, Some(out_w), Some(w), Some(out_r))
                    }
                }
            }
        };
    let stdout_fd = stdout_cmd
        .as_ref()
        .map_or(stdin_cmd.as_fd(), |fd| fd.as_fd());

    let exec = sys::Exec::new(
        &service.program,
        &service.argv,
        &environment(base_env, &service.env, peer),
        &service.working_directory,
        &service.run_as,
    )?;
    let started = sys::spawn(&exec, [stdin_cmd.as_fd(), stdout_fd, err_w.as_fd()]);
    // Our copies of the command's ends close now, or the stdout pipe would
    // never report end-of-file.
    drop((stdin_cmd, stdout_cmd, err_w));
    let (pid, pidfd) = started.map_err(|(stage, e)| {
        let what = match stage {
            Stage::Exec => format!("failed to spawn {}", service.program.display()),
            Stage::Stdio => "cannot set up the command's standard streams".into(),
            Stage::WorkingDirectory => format!(
                "cannot change to working_directory {}",
                service.working_directory.display()
            ),
            Stage::Limits => "cannot set the command's rlimit_* values".into(),
            Stage::Nice => "cannot set the command's nice value".into(),
            Stage::Credentials => match &service.run_as.credentials {
                Some(c) => format!("cannot run the command as {}", c.label),
                None => "cannot switch the command's user".into(),
            },
        };
        let hint = match (stage, e.raw_os_error()) {
            (Stage::Credentials | Stage::Exec, Some(libc::EAGAIN))
                if service
                    .run_as
                    .rlimits
                    .iter()
                    .any(|(l, _)| *l == Limit::Nproc) =>
            {
                " (the user is at rlimit_nproc)"
            }
            _ => "",
        };
        io::Error::new(e.kind(), format!("{what}: {}{hint}", os::reason(&e)))
    })?;
    let child = Child::watch(pid, pidfd)?;
    Ok(Spawned {
        child,
        stdout: stdout_ours,
        stdin: stdin_ours,
        stderr: err_r,
    })
}

fn pipe_error(e: nix::errno::Errno) -> io::Error {
    io::Error::new(
        io::Error::from(e).kind(),
        format!("cannot create the command's pipes: {}", e.desc()),
    )
}

/// The command's environment: the daemon's, then the service's `env`, then
/// the peer's variables; a later one replaces an earlier one of the same name.
fn environment(
    base: &[(OsString, OsString)],
    service: &[(String, String)],
    peer: &Peer,
) -> Vec<(OsString, OsString)> {
    let mut env: BTreeMap<OsString, OsString> = base.iter().cloned().collect();
    env.extend(service.iter().map(|(k, v)| (k.into(), v.into())));
    env.extend(peer.env().into_iter().map(|(k, v)| (k.into(), v.into())));
    env.into_iter().collect()
}

/// A spawned command, leader of its own process group.
pub struct Child {
    pid: Pid,
    pidfd: AsyncFd<OwnedFd>,
    reaped: bool,
}

impl Child {
    fn watch(pid: Pid, pidfd: OwnedFd) -> io::Result<Child> {
        let pidfd = match sys::register(pidfd, Interest::READABLE) {
            Ok(fd) => fd,
            Err(e) => {
                // Without the pidfd in the event loop we cannot wait for it: end it now.
                let _ = killpg(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                return Err(io::Error::new(e.kind(), format!("watching pid {pid}: {e}")));
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

/// When the kernel last refused the configured pipe size was logged
/// (seconds on the monotonic clock, 0 for never): at most once a minute, so
/// that a daemon that hovers at the pipe quota does not fill the journal.
static PIPE_REFUSAL_LOGGED: AtomicU64 = AtomicU64::new(0);

/// Grows the pipe to `size`. Where the kernel refuses (above
/// /proc/sys/fs/pipe-max-size, or over the per-user pipe quota,
/// fs.pipe-user-pages-soft), halves it down to 64 KiB; past that the pipe keeps
/// the size the kernel gave it (two pages over the quota) and still works.
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
                    break;
                }
                want /= 2;
            }
        }
    }
    let Some(e) = first_error else {
        return;
    };
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| t.tv_sec() as u64);
    let last = PIPE_REFUSAL_LOGGED.load(Ordering::Relaxed);
    if (last == 0 || now >= last + 60)
        && PIPE_REFUSAL_LOGGED
            .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let got = fcntl(fd.as_fd(), FcntlArg::F_GETPIPE_SZ).unwrap_or(0);
        tracing::warn!(
            pipe_size = size,
            got,
            error = %e.desc(),
            "the kernel refuses pipes of pipe_size ({size} bytes; pipe-max-size or the per-user pipe quota); using smaller pipes ({got} bytes for this one); logged at most once a minute"
        );
    }
}
