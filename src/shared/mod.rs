//! Shared commands (`shared = true`): one command for all of a service's
//! clients, its output fanned out to each of them, whatever protocol each
//! speaks. A client's connection goes through the same pipeline as any
//! other (admission, TLS, the WebSocket upgrade, its limits, its record);
//! where another connection would spawn its command, it joins the shared
//! one and reads its output from a pipe of its own.
//!
//! - `hub`: one running shared command, its clients, its end and record;
//! - `fanout`: its output into each client's pipe (tee(2), or one read and
//!   a write per client), with each client's backlog bounded by `max_lag`,
//!   and the replay for clients that join.
//!
//! [`Commands`] finds a service's running command or starts it, starts the
//! commands that start with the daemon (and restarts them with a back-off,
//! as systemd's `Restart=` does), retires those a reload changed, and ends
//! them all at the stop.

mod fanout;
mod flag;
mod hub;

use std::ffi::OsString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::cgroup::Tree;
use crate::command::SpawnError;
use crate::config::{Service, Start};
use crate::shutdown::{Phase, Watch};
pub use hub::{Hub, Watcher};

/// A command started with the daemon that exits is started again after
/// this, doubled for each exit in a row up to [`RESTART_MOST`]; a run
/// longer than [`RESTART_RESET`] starts the count again.
const RESTART_FIRST: Duration = Duration::from_millis(100);
const RESTART_MOST: Duration = Duration::from_secs(30);
const RESTART_RESET: Duration = Duration::from_secs(10);

/// The daemon's shared commands.
pub struct Commands {
    /// Every hub whose task has not ended, with its task.
    hubs: Mutex<Vec<(Arc<Hub>, JoinHandle<()>)>>,
    /// The tasks that keep the commands started with the daemon running.
    keepers: Mutex<Vec<JoinHandle<()>>>,
    /// One start at a time, so that clients arriving together share one.
    starting: tokio::sync::Mutex<()>,
    base_env: Arc<[(OsString, OsString)]>,
    cgroups: Option<Tree>,
    shutdown: Watch,
    /// The connections' numbering, which names cgroups: an instance takes a
    /// number from it too.
    ids: Arc<AtomicU64>,
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commands").finish_non_exhaustive()
    }
}

impl Commands {
    pub fn new(
        base_env: Arc<[(OsString, OsString)]>,
        cgroups: Option<Tree>,
        shutdown: Watch,
        ids: Arc<AtomicU64>,
    ) -> Commands {
        Commands {
            hubs: Mutex::default(),
            keepers: Mutex::default(),
            starting: tokio::sync::Mutex::new(()),
            base_env,
            cgroups,
            shutdown,
            ids,
        }
    }

    fn hubs(&self) -> MutexGuard<'_, Vec<(Arc<Hub>, JoinHandle<()>)>> {
        self.hubs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A client of shared `service` joins its running command, or starts
    /// it. `lines`: the client takes whole lines (its replay starts at one).
    pub async fn join(&self, service: &Arc<Service>, lines: bool) -> Result<Watcher, SpawnError> {
        if let Some(watcher) = self.join_running(service, lines)? {
            return Ok(watcher);
        }
        let _one_at_a_time = self.starting.lock().await;
        if let Some(watcher) = self.join_running(service, lines)? {
            return Ok(watcher);
        }
        let hub = self.start(service).await?;
        match hub.join(lines).map_err(SpawnError::Start)? {
            Some(watcher) => Ok(watcher),
            // Its output ended at once, before the client joined.
            None => Err(SpawnError::Start(std::io::Error::other(
                "the shared command ended as it started",
            ))),
        }
    }

    /// Joins the service's running command, if one takes clients.
    fn join_running(&self, service: &Service, lines: bool) -> Result<Option<Watcher>, SpawnError> {
        match self.running(service) {
            Some(hub) => hub.join(lines).map_err(SpawnError::Start),
            None => Ok(None),
        }
    }

    /// The service's running command, if one takes clients.
    fn running(&self, service: &Service) -> Option<Arc<Hub>> {
        self.hubs()
            .iter()
            .find(|(hub, task)| {
                !task.is_finished() && hub.service.name == service.name && hub.is_open()
            })
            .map(|(hub, _)| Arc::clone(hub))
    }

    /// Starts an instance of `service`'s command.
    async fn start(&self, service: &Arc<Service>) -> Result<Arc<Hub>, SpawnError> {
        let Some(settings) = &service.shared else {
            return Err(SpawnError::Start(std::io::Error::other(
                "the service is not shared",
            )));
        };
        let instance = self.ids.fetch_add(1, Ordering::Relaxed);
        let cgroups = self.cgroups.as_ref();
        let (hub, task) = Hub::start(
            service,
            settings,
            &self.base_env,
            cgroups,
            &self.shutdown,
            instance,
        )
        .await?;
        let mut hubs = self.hubs();
        hubs.retain(|(_, task)| !task.is_finished());
        hubs.push((Arc::clone(&hub), task));
        Ok(hub)
    }

    /// Starts the commands of `services` that start with the daemon, and
    /// keeps them running. Called at the start and after each reload.
    pub fn start_with_daemon(self: &Arc<Self>, services: &[Arc<Service>]) {
        let mut keepers = self.keepers.lock().unwrap_or_else(|e| e.into_inner());
        for old in keepers.drain(..) {
            old.abort();
        }
        for service in services {
            if service
                .shared
                .as_ref()
                .is_some_and(|s| s.start == Start::Daemon)
            {
                keepers.push(tokio::spawn(keep(Arc::clone(self), Arc::clone(service))));
            }
        }
    }

    /// After a reload: a running command whose service is gone, or whose
    /// command or shared settings changed, takes no new clients and ends
    /// when its last client leaves (new clients start a new one); the
    /// others go on as they are.
    pub fn reload(self: &Arc<Self>, services: &[Arc<Service>]) {
        for (hub, _) in self.hubs().iter() {
            let same = services
                .iter()
                .any(|s| s.name == hub.service.name && same_command(s, &hub.service));
            if !same {
                hub.retire();
            }
        }
        self.start_with_daemon(services);
    }

    /// The stop: once every connection has ended, each command gets the
    /// ending order; returns when each has written its record.
    pub async fn stop(&self) {
        for keeper in self
            .keepers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            keeper.abort();
        }
        let hubs: Vec<_> = self.hubs().drain(..).collect();
        for (hub, _) in &hubs {
            hub.stop();
        }
        for (_, task) in hubs {
            let _ = task.await;
        }
    }

    /// For STATUS=: each running shared command and its clients.
    pub fn status(&self) -> Option<String> {
        let hubs = self.hubs();
        let running: Vec<String> = hubs
            .iter()
            .filter(|(_, task)| !task.is_finished())
            .map(|(hub, _)| {
                format!(
                    "{} (pid {}, {} client(s))",
                    hub.service.name,
                    hub.pid,
                    hub.clients()
                )
            })
            .collect();
        (!running.is_empty()).then(|| format!("shared: {}", running.join(", ")))
    }
}

/// Whether a reload left a shared command as it was: the same program,
/// arguments, environment, directory, user and limits, containment, output
/// pipe, `kill_grace` and shared settings. (What applies to each client,
/// its protocol and limits, comes from the service its connection started
/// under.)
fn same_command(a: &Service, b: &Service) -> bool {
    a.program == b.program
        && a.argv == b.argv
        && a.env == b.env
        && a.working_directory == b.working_directory
        && a.run_as == b.run_as
        && a.containment == b.containment
        && a.pipe_size == b.pipe_size
        && a.kill_grace == b.kill_grace
        && a.transfer == b.transfer
        && a.shared == b.shared
}

/// Keeps a command started with the daemon running: starts it (unless a
/// client did), and after it ends starts it again after a back-off, saying
/// so in the journal, until the stop or a reload.
async fn keep(commands: Arc<Commands>, service: Arc<Service>) {
    let mut backoff = RESTART_FIRST;
    loop {
        if commands.shutdown.phase() != Phase::Running {
            return;
        }
        let began = Instant::now();
        let running = {
            let _one_at_a_time = commands.starting.lock().await;
            match commands.running(&service) {
                Some(hub) => Ok(hub),
                None => commands.start(&service).await,
            }
        };
        match running {
            Ok(hub) => hub.ended().await,
            Err(e) => tracing::warn!(
                service = %service.name,
                "cannot start the shared command: {e}"
            ),
        }
        if commands.shutdown.phase() != Phase::Running {
            return;
        }
        if began.elapsed() >= RESTART_RESET {
            backoff = RESTART_FIRST;
        }
        tracing::warn!(
            service = %service.name,
            restart_in_ms = backoff.as_millis() as u64,
            "the shared command started with the daemon has ended; starting it again in {} ms",
            backoff.as_millis()
        );
        let mut shutdown = commands.shutdown.clone();
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.reached(Phase::Draining) => return,
        }
        backoff = (backoff * 2).min(RESTART_MOST);
    }
}
