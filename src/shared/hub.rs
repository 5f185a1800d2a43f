//! One running shared command (an instance): its clients, its fan-out, its
//! end and its record.
//!
//! Clients join and leave at any time. The command's output is read as it
//! comes, with clients or without (then only the replay keeps it), so a
//! command is never held back by a client (unless `lagging = "wait"`). It
//! ends when its output ends (each client then gets the rest and the end of
//! the output), `linger` after its last client left (a command started with
//! the daemon does not linger out), when a reload replaced its service and
//! its last client left, or at the stop: then it gets the ending order every
//! command gets (SIGTERM, `kill_grace`, the cgroup killed), and writes its
//! record.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::fanout::{Fanout, Feed, Replay, Round, Way};
use super::flag::Flag;
use crate::command::{self, Command, Ended};
use crate::config::{Lagging, Service, SharedCommand, Start, Transfer};
use crate::end::End;
use crate::shutdown::{Phase, Watch};

/// A shared command, running.
pub struct Hub {
    pub service: Arc<Service>,
    settings: SharedCommand,
    /// Its number (from the connections' numbering).
    pub instance: u64,
    pub pid: i32,
    state: Mutex<State>,
    /// A client joined or left.
    members: Notify,
    /// A backlog shrank.
    progress: Arc<Notify>,
    /// The daemon is stopping: the command ends now.
    stop: Flag,
    retired: AtomicBool,
    /// The first client not in the fan-out's latest snapshot of them: one
    /// that joined during a round gets that round's output afterwards.
    snapshot: AtomicU64,
    /// The command has ended and its record is written.
    done: Flag,
}

struct State {
    feeds: Vec<(u64, Arc<Feed>)>,
    next: u64,
    replay: Replay,
    /// New clients may join.
    open: bool,
    /// For the record: clients that joined, the most at once, those dropped
    /// for lagging, the bytes of output.
    joined: u64,
    most: usize,
    lagged: u64,
    produced: u64,
}

/// A client's place at a shared command: its pipe to read the output from,
/// and word of it being dropped for lagging. Leaves when dropped.
pub struct Watcher {
    pub output: AsyncFd<OwnedFd>,
    lag: Arc<Flag>,
    hub: Arc<Hub>,
    id: u64,
}

impl Watcher {
    /// Resolves when the client has been dropped for lagging.
    pub async fn lagged(&self) -> End {
        self.lag.raised().await;
        End::Lagging
    }

    /// Whether it was dropped for lagging (its output then ends early).
    pub fn was_dropped(&self) -> bool {
        self.lag.is_raised()
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let mut state = self.hub.state();
        if let Some(i) = state.feeds.iter().position(|(id, _)| *id == self.id) {
            let (_, feed) = state.feeds.swap_remove(i);
            feed.leave();
        }
        drop(state);
        self.hub.members.notify_one();
        // A command waiting for this client (`lagging = "wait"`) goes on.
        self.hub.progress.notify_one();
    }
}

/// Why a shared command ended, for its record.
enum Why {
    /// Its output ended (or was held by a process that left).
    Output(End),
    /// No client for `linger`.
    Lingered,
    /// A reload replaced its service, and no client was left.
    Replaced,
    Shutdown,
    Error(String),
}

impl Hub {
    /// Starts `service`'s shared command as instance `instance`. Returns the
    /// hub and the task that runs it until it ends (its record written).
    pub async fn start(
        service: &Arc<Service>,
        settings: &SharedCommand,
        base_env: &Arc<[(std::ffi::OsString, std::ffi::OsString)]>,
        cgroups: Option<&crate::cgroup::Tree>,
        shutdown: &Watch,
        instance: u64,
    ) -> Result<(Arc<Hub>, tokio::task::JoinHandle<()>), command::SpawnError> {
        let tag = command::Tag {
            conn: instance,
            service: Arc::from(service.name.as_str()),
        };
        let (command, output) = Command::spawn_shared(service, base_env, cgroups, tag).await?;
        let way = match service.transfer {
            Transfer::Splice => Way::Tee,
            _ => Way::Copy,
        };
        let fanout = Fanout::new(output, way).map_err(command::SpawnError::Start)?;
        let hub = Arc::new(Hub {
            service: Arc::clone(service),
            settings: settings.clone(),
            instance,
            pid: command.pid(),
            state: Mutex::new(State {
                feeds: Vec::new(),
                next: 0,
                replay: Replay::new(settings.replay),
                open: true,
                joined: 0,
                most: 0,
                lagged: 0,
                produced: 0,
            }),
            members: Notify::new(),
            progress: Arc::new(Notify::new()),
            stop: Flag::default(),
            retired: AtomicBool::new(false),
            snapshot: AtomicU64::new(0),
            done: Flag::default(),
        });
        tracing::info!(
            service = %service.name,
            instance,
            pid = hub.pid,
            "shared command started"
        );
        let task = tokio::spawn(run(Arc::clone(&hub), command, fanout, shutdown.clone()));
        Ok((hub, task))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new client: None once the hub takes no more (its command is
    /// ending). `lines`: the client gets whole lines (WebSocket text), so
    /// its replay starts at one.
    pub fn join(self: &Arc<Hub>, lines: bool) -> std::io::Result<Option<Watcher>> {
        let (output, input) = command::client_pipe(self.service.pipe_size)?;
        let mut state = self.state();
        if !state.open {
            return Ok(None);
        }
        let feed = Feed::new(input, state.replay.take(lines));
        let id = state.next;
        state.next += 1;
        state.feeds.push((id, Arc::clone(&feed)));
        state.joined += 1;
        state.most = state.most.max(state.feeds.len());
        drop(state);
        let lag = Arc::clone(&feed.lag);
        tokio::spawn(feed.write(Arc::clone(&self.progress)));
        self.members.notify_one();
        Ok(Some(Watcher {
            output,
            lag,
            hub: Arc::clone(self),
            id,
        }))
    }

    /// Clients watching now.
    pub fn clients(&self) -> usize {
        self.state().feeds.len()
    }

    /// Whether new clients may join.
    pub fn is_open(&self) -> bool {
        self.state().open && !self.retired.load(Ordering::Relaxed)
    }

    /// The daemon stops: the command ends now.
    pub fn stop(&self) {
        self.stop.raise();
    }

    /// A reload replaced the service: no new clients; the command ends
    /// when its last client leaves.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.members.notify_one();
    }

    /// The clients a round gives its output to.
    fn feeds(&self) -> Vec<Arc<Feed>> {
        let state = self.state();
        self.snapshot.store(state.next, Ordering::Relaxed);
        state.feeds.iter().map(|(_, f)| Arc::clone(f)).collect()
    }

    /// After a round: clients that joined during it get its output (they
    /// were not among the round's clients, and their replay was taken
    /// before it), the replay keeps it, and clients too far behind are
    /// dropped (`lagging = "drop"`). The round's own output does
    /// not count: after a pause of the daemon (a busy machine), a round can
    /// bring a whole pipe of output at once, which the clients' connections
    /// have not had a chance to take yet.
    fn after(&self, round: &Round, shared: &SharedCommand) {
        let mut state = self.state();
        let this_round = match round {
            Round::Moved(chunk) => {
                let snapshot = self.snapshot.load(Ordering::Relaxed);
                for (_, feed) in state.feeds.iter().filter(|(id, _)| *id >= snapshot) {
                    feed.push(chunk);
                }
                state.produced += chunk.len() as u64;
                state.replay.push(chunk);
                chunk.len() as u64
            }
            Round::Discarded(n) => {
                state.produced += *n as u64;
                *n as u64
            }
            Round::Ended | Round::Dry => return,
        };
        if shared.lagging == Lagging::Drop {
            let before = state.feeds.len();
            state.feeds.retain(|(_, feed)| {
                let behind = feed.behind() > shared.max_lag + this_round;
                if behind {
                    feed.drop_lagging();
                }
                !behind
            });
            state.lagged += (before - state.feeds.len()) as u64;
        }
    }

    /// With `lagging = "wait"`: whether a client is `max_lag` behind, so the
    /// command is not read until it catches up.
    fn held_back(&self, shared: &SharedCommand) -> bool {
        shared.lagging == Lagging::Wait
            && self
                .state()
                .feeds
                .iter()
                .any(|(_, f)| !f.is_gone() && f.behind() > shared.max_lag)
    }

    /// Resolves when the command should end for want of clients: `linger`
    /// after the last left (never with `linger = "never"`, nor for a
    /// command started with the daemon, unless a reload replaced its
    /// service); at once while the daemon stops. Closes the hub to new
    /// clients as it resolves.
    async fn unwatched(&self, shared: &SharedCommand, shutdown: &Watch) -> Why {
        loop {
            let changed = self.members.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let retired = self.retired.load(Ordering::Relaxed);
            let draining = shutdown.phase() != Phase::Running;
            let linger = match (retired || draining, shared.start, shared.linger) {
                (true, _, _) => Some(Duration::ZERO),
                (false, Start::Daemon, _) => None,
                (false, Start::FirstClient, linger) => linger,
            };
            let empty = self.state().feeds.is_empty();
            match linger {
                Some(linger) if empty => {
                    let mut phase = shutdown.clone();
                    tokio::select! {
                        () = &mut changed => continue,
                        () = phase.reached(Phase::Draining), if !draining => continue,
                        () = tokio::time::sleep(linger) => {}
                    }
                    let mut state = self.state();
                    if state.feeds.is_empty() {
                        state.open = false;
                        return if draining {
                            Why::Shutdown
                        } else if retired {
                            Why::Replaced
                        } else {
                            Why::Lingered
                        };
                    }
                }
                _ => {
                    let mut phase = shutdown.clone();
                    tokio::select! {
                        () = changed => {}
                        () = phase.reached(Phase::Draining), if !draining => {}
                    }
                }
            }
        }
    }

    /// Resolves once the command has ended and its record is written.
    pub async fn ended(&self) {
        self.done.raised().await;
    }

    /// No new clients; each client gets what is left, then the end.
    fn close(&self) {
        let mut state = self.state();
        state.open = false;
        for (_, feed) in state.feeds.drain(..) {
            feed.close();
        }
    }
}

/// The hub's task: the fan-out until the command ends, then the ending
/// order and the record.
async fn run(hub: Arc<Hub>, command: Command, fanout: Fanout, shutdown: Watch) {
    let shared = hub.settings.clone();
    let started = Instant::now();
    let keep = Replay::new(shared.replay).wanted();
    let feeds = || hub.feeds();
    let why = {
        // Made once: each runs its own clock across the rounds.
        let held = command.held(&fanout.source);
        let unwatched = hub.unwatched(&shared, &shutdown);
        let stopped = hub.stop.raised();
        tokio::pin!(held, unwatched, stopped);
        loop {
            let held_back = hub.held_back(&shared);
            tokio::select! {
                round = fanout.round(&feeds, keep), if !held_back => match round {
                    Ok(Round::Ended) => break Why::Output(End::OutputEnded),
                    Ok(round) => hub.after(&round, &shared),
                    Err(e) => break Why::Error(format!("reading the command's output: {}", e.desc())),
                },
                () = hub.progress.notified(), if held_back => {}
                () = &mut held => break Why::Output(End::OutputHeld),
                why = &mut unwatched => break why,
                () = &mut stopped => break Why::Shutdown,
            }
        }
    };
    hub.close();
    let patience = match &why {
        Why::Output(_) => hub.service.kill_grace,
        _ => Duration::ZERO,
    };
    let ended = command.finish(patience).await;
    record(&hub, &why, &ended, started.elapsed());
    ended.release_cgroup().await;
    hub.done.raise();
}

/// The shared command's own record.
fn record(hub: &Hub, why: &Why, ended: &Ended, took: Duration) {
    let state = hub.state();
    let (joined, most, lagged, bytes) = (state.joined, state.most, state.lagged, state.produced);
    drop(state);
    let reason = match why {
        Why::Output(end) => end
            .clone()
            .after_exit(&ended.exit, ended.usage.oom_kills)
            .reason(),
        Why::Lingered => "lingered",
        Why::Replaced => "replaced",
        Why::Shutdown => "shutdown",
        Why::Error(_) => "error",
    };
    let detail = match why {
        Why::Error(e) => format!(" ({e})"),
        _ => String::new(),
    };
    let usage = ended.usage;
    let exit = ended.exit.to_string();
    let duration_ms = took.as_millis() as u64;
    tracing::info!(
        service = %hub.service.name,
        instance = hub.instance,
        pid = hub.pid,
        exit,
        reason,
        bytes,
        duration_ms,
        clients = joined,
        clients_max = most as u64,
        lagging = lagged,
        cpu_usec = usage.cpu_usec,
        memory_peak = usage.memory_peak,
        tasks_peak = usage.tasks_peak,
        oom_kills = usage.oom_kills,
        "shared command ended: {reason}{detail}, exit {exit}, {bytes} bytes in {duration_ms} ms \
         to {joined} client(s), at most {most} at once, {lagged} dropped for lagging"
    );
}
