//! The pipeline's steps, each a call into the module that owns it: the
//! socket registered, admission, TLS, routing, the protocol's opening, the
//! banner, the spawn (or joining a shared command). Each step ends the
//! connection early (`Err`) or hands the next what it needs.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::sys::socket::{setsockopt, sockopt};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::access::SourceGuard;
use crate::client::opening::{self, Opened, Unopened};
use crate::client::route::{self, Read, Routed, Routing};
use crate::client::{Opening, Transport};
use crate::command::{Command, SpawnError, Streams, Tag};
use crate::config::sites::Site;
use crate::config::{Messages, Service, Transfer};
use crate::end::End;
use crate::fdio;
use crate::http;
use crate::peer::Peer;
use crate::places::ServicePlace;
use crate::record::Record;
use crate::shared::Watcher;
use crate::supervise::{Bounds, Idle};
use crate::tls::{self, HandOff, Layer};
use crate::websocket;

use super::{Context, Early};

/// One connection's service and the daemon's context: what each step needs.
pub(super) struct Conn<'a> {
    pub(super) service: &'a Arc<Service>,
    pub(super) context: &'a Context,
}

impl Conn<'_> {
    /// The socket joins the event loop.
    pub(super) fn register(&self, socket: OwnedFd, peer: &Peer) -> Result<AsyncFd<OwnedFd>, Early> {
        if let Peer::Tcp { .. } = peer {
            // Each write is sent at once: a short line must not wait for Nagle.
            let _ = setsockopt(&socket, sockopt::TcpNoDelay, &true);
        }
        fdio::register(socket, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| Early::Ended(End::Error(unregistered(&e))))
    }

    /// Admission: the PROXY header, the rules, the limits (on a shared
    /// socket, the header alone: the rules are those of the service the
    /// request names). Returns the peer to use and the client's place in
    /// `max_per_source`, held until the connection ends.
    pub(super) async fn admit(
        &self,
        socket: &AsyncFd<OwnedFd>,
        peer: Peer,
        shared: bool,
    ) -> Result<(Peer, Option<SourceGuard>), Early> {
        let admissions = &self.context.admissions;
        if shared {
            let proxied = admissions.proxied(self.service, socket, peer).await;
            return proxied.map(|peer| (peer, None)).map_err(|_| Early::Refused);
        }
        admissions
            .admit(self.service, socket, peer)
            .await
            .map(|(peer, source)| (peer, Some(source)))
            .map_err(|_| Early::Refused)
    }

    /// On a socket several services share, the request names the service
    /// (`client::route`); on any other, the socket's one service.
    pub(super) async fn route(
        &self,
        site: &Site,
        transport: &Transport,
        bounds: &Bounds,
        peer: &Peer,
        record: &mut Record,
        place: &mut ServicePlace,
    ) -> Result<Routed, Early> {
        if !site.is_shared() {
            return Ok(Routed::alone(site.front()));
        }
        let routing = Routing {
            admissions: &self.context.admissions,
            gates: &self.context.gates,
        };
        let limit = bounds.within(self.service.handshake_timeout);
        let routed = route::route(site, routing, (transport, limit), peer, record, place);
        // Boxed: a connection of a socket of its own needs no room for it.
        Box::pin(routed).await.map_err(|unopened| match unopened {
            Unopened::Refused => Early::Refused,
            Unopened::Ended(end) => Early::Ended(end),
        })
    }

    /// An HTTP client whose service is at its `max_connections`: 503, and
    /// counted as a refusal.
    pub(super) fn busy(&self, transport: &Transport, peer: &Peer, max: usize) {
        http::fail_busy(transport.plain(), max);
        let admissions = &self.context.admissions;
        admissions.refused_busy(self.service, peer, max);
    }

    /// The connection's bounds in time, from its acceptance.
    pub(super) fn bounds(&self, record: &Record) -> Bounds {
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
    pub(super) async fn secure(
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
        // Boxed, as the steps in `exchange` are, and only where there is a
        // handshake: a plain connection allocates nothing for it.
        let accepted = Box::pin(tls::accept(&socket, tls, limit));
        let accepted = accepted.await.map_err(|refused| {
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
                let layer = Layer::new(*conn, Arc::clone(record.traffic()), direct);
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
    pub(super) async fn open(
        &self,
        transport: &Transport,
        bounds: &Bounds,
        read: Option<Read>,
        peer: &Peer,
        record: &mut Record,
    ) -> Result<Opened<'_>, Early> {
        let limit = bounds.within(self.service.handshake_timeout);
        let admissions = &self.context.admissions;
        let on = (transport, limit);
        let opening = opening::open(self.service, admissions, on, read, peer, record);
        // Boxed: a raw connection's future needs no room for the request.
        Box::pin(opening).await.map_err(|unopened| match unopened {
            Unopened::Refused => Early::Refused,
            Unopened::Ended(end) => Early::Ended(end),
        })
    }

    /// The service's banner, bounded like the rest of the connection.
    pub(super) async fn banner(
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
        Box::pin(bounds.watch(send, Idle::Traffic(traffic)))
            .await
            .map_err(Early::Ended)
    }

    /// Starts the command, with the socket, pipes or a socket pair as its
    /// stdin and stdout. A WebSocket client whose command cannot start is
    /// told so with a close frame.
    pub(super) async fn spawn(
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
    pub(super) async fn join(
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
