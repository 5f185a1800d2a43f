//! The command of one connection, from spawn to reaping: its standard
//! streams, its stderr in the log, its containment, and its end.
//!
//! Spawning is `sys::spawn` (posix_spawn's technique, with the user switch,
//! limits and nice of `runas` done in the child). Each command leads a
//! process group of its own and, where the daemon has a delegated cgroup v2
//! subtree (`cgroup`), starts inside a cgroup of its own: then nothing it
//! starts can leave, whatever it does (a new session, a double fork).
//! Reaping is ours alone: no SIGCHLD handler, no `waitpid(-1)`; a pidfd turns
//! readable when the command exits.
//!
//! # How a command ends
//!
//! The same order for every transfer mode, in [`Command::finish`]:
//!
//! 1. it gets `patience` to exit on its own: `kill_grace` once its output has
//!    ended, none after any other end (the client left, a limit, the stop);
//! 2. then SIGTERM to every process it contains, and `kill_grace` for all of
//!    them to end (with a process group, for the command to exit);
//! 3. then SIGKILL to what is left: `cgroup.kill`, or the process group
//!    (the command's zombie still holds the group id, so the signal cannot
//!    reach another connection's processes);
//! 4. once nothing is left (`populated 0`, or the command has exited), it is
//!    reaped and what it used read;
//! 5. its stderr logger logs what is already written, and stops;
//! 6. after the record, its cgroup is removed.
//!
//! While the output is relayed, [`Command::end_leftovers`] does steps 2 and
//! 3 early when the command exits first, so a background process holding
//! its stdout cannot keep the connection open. With a process group, a
//! process that left it cannot be reached; the relay then stops waiting for
//! output `kill_grace` after the SIGKILL.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
use nix::sys::signal::{killpg, Signal};
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{pipe2, Pid};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::cgroup::{Cgroup, Tree, Usage};
use crate::config::{Containment, Service, StdinMode};
use crate::episode::Throttle;
use crate::fdio;
use crate::peer::Peer;
use crate::runas::Limit;
use crate::sys::{self, Place, Stage};

/// Longest stderr line logged as one record; longer lines are split.
const MAX_LINE: usize = 4096;

/// What the command's stdin and stdout are.
#[derive(Clone, Copy)]
pub enum Io<'a> {
    /// Pipes to the daemon, which relays them; stdin is /dev/null or the client's.
    Pipes(StdinMode),
    /// The client's socket itself (`transfer = "direct"`), already blocking.
    Socket(&'a OwnedFd),
}

/// The daemon's ends of the command's standard streams.
pub enum Streams {
    /// The read end of stdout, and with `stdin = "client"` the write end of
    /// stdin; both nonblocking and registered with the event loop.
    Pipes {
        stdout: AsyncFd<OwnedFd>,
        stdin: Option<AsyncFd<OwnedFd>>,
    },
    /// The socket is the command's stdin and stdout; the daemon holds no pipe.
    Socket,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
    /// It could not be reaped (logged); never expected.
    Unknown,
}

impl fmt::Display for Exit {
    /// `0`, `1`, … or a signal name such as `SIGTERM`: one field, always present.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "{c}"),
            Exit::Signal(s) => f.write_str(s.as_str()),
            Exit::Unknown => f.write_str("unknown"),
        }
    }
}

/// Why a command is not running.
#[derive(Debug)]
pub enum SpawnError {
    /// It could not be started (the record's `spawn-failed`).
    Start(io::Error),
    /// It started, but the daemon could not watch it, so it was ended.
    Unwatched(io::Error),
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpawnError::Start(e) => write!(f, "{e}"),
            SpawnError::Unwatched(e) => write!(
                f,
                "cannot register the command's descriptors with the event loop: {}",
                fdio::reason(e)
            ),
        }
    }
}

/// Who a command's stderr lines belong to, in the log.
#[derive(Clone)]
pub struct Tag {
    pub conn: u64,
    pub service: Arc<str>,
}

/// A running command, leader of its own process group, maybe in a cgroup.
pub struct Command {
    pid: Pid,
    pidfd: AsyncFd<OwnedFd>,
    grace: Duration,
    stderr: Option<StderrLog>,
    /// The connection's cgroup (None: its process group contains it).
    cgroup: Option<Cgroup>,
    reaped: bool,
}

/// A command that has ended: how, what it used, and its cgroup, to remove
/// once the record is written.
pub struct Ended {
    pub exit: Exit,
    pub usage: Usage,
    cgroup: Option<Cgroup>,
}

impl Ended {
    /// Removes the connection's cgroup (empty by now).
    pub async fn remove_cgroup(self) {
        if let Some(cgroup) = self.cgroup {
            cgroup.remove().await;
        }
    }
}

impl Command {
    /// Spawns `service`'s command for a connection from `peer`.
    ///
    /// `base_env` is the daemon's environment as read at start, minus the
    /// variables meant for the daemon alone. Every descriptor the daemon
    /// keeps is registered with the event loop here; if one cannot be, the
    /// command is ended and reaped, and the error says so.
    pub fn spawn(
        service: &Service,
        base_env: &[(OsString, OsString)],
        peer: &Peer,
        io: Io<'_>,
        cgroups: Option<&Tree>,
        tag: Tag,
    ) -> Result<(Command, Streams), SpawnError> {
        let cgroup = match (&service.containment, cgroups) {
            (Containment::ProcessGroup, _) => None,
            (Containment::Cgroup(limits), Some(tree)) => {
                Some(tree.create(tag.conn, limits).map_err(SpawnError::Start)?)
            }
            (Containment::Cgroup(_), None) => return Err(SpawnError::Start(io::Error::other(
                "the service's commands need a cgroup, and the daemon has no cgroup subtree set up",
            ))),
        };
        let (stdio, ours) = Stdio::open(service, io).map_err(SpawnError::Start)?;
        let exec = sys::Exec::new(
            &service.program,
            &service.argv,
            &environment(base_env, &service.env, peer),
            &service.working_directory,
            &service.run_as,
        )
        .map_err(SpawnError::Start)?;
        let place = cgroup.as_ref().map_or(Place::Here, Cgroup::place);
        let started = sys::spawn(&exec, stdio.fds(), place);
        // Our copies of the command's ends close now, or the stdout pipe would
        // never report end-of-file.
        drop(stdio);
        let (pid, pidfd) =
            started.map_err(|(stage, e)| SpawnError::Start(spawn_error(service, stage, e)))?;
        // Until it is watched, an early return must not leave the command
        // running unsupervised (the cgroup, dropped, kills what is in it).
        let unwatched = Unwatched(pid);
        let pidfd = fdio::register(pidfd, Interest::READABLE);
        let (pidfd, (stderr, streams)) = match (pidfd, ours.register()) {
            (Ok(pidfd), Ok(registered)) => (pidfd, registered),
            (Err(e), _) | (_, Err(e)) => return Err(SpawnError::Unwatched(e)),
        };
        unwatched.disarm();
        let command = Command {
            pid,
            pidfd,
            grace: service.kill_grace,
            stderr: Some(StderrLog::start(stderr, tag, pid.as_raw())),
            cgroup,
            reaped: false,
        };
        Ok((command, streams))
    }

    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Resolves when the command (the group's leader) has exited.
    pub async fn exited(&self) {
        // Readable for good once the process is a zombie; nothing to clear.
        let _ = self.pidfd.readable().await;
    }

    /// Once the command has exited, ends what is left of it: SIGTERM now,
    /// SIGKILL after `kill_grace`. Run it beside the relay. Resolves when
    /// the relay should stop waiting for more output: never with a cgroup
    /// (its end closes the output), and after the SIGKILL with a process
    /// group, since a process that left the group may hold the output open.
    pub async fn end_leftovers(&self) {
        self.exited().await;
        match &self.cgroup {
            Some(cgroup) => {
                if cgroup.populated() {
                    cgroup.signal_all(Signal::SIGTERM);
                    if tokio::time::timeout(self.grace, cgroup.emptied())
                        .await
                        .is_err()
                    {
                        cgroup.kill();
                    }
                }
                std::future::pending().await
            }
            // A process group cannot be watched: its members get kill_grace.
            None => {
                let _ = killpg(self.pid, Signal::SIGTERM);
                tokio::time::sleep(self.grace).await;
                let _ = killpg(self.pid, Signal::SIGKILL);
            }
        }
    }

    /// Ends the command in the order the module documentation gives, and
    /// returns how it exited and what it used, once it is reaped and its
    /// stderr logged.
    pub async fn finish(mut self, patience: Duration) -> Ended {
        let exited = tokio::time::timeout(patience, self.exited()).await.is_ok();
        let leftovers = self.cgroup.as_ref().is_some_and(Cgroup::populated);
        if !exited || leftovers {
            self.signal_all(Signal::SIGTERM);
            if tokio::time::timeout(self.grace, self.emptied())
                .await
                .is_err()
            {
                self.kill_all();
            }
        }
        self.kill_all();
        self.emptied().await;
        let (exit, cpu_usec) = self.reap().unwrap_or_else(|e| {
            tracing::warn!(pid = self.pid.as_raw(), error = %e, "cannot reap a command");
            (Exit::Unknown, None)
        });
        let usage = match &self.cgroup {
            Some(cgroup) => cgroup.usage(),
            None => Usage {
                cpu_usec,
                ..Usage::default()
            },
        };
        if let Some(stderr) = self.stderr.take() {
            stderr.finish().await;
        }
        Ended {
            exit,
            usage,
            cgroup: self.cgroup.take(),
        }
    }

    /// Sends `signal` to every process the command contains.
    fn signal_all(&self, signal: Signal) {
        match &self.cgroup {
            Some(cgroup) => cgroup.signal_all(signal),
            // ESRCH: the group is already gone, which is what we wanted.
            None => drop(killpg(self.pid, signal)),
        }
    }

    /// SIGKILL to everything the command contains.
    fn kill_all(&self) {
        match &self.cgroup {
            Some(cgroup) if cgroup.populated() => cgroup.kill(),
            Some(_) => {}
            None => drop(killpg(self.pid, Signal::SIGKILL)),
        }
    }

    /// Resolves once nothing the command contains is alive: its cgroup is
    /// empty, or (a process group cannot be watched) the command has exited.
    async fn emptied(&self) {
        self.exited().await;
        if let Some(cgroup) = &self.cgroup {
            cgroup.emptied().await;
        }
    }

    /// Reaps the command: its exit, and its CPU time (with the children it
    /// waited for) from the kernel's accounting.
    fn reap(&mut self) -> io::Result<(Exit, Option<u64>)> {
        self.reaped = true;
        let (status, cpu_usec) = sys::wait(self.pid)?;
        let exit = match status {
            WaitStatus::Exited(_, code) => Exit::Code(code),
            WaitStatus::Signaled(_, sig, _) => Exit::Signal(sig),
            other => {
                return Err(io::Error::other(format!(
                    "unexpected wait status {other:?}"
                )))
            }
        };
        Ok((exit, Some(cpu_usec)))
    }
}

impl Drop for Command {
    /// A connection task that ends early (a panic, the runtime shutting down)
    /// still leaves no process and no zombie behind.
    fn drop(&mut self) {
        if !self.reaped {
            let _ = killpg(self.pid, Signal::SIGKILL);
            if let Some(cgroup) = &self.cgroup {
                cgroup.kill();
            }
            let _ = waitpid(self.pid, None);
        }
    }
}

/// A command spawned but not yet watched: killed and reaped if dropped.
struct Unwatched(Pid);

impl Unwatched {
    /// The command is watched from now on.
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for Unwatched {
    fn drop(&mut self) {
        let _ = killpg(self.0, Signal::SIGKILL);
        let _ = waitpid(self.0, None);
    }
}

/// The message for a spawn that failed in the child, naming what failed.
fn spawn_error(service: &Service, stage: Stage, e: io::Error) -> io::Error {
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
        Stage::Cgroup => "cannot start the command in its cgroup".into(),
    };
    let at_nproc = matches!(stage, Stage::Credentials | Stage::Exec)
        && e.raw_os_error() == Some(libc::EAGAIN)
        && service
            .run_as
            .rlimits
            .iter()
            .any(|(l, _)| *l == Limit::Nproc);
    let hint = if at_nproc {
        " (the user is at rlimit_nproc)"
    } else {
        ""
    };
    io::Error::new(e.kind(), format!("{what}: {}{hint}", fdio::reason(&e)))
}

/// The command's ends of its standard streams, until the spawn.
struct Stdio {
    stdin: OwnedFd,
    /// None when stdout is the same socket as stdin.
    stdout: Option<OwnedFd>,
    stderr: OwnedFd,
}

/// The daemon's ends, before they join the event loop.
struct Ours {
    stderr: OwnedFd,
    stdout: Option<OwnedFd>,
    stdin: Option<OwnedFd>,
}

impl Stdio {
    /// Opens the pipes. Every end is close-on-exec: the child's dup2 onto
    /// 0/1/2 clears the flag on the copy the command gets, and no other
    /// connection's command inherits them. The command's ends stay blocking:
    /// a plain write(2) must never see EAGAIN.
    fn open(service: &Service, io: Io<'_>) -> io::Result<(Stdio, Ours)> {
        let (err_r, err_w) = pipe()?;
        fdio::set_nonblocking(&err_r, true)?;
        let socket = match io {
            Io::Socket(socket) => {
                let stdio = Stdio {
                    stdin: socket.try_clone()?,
                    stdout: None,
                    stderr: err_w,
                };
                let ours = Ours {
                    stderr: err_r,
                    stdout: None,
                    stdin: None,
                };
                return Ok((stdio, ours));
            }
            Io::Pipes(stdin) => stdin,
        };
        let (out_r, out_w) = pipe()?;
        set_pipe_size(&out_w, service.pipe_size);
        fdio::set_nonblocking(&out_r, true)?;
        let (stdin, stdin_ours) = match socket {
            StdinMode::Null => {
                let null = open(
                    "/dev/null",
                    OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )?;
                (null, None)
            }
            StdinMode::Client => {
                let (r, w) = pipe()?;
                fdio::set_nonblocking(&w, true)?;
                (r, Some(w))
            }
        };
        let stdio = Stdio {
            stdin,
            stdout: Some(out_w),
            stderr: err_w,
        };
        let ours = Ours {
            stderr: err_r,
            stdout: Some(out_r),
            stdin: stdin_ours,
        };
        Ok((stdio, ours))
    }

    fn fds(&self) -> [std::os::fd::BorrowedFd<'_>; 3] {
        let stdout = self.stdout.as_ref().unwrap_or(&self.stdin);
        [self.stdin.as_fd(), stdout.as_fd(), self.stderr.as_fd()]
    }
}

impl Ours {
    fn register(self) -> io::Result<(AsyncFd<OwnedFd>, Streams)> {
        let stderr = fdio::register(self.stderr, Interest::READABLE)?;
        let streams = match self.stdout {
            Some(stdout) => Streams::Pipes {
                stdout: fdio::register(stdout, Interest::READABLE)?,
                stdin: self
                    .stdin
                    .map(|fd| fdio::register(fd, Interest::WRITABLE))
                    .transpose()?,
            },
            None => Streams::Socket,
        };
        Ok((stderr, streams))
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    pipe2(OFlag::O_CLOEXEC).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot create the command's pipes: {}", e.desc()),
        )
    })
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

/// The environment commands start from: the daemon's own, read once, minus
/// what systemd meant for the daemon (`NOTIFY_SOCKET`, `LISTEN_*`,
/// `WATCHDOG_*`) and `JOURNAL_STREAM`, which would not describe the command's
/// stderr (a pipe to the daemon).
pub fn base_env() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            !(k == "NOTIFY_SOCKET"
                || k == "JOURNAL_STREAM"
                || k.starts_with("LISTEN_")
                || k.starts_with("WATCHDOG_"))
        })
        .collect()
}

/// The kernel refused `pipe_size`: said at most once a minute, so that a
/// daemon that hovers at the pipe quota does not fill the journal.
static PIPE_REFUSED: LazyLock<Throttle> = LazyLock::new(|| Throttle::new(Duration::from_secs(60)));

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
    if let Some(e) = first_error {
        if PIPE_REFUSED.ready() {
            let got = fcntl(fd.as_fd(), FcntlArg::F_GETPIPE_SZ).unwrap_or(0);
            tracing::warn!(
                pipe_size = size,
                got,
                error = %e.desc(),
                "the kernel refuses pipes of pipe_size ({size} bytes; pipe-max-size or the per-user pipe quota); using smaller pipes ({got} bytes for this one); logged at most once a minute"
            );
        }
    }
}

/// The command's stderr, logged line by line with the connection's fields,
/// by a task of its own until end-of-file or until told to finish.
struct StderrLog {
    finish: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl StderrLog {
    fn start(fd: AsyncFd<OwnedFd>, tag: Tag, pid: i32) -> StderrLog {
        let (finish, finished) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut lines = Lines {
                pending: Vec::new(),
                tag,
                pid,
            };
            let told = tokio::select! {
                () = lines.until_end(&fd) => false,
                _ = finished => true,
            };
            if told {
                lines.what_is_written(&fd);
            }
            lines.rest();
        });
        StderrLog { finish, task }
    }

    /// Logs what is already written and waits until the last line is out.
    /// Bounded: a process outside the command's group may still be writing.
    async fn finish(self) {
        let _ = self.finish.send(());
        let _ = self.task.await;
    }
}

struct Lines {
    pending: Vec<u8>,
    tag: Tag,
    pid: i32,
}

impl Lines {
    /// Logs lines until the command (and everything sharing its stderr) closes it.
    async fn until_end(&mut self, fd: &AsyncFd<OwnedFd>) {
        loop {
            match fdio::read_with(fd, |fd| self.read_once(fd)).await {
                Ok(true) => {}
                Ok(false) | Err(_) => return,
            }
        }
    }

    /// Logs what is already written, without waiting for more (at most 64 KiB).
    fn what_is_written(&mut self, fd: &AsyncFd<OwnedFd>) {
        for _ in 0..16 {
            if self.read_once(fd.get_ref()) != Ok(true) {
                break;
            }
        }
    }

    /// Reads once and logs each complete line (or each `MAX_LINE` bytes of
    /// an overlong one); `Ok(false)` at end-of-file.
    fn read_once(&mut self, fd: &OwnedFd) -> Result<bool, Errno> {
        let mut buf = [0u8; 4096];
        let n = loop {
            match nix::unistd::read(fd, &mut buf) {
                Err(Errno::EINTR) => continue,
                r => break r?,
            }
        };
        if n == 0 {
            return Ok(false);
        }
        self.pending.extend_from_slice(&buf[..n]);
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.emit(&line[..line.len() - 1]);
        }
        while self.pending.len() >= MAX_LINE {
            let line: Vec<u8> = self.pending.drain(..MAX_LINE).collect();
            self.emit(&line);
        }
        Ok(true)
    }

    fn rest(&mut self) {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.emit(&rest);
        }
    }

    fn emit(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        tracing::info!(
            conn = self.tag.conn,
            service = &*self.tag.service,
            pid = self.pid,
            stream = "stderr",
            "{}",
            text.trim_end_matches('\r')
        );
    }
}
