//! Where commands are started: a few threads of their own, not the event
//! loop's, and at a lower priority where they may be.
//!
//! A vfork-style spawn suspends the thread that calls it until the child has
//! exec'd, and building the command's environment, making its cgroup and
//! writing its limits are blocking work too. Done on the event loop's
//! threads, a burst of new connections would stall every running stream on
//! them for as long as the burst lasts; here those threads go on relaying
//! while the launchers start commands. There are as many launchers as CPUs,
//! so a burst still starts commands as fast as the machine can; and they run
//! at nice 10 (the daemon's own plus [`LAUNCHER_NICE_STEP`](crate::runas::LAUNCHER_NICE_STEP)), so that on a
//! busy machine the event loop, which relays the running streams, wins the
//! CPU from them. A command is started at the daemon's own priority (or its
//! service's `nice`) all the same: its child sets it before the exec, which
//! needs CAP_SYS_NICE or an RLIMIT_NICE that allows it (`LimitNICE=+0` in the
//! shipped unit); where neither is there, the launchers keep the daemon's
//! priority, and the start-up log says so.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, LazyLock, Mutex};

use nix::unistd::Pid;
use tokio::sync::oneshot;

use crate::cgroup::{Slot, Tree};
use crate::config::{Containment, Service};
use crate::peer::Peer;
use crate::runas::{Lowered, Rlimit};
use crate::sys::{self, Place, Slots, Stage};

/// What a launcher needs to start one command.
pub struct Launch {
    pub service: Arc<Service>,
    pub base_env: Arc<[(OsString, OsString)]>,
    /// The client (None: a shared command's, which has many).
    pub peer: Option<Peer>,
    /// Variables from the client's request (a WebSocket upgrade's CGI set).
    pub request_env: Vec<(String, String)>,
    /// The command's descriptors 0, 1 and 2.
    pub child: [OwnedFd; 3],
    /// The daemon's subtree, for a service contained by cgroups.
    pub cgroups: Option<Tree>,
}

/// A command that started: its pid, a pidfd, and its cgroup.
pub struct Started {
    pub pid: Pid,
    pub pidfd: OwnedFd,
    pub cgroup: Option<Slot>,
}

type Job = Box<dyn FnOnce(Option<&Slots>) + Send>;

/// The launchers' queue. Each launcher reserves its descriptor slots (see
/// `sys::Slots`) when the pool starts: [`start`] runs it early in start-up,
/// while the descriptor table is still small.
static QUEUE: LazyLock<Mutex<Sender<Job>>> = LazyLock::new(|| {
    let (tx, rx) = channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8));
    match &*LOWERED {
        Some(l) => tracing::info!(
            "launchers: {threads} threads at nice {} (the event loop's {}: a burst of new connections yields the CPU to running streams); commands start at their own priority",
            l.launchers,
            l.own
        ),
        None => tracing::info!(
            "launchers: {threads} threads at the event loop's priority (a lower one needs CAP_SYS_NICE or LimitNICE=+0, for commands to get their priority back)"
        ),
    }
    for i in 0..threads {
        let rx = Arc::clone(&rx);
        let slots = Slots::reserve()
            .inspect_err(|e| tracing::warn!(error = %e, "cannot reserve descriptors for a launcher; its spawns copy the whole table"))
            .ok();
        let started = std::thread::Builder::new()
            .name(format!("launcher-{i}"))
            .spawn(move || serve(&rx, slots.as_ref()));
        if let Err(e) = started {
            tracing::error!(error = %e, "cannot start a launcher thread");
        }
    }
    Mutex::new(tx)
});

/// Whether the launchers run below the event loop (see the module's text).
static LOWERED: LazyLock<Option<Lowered>> = LazyLock::new(crate::runas::lowered_launchers);

/// Starts the launchers (call once, early in start-up).
pub fn start() {
    LazyLock::force(&QUEUE);
}

fn serve(jobs: &Mutex<Receiver<Job>>, slots: Option<&Slots>) {
    if let Some(lowered) = &*LOWERED {
        if let Err(e) = sys::set_thread_nice(lowered.launchers) {
            tracing::warn!(error = %e, "a launcher cannot lower its priority; it starts commands at the event loop's");
        }
    }
    loop {
        let job = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv();
        match job {
            Ok(job) => job(slots),
            Err(_) => return,
        }
    }
}

/// Starts the command on a launcher thread; resolves when it has exec'd (or failed).
pub async fn launch(job: Launch) -> io::Result<Started> {
    let (tx, rx) = oneshot::channel();
    let work: Job = Box::new(move |slots| {
        let _ = tx.send(spawn(job, slots));
    });
    QUEUE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(work)
        .map_err(|_| io::Error::other("no launcher thread is running"))?;
    rx.await
        .unwrap_or_else(|_| Err(io::Error::other("the launcher thread failed")))
}

/// The blocking part: the cgroup, the environment, the clone.
fn spawn(job: Launch, slots: Option<&Slots>) -> io::Result<Started> {
    let Launch {
        service,
        base_env,
        peer,
        request_env,
        child,
        cgroups,
    } = job;
    let cgroup =
        match (&service.containment, &cgroups) {
            (Containment::ProcessGroup, _) => None,
            (Containment::Cgroup(limits), Some(tree)) => Some(tree.take(limits)?),
            (Containment::Cgroup(_), None) => return Err(io::Error::other(
                "the service's commands need a cgroup, and the daemon has no cgroup subtree set up",
            )),
        };
    let exec = sys::Exec::new(
        &service.program,
        &service.argv,
        &environment(&base_env, &request_env, &service.env, peer.as_ref()),
        &service.working_directory,
        &service.run_as,
        LOWERED.as_ref(),
    )?;
    let place = cgroup.as_ref().map_or(Place::Here, |c| c.place());
    let [stdin, stdout, stderr] = &child;
    let started = sys::spawn(
        &exec,
        [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()],
        place,
        slots,
    );
    // Our copies of the command's ends close now, or its stdout would never
    // report end-of-file.
    drop(child);
    let (pid, pidfd) = started.map_err(|(stage, e)| spawn_error(&service, stage, e))?;
    Ok(Started { pid, pidfd, cgroup })
}

/// The command's environment: the daemon's, then the request's (what the
/// client sent: below what the operator set), then the service's `env`,
/// then the peer's variables; a later one replaces an earlier one of the
/// same name.
fn environment(
    base: &[(OsString, OsString)],
    request: &[(String, String)],
    service: &[(String, String)],
    peer: Option<&Peer>,
) -> Vec<(OsString, OsString)> {
    let mut env: BTreeMap<OsString, OsString> = base.iter().cloned().collect();
    env.extend(request.iter().map(|(k, v)| (k.into(), v.into())));
    env.extend(service.iter().map(|(k, v)| (k.into(), v.into())));
    let peer = peer.map(Peer::env).unwrap_or_default();
    env.extend(peer.into_iter().map(|(k, v)| (k.into(), v.into())));
    env.into_iter().collect()
}

/// The environment commands start from: the daemon's own, read once, minus
/// what systemd meant for the daemon (`NOTIFY_SOCKET`, `LISTEN_*`,
/// `WATCHDOG_*`) and `JOURNAL_STREAM`, which would not describe the command's
/// stderr (a pipe to the daemon).
pub fn base_env() -> Arc<[(OsString, OsString)]> {
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
            .any(|(l, _)| *l == Rlimit::Nproc);
    let hint = if at_nproc {
        " (the user is at rlimit_nproc)"
    } else {
        ""
    };
    let text = format!("{what}: {}{hint}", crate::fdio::reason(&e));
    match e.raw_os_error() {
        Some(code) => super::described(nix::errno::Errno::from_raw(code), text),
        None => io::Error::new(e.kind(), text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(extra: &str) -> Arc<Service> {
        let text = format!(
            "[[service]]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\ncommand = [\"true\"]\n{extra}"
        );
        let config = crate::config::load_str("t.toml", &text).unwrap();
        Arc::clone(&config.services[0])
    }

    /// EAGAIN from switching the user or from the exec, where the service
    /// sets `rlimit_nproc`, is the user at that limit: the message says so,
    /// and only then.
    #[test]
    fn the_message_names_rlimit_nproc_only_where_it_is_the_cause() {
        let (with, without) = (service("rlimit_nproc = 10"), service(""));
        let error = |errno| io::Error::from_raw_os_error(errno);
        let hinted = |service: &Service, stage, errno| {
            let message = spawn_error(service, stage, error(errno)).to_string();
            message.contains("(the user is at rlimit_nproc)")
        };
        for stage in [Stage::Credentials, Stage::Exec] {
            assert!(hinted(&with, stage, libc::EAGAIN), "{stage:?}");
            assert!(!hinted(&without, stage, libc::EAGAIN), "{stage:?}");
            assert!(!hinted(&with, stage, libc::EPERM), "{stage:?}");
        }
        assert!(!hinted(&with, Stage::Limits, libc::EAGAIN));
    }
}
