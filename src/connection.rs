//! One connection, as a pipeline: admit → (TLS) → (upgrade, for WebSocket)
//! → spawn → supervise the transfer → end → one record. `serve` and
//! `Steps::exchange` read top to bottom in that order; each step is a call
//! into the module that owns it.
//!
//! The [`Record`] is opened by the accept loop and travels with the
//! connection; every early return closes it with its reason, and one that
//! does not is still written when it is dropped.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::admit::Admissions;
use crate::cgroup::Tree;
use crate::command::{Command, Ended, Io, SpawnError, Streams, Tag};
use crate::config::{Protocol, Service, Transfer, WebSocket};
use crate::fdio;
use crate::limit::Slot;
use crate::peer::Peer;
use crate::record::{End, Record, Stats, Traffic};
use crate::shutdown::Watch;
use crate::sys;
use crate::tls::{self, Layer};
use crate::transfer::{self, Limits, Relayed};
use crate::websocket::{self, Session, Upgraded};

/// What every connection needs from the daemon, and nothing more.
#[derive(Debug)]
pub struct Context {
    /// The daemon's environment as read at start, without the variables meant
    /// for the daemon alone; the base of every command's environment.
    pub base_env: Arc<[(OsString, OsString)]>,
    pub shutdown: Watch,
    /// Per-service admission state and refusal episodes.
    pub admissions: Admissions,
    pub stats: Arc<Stats>,
    /// The delegated cgroup subtree the daemon lives in, if any.
    pub cgroups: Option<Tree>,
}

/// An accepted connection, ready to be served.
pub struct Handler {
    pub service: Arc<Service>,
    pub socket: OwnedFd,
    pub peer: Peer,
    pub record: Record,
    /// Places in the service's and the daemon's limits, freed when this ends.
    pub places: Places,
    pub context: Arc<Context>,
}

/// A connection's places in `max_connections`. The service's is freed with
/// the connection's descriptors, before the record; the daemon's after it,
/// so that the stop, which waits for every place, waits for every record.
pub struct Places {
    pub service: Slot,
    pub daemon: Slot,
}

/// How the pipeline ended; the record is written from it once everything
/// the connection held (descriptors, places, the command) is released, so a
/// client that sees the record can connect again at once.
enum Served {
    /// Admission refused the client: no record of its own.
    Refused,
    /// The command's end (None if none ran), and why the connection ended.
    Ended(Option<Ended>, End),
}

impl Handler {
    pub async fn run(self) {
        let Handler {
            service,
            socket,
            peer,
            mut record,
            places,
            context,
        } = self;
        match serve(
            &service,
            socket,
            peer,
            &mut record,
            places.service,
            &context,
        )
        .await
        {
            Served::Refused => record.refused(),
            Served::Ended(None, end) => record.close(None, end),
            Served::Ended(Some(ended), end) => {
                record.close(Some(&ended), end);
                // Off the client's path: the record is out, the client gone.
                ended.remove_cgroup().await;
            }
        }
        drop(places.daemon);
    }
}

/// The pipeline: admit → (TLS) → (upgrade) → spawn → supervise the
/// transfer → end.
async fn serve(
    service: &Arc<Service>,
    socket: OwnedFd,
    peer: Peer,
    record: &mut Record,
    _place: Slot,
    context: &Context,
) -> Served {
    if matches!(peer, Peer::Tcp { .. }) {
        // Each splice is sent at once; a short line must not wait for Nagle.
        let _ = setsockopt(&socket, sockopt::TcpNoDelay, &true);
    }
    let socket = match fdio::register(socket, Interest::READABLE | Interest::WRITABLE) {
        Ok(s) => s,
        Err(e) => return Served::Ended(None, End::Error(unregistered(&e))),
    };

    // Admit. Held until the connection ends: the client's place in max_per_source.
    let Ok((peer, _source)) = context.admissions.admit(service, &socket, peer).await else {
        return Served::Refused;
    };
    record.peer(&peer);
    let limits = Limits::new(service, record.started(), &context.shutdown);
    let steps = Steps {
        service,
        peer: &peer,
        limits: &limits,
        context,
    };
    match &service.tls {
        None => {
            steps
                .exchange(Client::Plain(socket), record, Vec::new())
                .await
        }
        Some(tls) => steps.encrypted(tls, socket, record).await,
    }
}

/// What every step after admission needs.
struct Steps<'a> {
    service: &'a Arc<Service>,
    peer: &'a Peer,
    limits: &'a Limits,
    context: &'a Context,
}

/// What the rest of the pipeline talks to.
enum Client {
    /// A socket of plaintext: the client's, or a TLS layer's pair.
    Plain(AsyncFd<OwnedFd>),
    /// The client's socket and its TLS layer, which relays the command's
    /// streams itself.
    Encrypted {
        socket: AsyncFd<OwnedFd>,
        layer: Box<Layer>,
    },
}

impl Steps<'_> {
    /// TLS: the handshake, then the kernel's TLS where it has it (the rest
    /// runs on the socket as on a plaintext one), else the layer between
    /// the client and the rest: a raw relay is the layer's own work; a
    /// WebSocket session, or a command given the socket itself, gets one end
    /// of a socket pair and the layer moves the other.
    async fn encrypted(
        &self,
        tls: &crate::config::Tls,
        socket: AsyncFd<OwnedFd>,
        record: &mut Record,
    ) -> Served {
        let service = self.service;
        let limit = handshake_limit(service, self.limits);
        let accepted = match tls::accept(&socket, tls, limit).await {
            Ok(accepted) => accepted,
            Err(refused) => {
                self.context
                    .admissions
                    .refused_tls(service, self.peer, &refused);
                return Served::Refused;
            }
        };
        // The kernel's TLS where it has it: then the rest runs on the socket.
        let conn = match tls::hand_off(socket.get_ref().as_fd(), accepted.conn) {
            Ok(()) => {
                record.tls(format!("{} kernel", accepted.summary));
                return self
                    .exchange(Client::Plain(socket), record, accepted.env)
                    .await;
            }
            Err(conn) => conn,
        };
        record.tls(format!("{} userspace", accepted.summary));
        let layer = Layer::new(*conn);
        if service.protocol == Protocol::Raw && service.transfer != Transfer::Direct {
            let layer = Box::new(layer);
            return self
                .exchange(Client::Encrypted { socket, layer }, record, accepted.env)
                .await;
        }
        let pair = Layer::pair().and_then(|(ours, theirs)| {
            Ok((
                ours,
                fdio::register(theirs, Interest::READABLE | Interest::WRITABLE)?,
            ))
        });
        let (ours, theirs) = match pair {
            Ok(pair) => pair,
            Err(e) => return Served::Ended(None, End::Error(unregistered(&e))),
        };
        // With direct transfer the command writes to the pair: the layer counts.
        let traffic = record.shared_traffic();
        let counted = (service.transfer == Transfer::Direct).then_some(&*traffic);
        let (served, outcome) = tokio::join!(
            self.exchange(Client::Plain(theirs), record, accepted.env),
            layer.run(&socket, ours, counted, service.kill_grace),
        );
        match (served, outcome) {
            // The layer saw what happened to the client; the rest, a closed pair.
            (Served::Ended(ended, End::ClientGone(_)), tls::Outcome::ClientGone(e)) => {
                Served::Ended(ended, End::gone(e))
            }
            (Served::Ended(ended, end), tls::Outcome::Failed(why)) if !end.is_orderly() => {
                Served::Ended(ended, End::Tls(why))
            }
            (served, _) => served,
        }
    }

    /// The rest of the pipeline: upgrade → spawn → supervise the transfer →
    /// end. `tls_env` is what the command learns of the TLS session.
    async fn exchange(
        &self,
        client: Client,
        record: &mut Record,
        tls_env: Vec<(String, String)>,
    ) -> Served {
        let (service, limits) = (self.service, self.limits);
        let (socket, mut layer) = match client {
            Client::Plain(socket) => (socket, None),
            Client::Encrypted { socket, layer } => (socket, Some(layer)),
        };
        let upgraded = match self.upgrade(&socket).await {
            Ok(upgraded) => upgraded,
            Err(served) => return served,
        };
        if let Some(banner) = &service.banner {
            let traffic = record.traffic();
            if let Err(end) =
                send_banner(&socket, layer.as_deref_mut(), banner, limits, traffic).await
            {
                return Served::Ended(None, end);
            }
        }

        // Spawn.
        let mut request_env = tls_env;
        request_env.extend(upgraded.iter().flat_map(|(_, u)| u.env.iter().cloned()));
        let spawned = spawn(
            service,
            &socket,
            self.peer,
            request_env,
            record,
            self.context,
        )
        .await;
        let (command, streams) = match spawned {
            Ok(spawned) => spawned,
            Err(end) => {
                if upgraded.is_some() {
                    websocket::close_unserved(&socket, "the command could not be started");
                }
                return Served::Ended(None, end);
            }
        };
        record.command_started(command.pid());

        // Supervise the transfer, then end. The command's stdout stays open
        // until it has ended: closed earlier, it would kill the command with
        // SIGPIPE instead.
        let (ended, end) = match (upgraded, layer) {
            (Some((ws, upgraded)), _) => {
                record.framed();
                let conversation = Conversation {
                    socket: &socket,
                    service,
                    ws,
                    limits,
                    traffic: record.traffic(),
                };
                conversation.run(command, streams, upgraded).await
            }
            (None, Some(layer)) => {
                let traffic = record.traffic();
                relay_encrypted(&socket, *layer, command, streams, service, limits, traffic).await
            }
            (None, None) => relay(socket, command, streams, service, limits, record).await,
        };
        Served::Ended(Some(ended), end)
    }

    /// A WebSocket service's upgrade (None for a raw service). A client that
    /// sends no valid upgrade is refused as admission refuses, in episodes;
    /// one that asks for the console page gets it, and its connection a record.
    async fn upgrade(
        &self,
        socket: &AsyncFd<OwnedFd>,
    ) -> Result<Option<(&WebSocket, Upgraded)>, Served> {
        let service = self.service;
        let Protocol::WebSocket(ws) = &service.protocol else {
            return Ok(None);
        };
        let limit = handshake_limit(service, self.limits);
        let refused = |why| {
            self.context
                .admissions
                .refused_handshake(service, self.peer, why);
            Served::Refused
        };
        match websocket::handshake(socket, ws, service.tls.is_some(), limit).await {
            Ok(upgraded) => Ok(Some((ws, upgraded))),
            Err(websocket::Refused::Page) => Err(Served::Ended(None, End::Page)),
            Err(websocket::Refused::Answered { status, why }) => {
                Err(refused(format!("answered {status}: {why}")))
            }
            Err(websocket::Refused::Gone(why)) => Err(refused(why)),
        }
    }
}

/// The longest a handshake may take: `handshake_timeout`, or what is left of
/// `timeout` if that is less.
fn handshake_limit(service: &Service, limits: &Limits) -> Duration {
    limits
        .remaining()
        .map_or(service.handshake_timeout, |left| {
            left.min(service.handshake_timeout)
        })
}

/// The service's banner: through the TLS layer where there is one.
async fn send_banner(
    socket: &AsyncFd<OwnedFd>,
    layer: Option<&mut Layer>,
    banner: &[u8],
    limits: &Limits,
    traffic: &Traffic,
) -> Result<(), End> {
    match layer {
        Some(layer) => {
            layer.queue(banner);
            traffic.sent(banner.len());
            Ok(())
        }
        None => transfer::banner(socket, banner, limits, traffic).await,
    }
}

/// A raw connection's transfer (the relay, or the command on the socket
/// itself), then its end.
async fn relay(
    socket: AsyncFd<OwnedFd>,
    command: Command,
    streams: Streams,
    service: &Service,
    limits: &Limits,
    record: &Record,
) -> (Ended, End) {
    let traffic = record.traffic();
    let relayed = |socket| Relayed {
        socket,
        command: &command,
        service,
        limits,
        traffic,
    };
    let (socket, end, _stdout) = match streams {
        Streams::Pipes { stdout, stdin } => {
            let end = relayed(&socket).pipes(&stdout, stdin).await;
            (socket, end, Some(stdout))
        }
        Streams::Socketpair { pair, stdin } => {
            let end = relayed(&socket).pair(&pair, stdin).await;
            (socket, end, Some(pair))
        }
        Streams::Socket => {
            // The command reads and writes the socket: watch it for errors only.
            let socket = match fdio::register(socket.into_inner(), Interest::ERROR) {
                Ok(s) => s,
                Err(e) => {
                    let ended = command.finish(Duration::ZERO).await;
                    return (ended, End::Error(unregistered(&e)));
                }
            };
            // Behind a TLS layer the socket is the pair: the layer counts.
            let layered = service.tls.is_some().then_some(traffic);
            let end = transfer::direct(&socket, &command, limits, record.started(), layered).await;
            (socket, end, None)
        }
    };
    let direct = service.transfer == Transfer::Direct;
    let ended = end_connection(socket, command, &end, service, direct, traffic).await;
    (ended, end)
}

/// A raw connection over TLS: the layer relays the command's streams, then
/// closes the session beside the command's end.
async fn relay_encrypted(
    socket: &AsyncFd<OwnedFd>,
    mut layer: Layer,
    command: Command,
    streams: Streams,
    service: &Service,
    limits: &Limits,
    traffic: &Traffic,
) -> (Ended, End) {
    let Some((output, stdin)) = streams.relayed() else {
        // Not with TLS: the command gets the layer's pair instead.
        let why = "a TLS relay needs the command's output relayed";
        return (command.finish(Duration::ZERO).await, End::Error(why.into()));
    };
    let relayed = Relayed {
        socket,
        command: &command,
        service,
        limits,
        traffic,
    };
    let end = relayed
        .encrypted(&mut layer, &output, stdin.input(&output))
        .await;
    let grace = service.kill_grace;
    let closing = layer.close(socket, grace);
    let (ended, ()) = tokio::join!(command.finish(patience(&end, grace)), closing);
    (ended, end)
}

/// A WebSocket connection, once upgraded and its command started.
struct Conversation<'a> {
    socket: &'a AsyncFd<OwnedFd>,
    service: &'a Service,
    ws: &'a WebSocket,
    limits: &'a Limits,
    traffic: &'a Traffic,
}

impl Conversation<'_> {
    /// The session over the command's streams; then its close, beside the
    /// command's end (in the order `end_connection` gives a raw one).
    async fn run(self, command: Command, streams: Streams, upgraded: Upgraded) -> (Ended, End) {
        let Some((output, stdin)) = streams.relayed() else {
            // The configuration refuses transfer = "direct" for WebSocket.
            let why = "a WebSocket session needs the command's output relayed";
            return (command.finish(Duration::ZERO).await, End::Error(why.into()));
        };
        let input = stdin.input(&output);
        let grace = self.service.kill_grace;
        let splice = self.service.transfer == Transfer::Splice;
        let mut session = Session::new(
            self.socket,
            self.ws,
            self.traffic,
            upgraded.leftover,
            (&output, splice),
            self.service.max_bytes,
        );
        let end = session.exchange(input, &command, self.limits, grace).await;
        let (ended, ()) = tokio::join!(
            command.finish(patience(&end, grace)),
            session.close(&end, grace)
        );
        (ended, end)
    }
}

/// How long a command gets to exit on its own after `end`: `kill_grace`
/// once its output is complete, none after any other end.
fn patience(end: &End, grace: Duration) -> Duration {
    if end.is_orderly() {
        grace
    } else {
        Duration::ZERO
    }
}

/// Starts the command, with the socket, pipes or a socket pair as its stdin
/// and stdout.
async fn spawn(
    service: &Arc<Service>,
    socket: &AsyncFd<OwnedFd>,
    peer: &Peer,
    request_env: Vec<(String, String)>,
    record: &Record,
    context: &Context,
) -> Result<(Command, Streams), End> {
    let io = match service.transfer {
        Transfer::Direct => {
            // Programs expect blocking stdin and stdout. The flag belongs to
            // the open file description, shared with our copy, which is only polled.
            fdio::set_nonblocking(socket.get_ref(), false)
                .map_err(|e| End::Error(e.desc().into()))?;
            Io::Socket(socket.get_ref())
        }
        Transfer::Splice | Transfer::Copy => Io::Pipes {
            stdin: service.stdin,
            size: service.pipe_size,
        },
        Transfer::Socketpair => Io::Socketpair {
            stdin: service.stdin,
        },
    };
    let tag = Tag {
        conn: record.conn(),
        service: Arc::clone(record.service()),
    };
    let cgroups = context.cgroups.as_ref();
    Command::spawn(
        service,
        &context.base_env,
        peer,
        request_env,
        io,
        cgroups,
        tag,
    )
    .await
    .map_err(|e| match e {
        SpawnError::Start(_) => End::SpawnFailed(e.to_string()),
        SpawnError::Unwatched(_) => End::Error(e.to_string()),
    })
}

fn unregistered(e: &std::io::Error) -> String {
    format!(
        "cannot register the connection with the event loop: {}",
        fdio::reason(e)
    )
}

/// Ends the connection in one order for every transfer: after an orderly end
/// (the output is complete) the socket is shut down for writing, so the
/// client sees end-of-file once everything queued has arrived, and the daemon
/// lingers until the client closes too (at most `kill_grace`); meanwhile the
/// command ends as `command` documents. After any other end the client is
/// closed at once. Returns once the socket is closed and the command reaped.
async fn end_connection(
    socket: AsyncFd<OwnedFd>,
    command: Command,
    end: &End,
    service: &Service,
    direct: bool,
    traffic: &Traffic,
) -> Ended {
    let grace = service.kill_grace;
    let patience = match end {
        End::OutputEnded => grace,
        _ => Duration::ZERO,
    };
    // With direct transfer the command's exit is the end of the output; our
    // copy of the socket is kept to the end for the byte counts.
    let lingering = end.is_orderly() && (!direct || fdio::set_nonblocking(&socket, true).is_ok());
    let socket = (lingering || direct).then_some(socket);
    let linger = async {
        match &socket {
            Some(s) if lingering => {
                fdio::end_output(s.get_ref());
                linger(s, grace, traffic).await
            }
            _ => false,
        }
    };
    let (ended, client_closed) = tokio::join!(command.finish(patience), linger);
    if direct {
        if let Some((acked, received)) = socket
            .as_ref()
            .and_then(|s| sys::tcp_bytes(s.get_ref().as_fd()))
        {
            // Counted last, when the client has acknowledged all it got. After
            // an orderly close both FINs count in the sequence numbers.
            let fin = u64::from(client_closed);
            traffic.counted_by_kernel(acked.saturating_sub(fin), received.saturating_sub(fin));
        }
    }
    ended
}

/// After shutting down our side, reads until the client closes too (for at
/// most `limit`). Closing with unread input would send a reset, which can
/// destroy output still in flight to the client. True when the client closed.
async fn linger(socket: &AsyncFd<OwnedFd>, limit: Duration, traffic: &Traffic) -> bool {
    let read = fdio::discard(socket, |n| traffic.dropped(n as u64));
    matches!(tokio::time::timeout(limit, read).await, Ok(Ok(())))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use super::*;
    use crate::limit::Gate;
    use crate::shutdown::Shutdown;

    /// Log lines, captured for the test that writes them.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A descriptor the event loop refuses (epoll takes no regular file)
    /// still ends in the connection's one record.
    #[tokio::test]
    async fn a_socket_the_event_loop_refuses_still_gets_its_record() {
        let log = Captured::default();
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let config = crate::config::load_str(
            "t.toml",
            "[[service]]\nname = \"s\"\ncommand = [\"true\"]\n",
        )
        .unwrap();
        let service = Arc::clone(&config.services[0]);
        let (_stop, watch) = Shutdown::new();
        let stats = Arc::new(Stats::default());
        let context = Arc::new(Context {
            base_env: Arc::from(Vec::new()),
            shutdown: watch,
            admissions: Admissions::default(),
            stats: Arc::clone(&stats),
            cgroups: None,
        });
        let file = tempfile::tempfile().unwrap();
        let (service_gate, daemon_gate) = (Gate::new(1), Gate::new(1));
        let handler = Handler {
            record: Record::open(7, "s".into(), Arc::clone(&stats)),
            service,
            socket: OwnedFd::from(file),
            peer: Peer::Unix {
                pid: 1,
                uid: 0,
                gid: 0,
            },
            places: Places {
                service: service_gate.try_acquire().unwrap(),
                daemon: daemon_gate.try_acquire().unwrap(),
            },
            context,
        };
        handler.run().await;

        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        let records: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("connection ended"))
            .collect();
        assert_eq!(records.len(), 1, "{text}");
        assert!(
            records[0].contains("reason=\"error\"")
                && records[0].contains("cannot register the connection with the event loop")
                && records[0].contains("conn=7"),
            "{text}"
        );
        assert_eq!(stats.served.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(stats.active.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert_eq!(service_gate.active() + daemon_gate.active(), 0);
    }
}
