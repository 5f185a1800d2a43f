//! The running daemon: one accept loop per listener, connection limits,
//! reload on SIGHUP, live status and watchdog for systemd, and the stop.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

use crate::admit::Admissions;
use crate::admit::QUIET;
use crate::cgroup::{Offer, Tree};
use crate::command;
use crate::config::sites::Site;
use crate::config::{self, Config};
use crate::connection::{Context, Handler, Places, Starved};
use crate::episode::Counted;
use crate::fdio::{self, Class};
use crate::listen::{self, Listener};
use crate::peer::{Family, Peer};
use crate::places::{handshake_budget, Gate, Gates, ServicePlace};
use crate::record::{Record, Stats};
use crate::shared::Commands;
use crate::shutdown::{Phase, Shutdown, Watch};
use crate::{log, notify, reload, sys};

/// Pause after an accept error that more attempts cannot fix at once
/// (out of descriptors or memory).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What the accept loops share.
#[derive(Debug)]
struct Shared {
    config: RwLock<Arc<Config>>,
    /// Each handshaking socket's budget of handshakes at once, by the name
    /// of its first service.
    handshakes: Gates,
    global: Arc<Gate>,
    stats: Arc<Stats>,
    /// What each connection gets.
    context: Arc<Context>,
    /// Connection numbers (shared commands take theirs from it too).
    next_id: Arc<AtomicU64>,
    /// Where each reload's outcome is published for `--reload`.
    reloads: reload::Outcomes,
    /// The last failed reload, shown in STATUS= until a reload succeeds.
    reload_error: Mutex<Option<String>>,
}

impl Shared {
    fn new(config: Config, shutdown: Watch, cgroups: Option<Tree>) -> Arc<Shared> {
        let stats = Arc::new(Stats::default());
        let next_id = Arc::new(AtomicU64::new(1));
        let base_env = command::base_env();
        let commands = Commands::new(
            Arc::clone(&base_env),
            cgroups.clone(),
            shutdown.clone(),
            Arc::clone(&next_id),
        );
        Arc::new(Shared {
            global: Gate::new(config.max_connections),
            config: RwLock::new(Arc::new(config)),
            handshakes: Gates::default(),
            stats: Arc::clone(&stats),
            context: Arc::new(Context {
                base_env,
                shutdown,
                admissions: Admissions::default(),
                stats,
                cgroups,
                starved: Starved::default(),
                shared: Arc::new(commands),
                gates: Gates::default(),
            }),
            next_id,
            reload_error: Mutex::new(None),
            reloads: reload::Outcomes::from_env(),
        })
    }

    fn config(&self) -> Arc<Config> {
        Arc::clone(&self.config.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn gate(&self, service: &config::Service) -> Arc<Gate> {
        let gates = &self.context.gates;
        gates.of(&service.name, service.max_connections)
    }

    /// The socket's handshake budget (see [`ServicePlace`]).
    fn handshakes(&self, site: &Site) -> Arc<Gate> {
        let budget = site_budget(site);
        self.handshakes.of(&site.front().name, budget)
    }

    fn status(&self) -> String {
        let mut s = format!(
            "{} active, {} served, {} sent",
            self.stats.active.load(Ordering::Relaxed),
            self.stats.served.load(Ordering::Relaxed),
            human_bytes(self.stats.bytes_sent.load(Ordering::Relaxed)),
        );
        let refused = self.stats.refused.load(Ordering::Relaxed);
        if refused > 0 {
            s.push_str(&format!(", {refused} refused"));
        }
        if let Some(running) = self.context.shared.status() {
            s.push_str("; ");
            s.push_str(&running);
        }
        if let Some(e) = &*self.reload_error.lock().unwrap_or_else(|e| e.into_inner()) {
            s.push_str("; reload failed, previous config in use: ");
            s.push_str(e);
        }
        s
    }
}

/// The daemon, ready to serve.
pub struct Server {
    pub config: Config,
    /// Where SIGHUP reloads from; None when running on the built-in config.
    pub config_path: Option<PathBuf>,
    pub listeners: Vec<Listener>,
    pub log_level: log::Level,
    /// The delegated cgroup subtree the daemon lives in (None: process groups).
    pub cgroups: Option<Tree>,
}

impl Server {
    /// Serves until SIGTERM or SIGINT (Ok) or until a listener fails (Err).
    pub async fn run(self) -> Result<(), String> {
        let Server {
            config,
            config_path,
            listeners,
            log_level,
            cgroups,
        } = self;
        let (stop, watch) = Shutdown::new();
        let shared = Shared::new(config, watch, cgroups);
        let mut signals =
            Signals::new().map_err(|e| format!("cannot install signal handlers: {e}"))?;
        let owned_paths: Vec<PathBuf> = listeners
            .iter()
            .filter_map(|l| l.owned_path.clone())
            .collect();
        let routes: Vec<Route> = listeners.iter().map(Route::of).collect();
        let mut loops = JoinSet::new();
        for l in listeners {
            loops.spawn(accept_loop(Arc::clone(&shared), register(&shared, l)?));
        }
        let ticker = tokio::spawn(report(Arc::clone(&shared)));
        let commands = Arc::clone(&shared.context.shared);
        commands.start_with_daemon(&shared.config().services);

        notify::ready(&shared.status());
        tracing::info!(config = %shared.config().origin, "ready");

        let outcome = loop {
            tokio::select! {
                sig = signals.next() => match sig {
                    Sig::Stop => break Ok(()),
                    Sig::Reload => reload_config(&shared, config_path.as_deref(), &routes, &log_level),
                },
                Some(r) = loops.join_next() => match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(e),
                    Err(e) => break Err(format!("an accept loop panicked: {e}")),
                },
            }
        };

        drain(&shared, &stop, loops, &owned_paths, outcome.is_err()).await;
        ticker.abort();
        shared.context.admissions.finish();
        tracing::info!(
            served = shared.stats.served.load(Ordering::Relaxed),
            "stopped"
        );
        outcome
    }
}

/// What routes a listener's connections to its services, kept for reloads.
struct Route {
    key: listen::Key,
    label: String,
}

impl Route {
    fn of(l: &Listener) -> Route {
        Route {
            key: l.key.clone(),
            label: l.label.clone(),
        }
    }
}

/// Handshakes a socket may have going at once: its services' budgets.
fn site_budget(site: &Site) -> usize {
    let places = site.services().iter().map(|s| s.max_connections).sum();
    handshake_budget(places)
}

/// A listener registered with the event loop, ready for its accept loop.
struct Accepting {
    fd: AsyncFd<std::os::fd::OwnedFd>,
    family: Family,
    route: Route,
}

fn register(shared: &Shared, l: Listener) -> Result<Accepting, String> {
    let route = Route::of(&l);
    let service = listen::route(&shared.config(), &l.key)
        .map(|site| {
            let names: Vec<_> = site.services().iter().map(|s| s.name.as_str()).collect();
            names.join(", ")
        })
        .unwrap_or_default();
    tracing::info!(service, listener = %l.label, "listening");
    let fd = fdio::register(l.fd, Interest::READABLE)
        .map_err(|e| format!("{}: cannot register with the event loop: {e}", l.label))?;
    Ok(Accepting {
        fd,
        family: l.family,
        route,
    })
}

/// The stop: no new connections (the accept loops end and the listeners
/// close), running ones get `shutdown_timeout`, then they are ended.
/// Returns once every connection has written its record.
async fn drain(
    shared: &Shared,
    stop: &Shutdown,
    mut loops: JoinSet<Result<(), String>>,
    owned_paths: &[PathBuf],
    failed: bool,
) {
    let timeout = shared.config().shutdown_timeout;
    let active = shared.stats.active.load(Ordering::Relaxed);
    notify::stopping(&format!("stopping: {active} connections finishing"));
    tracing::info!(
        active,
        timeout_ms = timeout.as_millis() as u64,
        "stopping: no new connections; running ones may finish"
    );
    stop.advance(Phase::Draining);
    loops.shutdown().await;
    // The listeners are closed: remove their socket files now, not after
    // the drain, when a new instance may already have bound the same path.
    for p in owned_paths {
        let _ = std::fs::remove_file(p);
    }
    let drained = tokio::time::timeout(timeout, shared.global.idle()).await;
    if failed || drained.is_err() {
        tracing::warn!(
            active = shared.stats.active.load(Ordering::Relaxed),
            "ending the connections still running"
        );
        stop.advance(Phase::Forced);
        shared.global.idle().await;
    }
    // Every client has gone: the shared commands end, and write their records.
    shared.context.shared.stop().await;
    // Every command has ended: the ready cgroups go.
    if let Some(tree) = &shared.context.cgroups {
        tree.close();
    }
}

/// Accepts connections on one listener until the daemon stops.
async fn accept_loop(shared: Arc<Shared>, listener: Accepting) -> Result<(), String> {
    let Accepting { fd, family, route } = listener;
    let label = &route.label;
    let mut stop = shared.context.shutdown.clone();
    let mut exhausted: Option<Counted> = None;
    let mut at_limit: Option<Counted> = None;
    loop {
        // Resolved again after accept: a reload while this loop waits in
        // accept must apply to the connection that wakes it.
        let site = || listen::route(&shared.config(), &route.key);
        let Some(first) = site() else {
            return Err(format!("{label}: no service for this socket"));
        };

        // First a client, then the places, then accept: an idle listener holds
        // no place that a busy one sharing the limit could use.
        let mut pending = tokio::select! {
            r = fd.readable() => r.map_err(|e| format!("{label}: waiting for clients: {e}"))?,
            () = stop.reached(Phase::Draining) => return Ok(()),
        };
        let places = tokio::select! {
            p = take_places(&shared, &first, label, &mut at_limit) => p,
            () = stop.reached(Phase::Draining) => return Ok(()),
        };
        let socket = match sys::accept(fd.get_ref().as_fd()) {
            Ok(socket) => socket,
            // Nobody after all (another thread of the runtime took it): wait
            // for the next client.
            Err(Errno::EAGAIN) => {
                pending.clear_ready();
                continue;
            }
            Err(e) => match fdio::class(e) {
                Class::Transient => continue,
                // An error of the one pending connection, which accept(2)
                // reports (see its man page); the next one may be fine, so
                // no pause: a client that resets in the backlog must not
                // slow the others.
                Class::Disconnect => continue,
                // Out of descriptors or memory: more attempts now cannot succeed.
                Class::Exhausted => {
                    let now = Instant::now();
                    if exhausted.get_or_insert_with(|| Counted::new(now)).add(now) {
                        tracing::warn!(listener = %label, error = %e.desc(), "accept failed; pausing {} ms, retrying (logged once until it recovers)", ACCEPT_BACKOFF.as_millis());
                    }
                    drop(places);
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                        () = stop.reached(Phase::Draining) => return Ok(()),
                    }
                }
                Class::Other => return Err(format!("{label}: accept failed: {}", e.desc())),
            },
        };
        drop(pending);
        if let Some(episode) = exhausted.take_if(|e| e.is_over(Instant::now(), QUIET)) {
            tracing::info!(
                listener = %label,
                "accepting again: accept(2) failed {} time(s) over {:.1} s for want of descriptors or memory",
                episode.count(), episode.span().as_secs_f64()
            );
        }
        serve(&shared, site().unwrap_or(first), socket, family, places);
    }
}

/// Starts the task of one accepted connection, with its record.
fn serve(
    shared: &Arc<Shared>,
    site: Site,
    socket: std::os::fd::OwnedFd,
    family: Family,
    places: Places,
) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    // Until a request names another, a shared socket's connection is its
    // first service's.
    let service = Arc::clone(site.front());
    let mut record = Record::open(id, service.name.as_str().into(), Arc::clone(&shared.stats));
    let peer = match Peer::of(&socket, family) {
        Ok(p) => p,
        // The client reset while it waited in the backlog.
        Err(e) => {
            tracing::debug!(conn = id, service = %service.name, "left before it was served: {}", e.desc());
            let why = format!("it reset while waiting to be accepted ({})", e.desc());
            shared
                .context
                .admissions
                .left_unserved(&service, &"unknown", why);
            return record.refused();
        }
    };
    record.peer(&peer);
    tracing::debug!(conn = id, service = %service.name, peer = %peer, "accepted");
    let handler = Handler {
        site,
        socket,
        peer,
        record,
        places,
        context: Arc::clone(&shared.context),
    };
    let connection = handler.run();
    // On the heap while it lives, for each of a thousand idle streams (3.4
    // KiB today): a future passed by value down async calls is stored once
    // per level, an async fn's by-value arguments twice, and a step that
    // is not boxed takes room in every connection for its whole life.
    let size = std::mem::size_of_val(&connection);
    debug_assert!(size <= 4 << 10, "a connection's future: {size} B");
    tokio::spawn(connection);
}

/// Takes a place in the service's limit and in the daemon's, waiting while
/// either is full. While it waits the listener is not accepted from, so new
/// clients queue in the kernel's backlog.
///
/// `at_limit` is the listener's episode: it is logged when it starts, and
/// ends (logged too, with how often the limit was met) only once places have
/// been free for [`QUIET`], so a busy service that keeps meeting its limit
/// logs twice, not once per client or per wave of them.
async fn take_places(
    shared: &Shared,
    site: &Site,
    label: &str,
    at_limit: &mut Option<Counted>,
) -> Places {
    let service = site.front();
    let service_gate = shared.gate(service);
    // A client with a handshake to do takes a place in the handshake
    // budget; the service's place comes after (see `ServicePlace`). On a
    // shared socket, that of the service its request names.
    let handshaking = service.has_handshake();
    let gate = if handshaking {
        shared.handshakes(site)
    } else {
        Arc::clone(&service_gate)
    };
    let place = |p| match handshaking {
        true => ServicePlace::Handshaking {
            budget: p,
            gate: Arc::clone(&service_gate),
        },
        false => ServicePlace::Held(p),
    };
    let now = Instant::now();
    if let Some(mine) = gate.try_acquire() {
        if let Some(all) = shared.global.try_acquire() {
            if let Some(episode) = at_limit.take_if(|e| e.is_over(now, QUIET)) {
                tracing::info!(
                    service = %service.name, listener = %label,
                    "below the limit for {} s; accepting (the limit was met {} time(s) over {:.1} s)",
                    QUIET.as_secs(), episode.count(), episode.span().as_secs_f64()
                );
            }
            return Places {
                service: place(mine),
                daemon: all,
            };
        }
    }
    if at_limit.get_or_insert_with(|| Counted::new(now)).add(now) {
        let (which, max) = if handshaking && gate.active() >= gate.max() {
            ("the socket's handshakes at once", gate.max())
        } else if !handshaking && gate.active() >= service.max_connections {
            ("the service's max_connections", service.max_connections)
        } else {
            (
                "the global max_connections",
                shared.config().max_connections,
            )
        };
        tracing::warn!(service = %service.name, listener = %label, max, "at {which} ({max}); not accepting until a connection ends");
    }
    Places {
        service: place(gate.acquire().await),
        daemon: shared.global.acquire().await,
    }
}

/// SIGHUP: load the file again; if it is valid and every socket still has a
/// service, new connections use it. Running connections keep the one they started with.
fn reload_config(
    shared: &Shared,
    path: Option<&std::path::Path>,
    routes: &[Route],
    level: &log::Level,
) {
    notify::reloading();
    let loaded = match path {
        Some(p) => config::load(p).map_err(|e| e.to_string()),
        None => Err(
            "running on the built-in configuration; there is no file to reload (use --config)"
                .into(),
        ),
    }
    .and_then(|c| {
        same_cgroups(&shared.config().cgroups, &c.cgroups)?;
        if let Some(tree) = &shared.context.cgroups {
            tree.enable(&c.controllers()).map_err(|e| e.to_string())?;
        }
        listen::check_routes(&c, routes.iter().map(|r| (&r.key, r.label.as_str())))?;
        Ok(c)
    });
    let outcome = match loaded {
        Ok(new) => {
            shared.global.set_max(new.max_connections);
            for s in &new.services {
                shared.gate(s).set_max(s.max_connections);
            }
            for r in routes {
                if let Some(site) = listen::route(&new, &r.key) {
                    shared.handshakes(&site).set_max(site_budget(&site));
                }
            }
            level.set(&new.log_level);
            if let Some(tree) = &shared.context.cgroups {
                tree.retire_ready();
            }
            shared.context.shared.reload(&new.services);
            tracing::info!(config = %new.origin, services = new.services.len(), "configuration reloaded; new connections use it");
            *shared.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
            *shared
                .reload_error
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = None;
            Ok(())
        }
        Err(e) => {
            tracing::error!("reload failed; the previous configuration stays in use: {e}");
            *shared
                .reload_error
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
            Err(e)
        }
    };
    shared.reloads.publish(&outcome);
    notify::ready(&shared.status());
}

/// The subtree is chosen at start: a reload cannot move the daemon to another.
fn same_cgroups(running: &Offer, new: &Offer) -> Result<(), String> {
    let root = |o: &Offer| match o {
        Offer::Delegated { root, .. } => Some(root.clone()),
        Offer::None(_) => None,
    };
    if root(running) == root(new) {
        return Ok(());
    }
    Err(format!(
        "delegated_cgroup: the cgroup subtree changes only with a restart (in use: {}; the file now gives: {})",
        root(running).map_or("none".into(), |p| p.display().to_string()),
        root(new).map_or("none".into(), |p| p.display().to_string())
    ))
}

/// STATUS= once a second while the figures change, and WATCHDOG=1 at half
/// the interval systemd asked for, both from the event loop itself: if the
/// loop stalls, the watchdog stops and systemd restarts the daemon.
async fn report(shared: Arc<Shared>) {
    let mut status_tick = tokio::time::interval(Duration::from_secs(1));
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let watchdog = notify::watchdog_interval();
    let mut watchdog_tick =
        tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |d| d / 2));
    let mut last = String::new();
    loop {
        tokio::select! {
            _ = status_tick.tick() => {
                shared.context.admissions.sweep();
                let now = shared.status();
                if now != last {
                    notify::status(&now);
                    last = now;
                }
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => notify::watchdog(),
        }
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for the next signal that matters.
    async fn next(&mut self) -> Sig {
        tokio::select! {
            _ = self.term.recv() => Sig::Stop,
            _ = self.int.recv() => Sig::Stop,
            _ = self.hup.recv() => Sig::Reload,
        }
    }
}

enum Sig {
    Stop,
    Reload,
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
