//! One connection, as a pipeline: admit → secure (TLS) → open (the
//! protocol's opening: an HTTP request or a WebSocket upgrade, read, vetted
//! and answered) → banner → spawn → supervise the
//! transfer → end, by the one end policy → one record. `pipeline` reads
//! top to bottom in that order; each step is a call into the module that
//! owns it, and none knows which transport or protocol the client has: the
//! [`Client`] does.
//!
//! The [`Record`] is opened by the accept loop and travels with the
//! connection; every early return closes it with its reason, and one that
//! does not is still written when it is dropped.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::admit::Admissions;
use crate::cgroup::Tree;
use crate::client::opening::{self, Opened, Unopened};
use crate::client::{Client, Opening, Transport};
use crate::command::{Command, Ended, Input, SpawnError, Streams, Tag};
use crate::config::{Messages, Service, Transfer};
use crate::end::{End, Ending};
use crate::fdio;
use crate::http;
use crate::peer::Peer;
use crate::places::{Place, ServicePlace};
use crate::record::{Record, Stats};
use crate::shared::{Commands, Watcher};
use crate::shutdown::Watch;
pub use crate::starved::Starved;
use crate::supervise::{supervise, Bounds, Idle};
use crate::tls::{self, HandOff, Layer};
use crate::websocket;

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
    /// Connections waiting for descriptors to start their command.
    pub starved: Starved,
    /// The running shared commands (`shared = true`).
    pub shared: Arc<Commands>,
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
    pub service: ServicePlace,
    pub daemon: Place,
}

/// How a pipeline that ran no command ended. (One that did returns the
/// command's end and the connection's.) The record is written from either
/// once everything the connection held (descriptors, places, the command)
/// is released, so a client that sees the record can connect again at once.
enum Early {
    /// Admission refused the client: no record of its own.
    Refused,
    /// The connection ended before its command ran, or could not start it.
    Ended(End),
}

impl Handler {
    pub async fn run(self) {
        let Handler {
            service,
            socket,
            peer,
            mut record,
            mut places,
            context,
        } = self;
        let conn = Conn {
            service: &service,
            context: &context,
        };
        let served = pipeline(&conn, socket, peer, &mut record, &mut places.service).await;
        // The connection's descriptors are closed: its place is free.
        drop(places.service);
        context.starved.freed();
        match served {
            Err(Early::Refused) => record.refused(),
            Err(Early::Ended(end)) if end.is_departure() => {
                let peer = record.peer_name();
                context
                    .admissions
                    .left_unserved(&service, &peer, end.to_string());
                record.refused();
            }
            Err(Early::Ended(end)) => record.close(None, end),
            Ok((None, end)) => record.close(None, end),
            Ok((Some(ended), end)) => {
                record.close(Some(&ended), end);
                // Off the client's path: the record is out, the client gone.
                ended.remove_cgroup().await;
            }
        }
        drop(places.daemon);
    }
}

/// The pipeline, step by step. Each step either hands the next what it
/// needs or ends the connection (`Err`). Returns how the connection's
/// command ended (None: it watched a shared one) and why it ended.
async fn pipeline(
    conn: &Conn<'_>,
    socket: OwnedFd,
    peer: Peer,
    record: &mut Record,
    place: &mut ServicePlace,
) -> Result<(Option<Ended>, End), Early> {
    let socket = conn.register(socket, &peer)?;
    let (peer, _source) = conn.admit(&socket, peer).await?;
    record.peer(&peer);
    let bounds = conn.bounds(record);
    let (mut transport, tls_env) = conn.secure(socket, &peer, &bounds, record).await?;
    let exchanged = exchange(
        conn,
        &mut transport,
        (&peer, tls_env),
        &bounds,
        record,
        place,
    )
    .await;
    // An answer that ended the exchange early (a page, an HTTP error, a
    // close frame) still gets through the TLS layer; a client that stops
    // taking the rest ends as a bound says.
    let clean = exchanged.as_ref().map_or(true, |(_, _, clean)| *clean);
    let idle = Idle::Traffic(record.traffic());
    let cut = transport.close(clean, &bounds, idle).await;
    exchanged.map(|(ended, end, _)| (ended, cut.unwrap_or(end)))
}

/// The rest of the pipeline, on the client's transport: open → banner →
/// spawn (or join the shared command) → supervise the transfer → end. Also
/// says whether the client's side ended its output in order.
async fn exchange(
    conn: &Conn<'_>,
    transport: &mut Transport,
    (peer, tls_env): (&Peer, Vec<(String, String)>),
    bounds: &Bounds,
    record: &mut Record,
    place: &mut ServicePlace,
) -> Result<(Option<Ended>, End, bool), Early> {
    let (opening, request_env, forwarded) = conn.open(transport, bounds, peer, record).await?;
    // Behind a trusted reverse proxy: the client it names, and that
    // client's place in max_per_source (held until the connection ends).
    let peer = match &forwarded {
        Some((client, _place)) => {
            record.peer(client);
            client
        }
        None => peer,
    };
    // The handshakes are done: the connection's place in max_connections.
    let settling = async {
        place.settle().await;
        Ok(())
    };
    bounds
        .watch(settling, Idle::Traffic(record.traffic()))
        .await
        .map_err(Early::Ended)?;
    conn.banner(transport, bounds, record).await?;
    if let Some(owner) = conn.service.shared_command() {
        return watch(conn, owner, transport, opening, bounds, record).await;
    }
    let env = [tls_env, request_env].concat();
    let (command, streams) = conn
        .spawn(transport, peer, env, &opening, bounds, record)
        .await?;

    let (output, input) = match streams {
        Some(Streams { output, input }) => (Some(output), input),
        None => (None, Input::Null),
    };
    let (service, traffic) = (conn.service, record.traffic());
    let transport = &*transport;
    let mut client = Client::new(
        opening,
        transport,
        (output.as_ref(), input),
        service,
        traffic,
    );
    let idle = client.idle(record.started());
    let command_side = async {
        match &output {
            Some(output) => {
                command.held(output).await;
                End::OutputHeld
            }
            None => {
                command.exited().await;
                End::CommandExited
            }
        }
    };
    let end = {
        // Pinned here, so that each lives once in the connection's future.
        let (pump, lost) = (pin!(client.pump()), pin!(transport.lost()));
        supervise(bounds, idle, pump, lost, pin!(command_side)).await
    };
    let end = transport.explain(end);
    let (ended, clean) = finish(client, command, &end, service.kill_grace).await;
    // The command has ended: its output may close now without a SIGPIPE.
    drop(output);
    Ok((Some(ended), end, clean))
}

/// A shared service's client: it joins the shared command (or starts it)
/// and reads its output from a pipe of its own, as it would read a
/// command's; its input goes nowhere. The command goes on when the client
/// ends; a client dropped for lagging ends `lagging`.
async fn watch(
    conn: &Conn<'_>,
    owner: &Arc<Service>,
    transport: &mut Transport,
    opening: Opening<'_>,
    bounds: &Bounds,
    record: &mut Record,
) -> Result<(Option<Ended>, End, bool), Early> {
    let watcher = conn.join(owner, transport, &opening, record).await?;
    let (service, traffic) = (conn.service, record.traffic());
    let transport = &*transport;
    let output = Some(&watcher.output);
    let mut client = Client::new(opening, transport, (output, Input::Null), service, traffic);
    let idle = client.idle(record.started());
    let end = {
        let (pump, lost) = (pin!(client.pump()), pin!(transport.lost()));
        supervise(bounds, idle, pump, lost, pin!(watcher.lagged())).await
    };
    // Dropped, its pipe may end before the word of it arrives.
    let end = match end {
        End::OutputEnded if watcher.was_dropped() => End::Lagging,
        end => end,
    };
    let end = transport.explain(end);
    let ending = Ending::after(&end, service.kill_grace);
    let clean = client.close(&end, &ending, None).await;
    Ok((None, end, clean))
}

/// The end policy at work, the same for every transport and protocol: the
/// command and the client's side end together, as [`Ending::after`] says.
/// Returns the command's end once it is reaped, and whether the client's
/// side ended its output in order.
async fn finish(client: Client<'_>, command: Command, end: &End, grace: Duration) -> (Ended, bool) {
    let ending = Ending::after(end, grace);
    if client.awaits_exit() {
        let ended = command.finish(ending.patience).await;
        let clean = client.close(end, &ending, Some(&ended.exit)).await;
        return (ended, clean);
    }
    tokio::join!(
        command.finish(ending.patience),
        client.close(end, &ending, None)
    )
}

/// One connection's service and the daemon's context: what each step needs.
struct Conn<'a> {
    service: &'a Arc<Service>,
    context: &'a Context,
}

impl Conn<'_> {
    /// The socket joins the event loop.
    fn register(&self, socket: OwnedFd, peer: &Peer) -> Result<AsyncFd<OwnedFd>, Early> {
        if let Peer::Tcp { .. } = peer {
            // Each write is sent at once: a short line must not wait for Nagle.
            let _ = setsockopt(&socket, sockopt::TcpNoDelay, &true);
        }
        fdio::register(socket, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| Early::Ended(End::Error(unregistered(&e))))
    }

    /// Admission: the PROXY header, the rules, the limits. Returns the peer
    /// to use and the client's place in `max_per_source`, held until the
    /// connection ends.
    async fn admit(
        &self,
        socket: &AsyncFd<OwnedFd>,
        peer: Peer,
    ) -> Result<(Peer, crate::access::SourceGuard), Early> {
        let admissions = &self.context.admissions;
        admissions
            .admit(self.service, socket, peer)
            .await
            .map_err(|_| Early::Refused)
    }

    /// The connection's bounds in time, from its acceptance.
    fn bounds(&self, record: &Record) -> Bounds {
        let s = self.service;
        Bounds::new(
            s.timeout,
            s.idle_timeout,
            record.started(),
            &self.context.shutdown,
        )
    }

    /// TLS: the handshake, then the kernel's TLS where it takes the session
    /// (the rest runs on the socket as on a plaintext one), else the layer
    /// in the daemon. Returns the transport and what the command learns of
    /// the session (`SSL_*`).
    async fn secure(
        &self,
        socket: AsyncFd<OwnedFd>,
        peer: &Peer,
        bounds: &Bounds,
        record: &mut Record,
    ) -> Result<(Transport, Vec<(String, String)>), Early> {
        let service = self.service;
        let Some(tls) = &service.tls else {
            return Ok((Transport::socket(socket), Vec::new()));
        };
        let limit = bounds.within(service.handshake_timeout);
        let accepted = tls::accept(&socket, tls, limit).await.map_err(|refused| {
            let admissions = &self.context.admissions;
            admissions.refused_tls(service, peer, &refused);
            Early::Refused
        })?;
        let (summary, direct) = (&accepted.summary, service.transfer == Transfer::Direct);
        let transport = match tls::hand_off(socket.get_ref().as_fd(), accepted.conn) {
            HandOff::Kernel => {
                record.tls(format!("{summary} kernel"));
                Transport::socket(socket)
            }
            HandOff::Declined(conn) => {
                record.tls(format!("{summary} userspace"));
                // A command given the layer's pair writes to it itself: the layer counts.
                let layer = Layer::new(*conn, record.shared_traffic(), direct);
                Transport::encrypted(socket, layer, service.kill_grace)
                    .map_err(|e| Early::Ended(End::Error(unregistered(&e))))?
            }
            HandOff::Lost(why) => {
                record.tls(format!("{summary} kernel-refused"));
                return Err(Early::Ended(End::Tls(why)));
            }
        };
        Ok((transport, accepted.env))
    }

    /// The protocol's opening (`client::opening`): an HTTP request or a
    /// WebSocket upgrade read, vetted and answered; nothing for raw.
    async fn open(
        &self,
        transport: &Transport,
        bounds: &Bounds,
        peer: &Peer,
        record: &mut Record,
    ) -> Result<Opened<'_>, Early> {
        let limit = bounds.within(self.service.handshake_timeout);
        let admissions = &self.context.admissions;
        let opening = opening::open(self.service, admissions, transport, limit, peer, record);
        // Boxed: a raw connection's future needs no room for the request.
        Box::pin(opening).await.map_err(|unopened| match unopened {
            Unopened::Refused => Early::Refused,
            Unopened::Ended(end) => Early::Ended(end),
        })
    }

    /// The service's banner, bounded like the rest of the connection.
    async fn banner(
        &self,
        transport: &Transport,
        bounds: &Bounds,
        record: &Record,
    ) -> Result<(), Early> {
        let Some(banner) = &self.service.banner else {
            return Ok(());
        };
        let traffic = record.traffic();
        let send = async {
            fdio::write_all(transport.plain(), banner, |n| traffic.sent(n))
                .await
                .map_err(|e| End::client_error(e, "sending the banner"))
        };
        bounds
            .watch(send, Idle::Traffic(traffic))
            .await
            .map_err(Early::Ended)
    }

    /// Starts the command, with the socket, pipes or a socket pair as its
    /// stdin and stdout. A WebSocket client whose command cannot start is
    /// told so with a close frame.
    async fn spawn(
        &self,
        transport: &mut Transport,
        peer: &Peer,
        request_env: Vec<(String, String)>,
        opening: &Opening<'_>,
        bounds: &Bounds,
        record: &mut Record,
    ) -> Result<(Command, Option<Streams>), Early> {
        let service = self.service;
        let direct = service.transfer == Transfer::Direct;
        if direct {
            transport
                .watch_errors_only()
                .map_err(|e| Early::Ended(End::Error(unregistered(&e))))?;
        }
        let tag = Tag {
            conn: record.conn(),
            service: Arc::clone(record.service()),
        };
        let cgroups = self.context.cgroups.as_ref();
        let socket = transport.plain().get_ref();
        let base_env = &self.context.base_env;
        let spawned = loop {
            let env = request_env.clone();
            let tag = tag.clone();
            match Command::spawn(service, base_env, peer, env, socket, cgroups, tag).await {
                Err(e) if e.out_of_descriptors() => {
                    let starved = &self.context.starved;
                    let wait = async { starved.wait(&self.context.stats).await.ok_or(()) };
                    match bounds
                        .watch(async { Ok(wait.await) }, Idle::Traffic(record.traffic()))
                        .await
                    {
                        Ok(Ok(())) => continue,
                        Ok(Err(())) => break Err(e),
                        Err(end) => return Err(Early::Ended(end)),
                    }
                }
                other => break other,
            }
        };
        match spawned {
            Ok((command, streams)) => {
                record.command_started(command.pid());
                Ok((command, streams))
            }
            Err(e) => {
                unserved(transport, opening);
                Err(Early::Ended(match e {
                    SpawnError::Start(_) => End::SpawnFailed(e.to_string()),
                    SpawnError::Unwatched(_) => End::Error(e.to_string()),
                }))
            }
        }
    }
    /// Joins (or starts) the shared command; a WebSocket or HTTP client it
    /// fails is told so.
    async fn join(
        &self,
        owner: &Arc<Service>,
        transport: &Transport,
        opening: &Opening<'_>,
        record: &mut Record,
    ) -> Result<Watcher, Early> {
        let lines = match opening {
            Opening::WebSocket(ws, _) => ws.messages == Messages::Text,
            Opening::Http(_, opened) => opened.response.events,
            Opening::Raw => false,
        };
        match self.context.shared.join(owner, lines).await {
            Ok(watcher) => {
                let hub = watcher.hub();
                record.watching(hub.instance, hub.pid);
                Ok(watcher)
            }
            Err(e) => {
                unserved(transport, opening);
                Err(Early::Ended(End::SpawnFailed(e.to_string())))
            }
        }
    }
}

/// A client whose command could not start, told so where its protocol can
/// say it: a WebSocket close frame, an HTTP 500.
fn unserved(transport: &Transport, opening: &Opening<'_>) {
    let why = "the command could not be started";
    match opening {
        Opening::WebSocket(..) => websocket::close_unserved(transport.plain(), why),
        Opening::Http(..) => http::fail_unserved(transport.plain(), why),
        Opening::Raw => {}
    }
}

fn unregistered(e: &std::io::Error) -> String {
    let why = fdio::reason(e);
    format!("cannot register the connection with the event loop: {why}")
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;

    use super::*;
    use crate::places::Gate;
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
        let ids = Arc::new(AtomicU64::new(1));
        let shared = Commands::new(Arc::from(Vec::new()), None, watch.clone(), ids);
        let context = Arc::new(Context {
            base_env: Arc::from(Vec::new()),
            shutdown: watch,
            shared: Arc::new(shared),
            admissions: Admissions::default(),
            stats: Arc::clone(&stats),
            cgroups: None,
            starved: Starved::default(),
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
                service: ServicePlace::Held(service_gate.try_acquire().unwrap()),
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
