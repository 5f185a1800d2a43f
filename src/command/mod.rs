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
//! 1. it gets `patience` to exit on its own, as the end policy
//!    ([`crate::end::Ending`]) says: `kill_grace` once its output has ended,
//!    none after any other end (a limit, `max_bytes` included, the client
//!    left, the stop);
//! 2. then SIGTERM to every process it contains, and `kill_grace` for all of
//!    them to end (with a process group, for the command to exit);
//! 3. then SIGKILL to what is left: `cgroup.kill`, or the process group
//!    (the command's zombie still holds the group id, so the signal cannot
//!    reach another connection's processes);
//! 4. once nothing is left (`populated 0`, or the command has exited), it is
//!    reaped and what it used read;
//! 5. its stderr logger logs what is already written, and stops;
//! 6. after the record, its cgroup goes back to the daemon's pool of ready
//!    ones (see `cgroup`).
//!
//! While the output is relayed, [`Command::held`] does steps 2 and
//! 3 early when the command exits first, so a background process holding
//! its stdout cannot keep the connection open. With a process group, a
//! process that left it cannot be reached; the relay then stops waiting for
//! output `kill_grace` after the SIGKILL.

mod inbox;
mod launch;
mod stderr;
mod stdio;

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::cgroup::{Slot, Tree, Usage};
use crate::config::Service;
pub use crate::end::Exit;
use crate::fdio;
use crate::peer::Peer;
use crate::sys;
pub use inbox::{writable, Inbox};
pub use launch::base_env;

/// Starts the threads that serve every command (call once, early in
/// start-up): the launchers, which reserve their descriptors while the
/// table is small, and the stderr reader.
pub fn start_threads() {
    launch::start();
    stderr::start();
}
use launch::{Launch, Started};
use stderr::StderrLog;
pub use stdio::{client_pipe, Input, Streams};

/// Why a command is not running.
#[derive(Debug)]
pub enum SpawnError {
    /// It could not be started (the record's `spawn-failed`).
    Start(io::Error),
    /// The event loop refused one of the descriptors the daemon would watch
    /// it by; it was not started, or was ended at once.
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

impl SpawnError {
    /// The daemon is out of descriptors (EMFILE, ENFILE): the command could
    /// start once another connection gives some back.
    pub fn out_of_descriptors(&self) -> bool {
        let SpawnError::Start(e) = self else {
            return false;
        };
        let errno = e
            .raw_os_error()
            .map(Errno::from_raw)
            .or_else(|| e.get_ref()?.downcast_ref::<Described>().map(|d| d.errno));
        matches!(errno, Some(Errno::EMFILE | Errno::ENFILE))
    }
}

/// An error described for the record ("cannot create the command's pipes:
/// Too many open files") that keeps its errno.
#[derive(Debug)]
pub(crate) struct Described {
    errno: Errno,
    text: String,
}

impl fmt::Display for Described {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for Described {}

/// `errno`, described as `text` (which says it).
pub(crate) fn described(errno: Errno, text: String) -> io::Error {
    io::Error::new(io::Error::from(errno).kind(), Described { errno, text })
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
    cgroup: Option<Slot>,
    reaped: bool,
}

/// A command that has ended: how, what it used, and its cgroup, to give
/// back once the record is written.
pub struct Ended {
    pub exit: Exit,
    pub usage: Usage,
    cgroup: Option<Slot>,
}

impl Ended {
    /// Gives the command's cgroup (empty by now) back to the daemon's pool.
    pub async fn release_cgroup(self) {
        if let Some(cgroup) = self.cgroup {
            cgroup.release(&self.usage).await;
        }
    }
}

impl Command {
    /// Spawns `service`'s command for a connection from `peer`, on a
    /// launcher thread (see `launch`), with its streams as the service's
    /// `transfer` and `stdin` say; `socket` is the client's plaintext
    /// socket, which the command itself gets with `transfer = "direct"`
    /// (then there are no [`Streams`]).
    ///
    /// `base_env` is the daemon's environment as read at start, minus the
    /// variables meant for the daemon alone; `request_env` what the client's
    /// request adds (a WebSocket upgrade's CGI variables, TLS's `SSL_*`).
    /// Every descriptor the daemon keeps is registered with the event loop
    /// as it is made; if one cannot be, nothing is started.
    #[allow(clippy::too_many_arguments)]
    pub async fn spawn(
        service: &Arc<Service>,
        base_env: &Arc<[(OsString, OsString)]>,
        peer: &Peer,
        request_env: Vec<(String, String)>,
        socket: &OwnedFd,
        cgroups: Option<&Tree>,
        tag: Tag,
    ) -> Result<(Command, Option<Streams>), SpawnError> {
        let opened = stdio::open(service, socket)?;
        let launch = Launch {
            service: Arc::clone(service),
            base_env: Arc::clone(base_env),
            peer: Some(peer.clone()),
            request_env,
            child: opened.child,
            cgroups: cgroups.cloned(),
        };
        let command = Command::start(launch, opened.stderr, tag).await?;
        Ok((command, opened.streams))
    }

    /// Spawns a shared service's one command (see `shared`): its stdin is
    /// /dev/null, its stdout a pipe (returned, the daemon's end), and no
    /// client's variables are in its environment. `tag.conn` is its
    /// number, from the connections' numbering.
    pub async fn spawn_shared(
        service: &Arc<Service>,
        base_env: &Arc<[(OsString, OsString)]>,
        cgroups: Option<&Tree>,
        tag: Tag,
    ) -> Result<(Command, AsyncFd<OwnedFd>), SpawnError> {
        let (opened, output) = stdio::open_shared(service)?;
        let launch = Launch {
            service: Arc::clone(service),
            base_env: Arc::clone(base_env),
            peer: None,
            request_env: Vec::new(),
            child: opened.child,
            cgroups: cgroups.cloned(),
        };
        let command = Command::start(launch, opened.stderr, tag).await?;
        Ok((command, output))
    }

    /// Starts `launch` on a launcher thread, and watches what it started.
    async fn start(launch: Launch, stderr: OwnedFd, tag: Tag) -> Result<Command, SpawnError> {
        let grace = launch.service.kill_grace;
        let stderr = StderrLog::watch(stderr, tag).map_err(SpawnError::Unwatched)?;
        let started = launch::launch(launch).await.map_err(SpawnError::Start)?;
        let Started { pid, pidfd, cgroup } = started;
        // Until it is watched, an early return must not leave the command
        // running unsupervised (the cgroup, dropped, kills what is in it).
        let unwatched = Unwatched(pid);
        let pidfd = fdio::register(pidfd, Interest::READABLE).map_err(SpawnError::Unwatched)?;
        unwatched.disarm();
        stderr.started(pid.as_raw());
        Ok(Command {
            pid,
            pidfd,
            grace,
            stderr: Some(stderr),
            cgroup,
            reaped: false,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Resolves when the command (the group's leader) has exited.
    pub async fn exited(&self) {
        // Readable for good once the process is a zombie; nothing to clear.
        let _ = self.pidfd.readable().await;
    }

    /// Resolves when the daemon should stop waiting for the command's
    /// `output`: once the command has exited and what is left of it has
    /// been ended (steps 2 and 3 of the ending order, early), and what they
    /// wrote is relayed. Never with a cgroup: its end closes the output.
    /// Run it beside the transfer, so a background process holding the
    /// output cannot keep the connection open.
    pub async fn held(&self, output: &AsyncFd<OwnedFd>) {
        self.end_leftovers().await;
        abandon_when_drained(output, self.grace).await;
    }

    /// Once the command has exited, ends what is left of it: SIGTERM now,
    /// SIGKILL after `kill_grace`. Resolves when the relay should stop
    /// waiting for more output: never with a cgroup (its end closes the
    /// output), and after the SIGKILL with a process group, since a process
    /// that left the group may hold the output open.
    async fn end_leftovers(&self) {
        self.exited().await;
        // Boxed: a connection's future keeps room for its longest wait, and
        // this one only comes once the command has exited.
        Box::pin(self.end_the_rest()).await;
    }

    /// [`Command::end_leftovers`] after the exit.
    async fn end_the_rest(&self) {
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
        let leftovers = self.cgroup.as_ref().is_some_and(|c| c.populated());
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
            stderr.finish();
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

/// With a process group, once the command and its group are gone while its
/// output is still open (a process that left the group holds it): resolves
/// when what they wrote has been relayed (the output is empty), or after
/// `grace` at most, so such a process cannot keep the connection. Never
/// once no process holds the output: its end-of-file is on the way, however
/// slowly the client takes what is left.
async fn abandon_when_drained(output: &AsyncFd<OwnedFd>, grace: Duration) {
    const LOOK_EVERY: Duration = Duration::from_millis(20);
    let deadline = std::time::Instant::now() + grace;
    loop {
        tokio::time::sleep(LOOK_EVERY).await;
        let fd = output.get_ref().as_fd();
        if fdio::hung_up(fd) {
            return std::future::pending().await;
        }
        if sys::readable_bytes(fd).is_ok_and(|n| n == 0) || std::time::Instant::now() >= deadline {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command whose connection's task ends before it is finished (a
    /// panic, the runtime shutting down) is killed and reaped when dropped:
    /// no process is left, not even a zombie.
    #[tokio::test]
    async fn a_command_dropped_unfinished_is_killed_and_reaped() {
        let text = "[[service]]\nname = \"s\"\ncommand = [\"sleep\", \"60\"]\n";
        let config = crate::config::load_str("t.toml", text).unwrap();
        let (socket, _client) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = Peer::Unix {
            pid: 1,
            uid: 0,
            gid: 0,
        };
        let tag = Tag {
            conn: 1,
            service: "s".into(),
        };
        let base_env = Arc::from(Vec::new());
        let (command, _streams) = Command::spawn(
            &config.services[0],
            &base_env,
            &peer,
            Vec::new(),
            &OwnedFd::from(socket),
            None,
            tag,
        )
        .await
        .unwrap();
        let pid = Pid::from_raw(command.pid());
        assert_eq!(nix::sys::signal::kill(pid, None), Ok(()), "it runs");
        drop(command);
        assert_eq!(nix::sys::signal::kill(pid, None), Err(Errno::ESRCH));
    }
}
