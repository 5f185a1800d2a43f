//! One connection, as a pipeline: admit → secure (TLS) → route (on a
//! socket several services share: the request read, and its path naming the
//! service) → open (the protocol's opening: an HTTP request or a WebSocket
//! upgrade, read, vetted and answered) → banner → spawn → supervise the
//! transfer → end, by the one end policy → one record. `pipeline` reads
//! top to bottom in that order; each step (`steps.rs`) is a call into the
//! module that owns it, and none knows which transport or protocol the
//! client has: the [`Client`] does.
//!
//! The [`Record`] is opened by the accept loop and travels with the
//! connection; every early return closes it with its reason, and one that
//! does not is still written when it is dropped.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use crate::admit::Admissions;
use crate::cgroup::Tree;
use crate::client::route::{Read, Routed};
use crate::client::{Client, Opening, Transport};
use crate::command::{Command, Ended, Input, Streams};
use crate::config::sites::Site;
use crate::config::Service;
use crate::end::{End, Ending};
use crate::peer::Peer;
use crate::places::{Gates, Place, ServicePlace};
use crate::record::{Record, Stats};
use crate::shared::Commands;
use crate::shutdown::Watch;
pub use crate::starved::Starved;
use crate::supervise::{supervise, Bounds, Idle};

mod steps;
use steps::Conn;

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
    /// Each service's places in its `max_connections`.
    pub gates: Gates,
}

/// An accepted connection, ready to be served.
pub struct Handler {
    /// The services of the socket it came to.
    pub site: Site,
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
    /// The connection, served to its end. (Taken apart before the async
    /// block, so that its future holds each part once, not the handler and
    /// its parts: it lives as long as the connection.)
    pub fn run(self) -> impl std::future::Future<Output = ()> + Send {
        let Handler {
            site,
            socket,
            peer,
            mut record,
            mut places,
            context,
        } = self;
        async move {
            // The site's first service, until a request names another.
            let mut service = Arc::clone(site.front());
            let at = (&site, &mut service, &*context);
            let served = pipeline(at, socket, peer, &mut record, &mut places.service).await;
            // The connection's descriptors are closed: its place is free.
            drop(places.service);
            context.starved.freed();
            let ended = match served {
                Err(Early::Refused) => {
                    record.refused();
                    None
                }
                Err(Early::Ended(end)) if end.is_departure() => {
                    let peer = record.peer_name();
                    context
                        .admissions
                        .left_unserved(&service, &peer, end.to_string());
                    record.refused();
                    None
                }
                Err(Early::Ended(end)) | Ok((None, end)) => {
                    record.close(None, end);
                    None
                }
                Ok((Some(ended), end)) => {
                    record.close(Some(&ended), end);
                    Some(ended)
                }
            };
            if let Some(ended) = ended {
                // Off the client's path: the record is out, the client gone.
                ended.release_cgroup().await;
            }
            drop(places.daemon);
        }
    }
}

/// Where a connection is: the socket's services, the one it is for (its
/// site's first until a request names another), and the daemon's context.
type At<'a> = (&'a Site, &'a mut Arc<Service>, &'a Context);

/// The pipeline, step by step. Each step either hands the next what it
/// needs or ends the connection (`Err`). Returns how the connection's
/// command ended (None: it watched a shared one) and why it ended.
///
/// (A plain function around an async block: an async fn's arguments taken
/// by value are held twice in its future, and this one lives as long as the
/// connection.)
#[allow(clippy::manual_async_fn)]
fn pipeline<'a>(
    (site, service, context): At<'a>,
    socket: OwnedFd,
    peer: Peer,
    record: &'a mut Record,
    place: &'a mut ServicePlace,
) -> impl std::future::Future<Output = Result<(Option<Ended>, End), Early>> + Send + 'a {
    async move {
        let front = Conn {
            service: site.front(),
            context,
        };
        let socket = front.register(socket, &peer)?;
        let (peer, _source) = front.admit(&socket, peer, site.is_shared()).await?;
        record.peer(&peer);
        let mut bounds = front.bounds(record);
        let (mut transport, tls_env) = front.secure(socket, &peer, &bounds, record).await?;
        let exchanged = match front
            .route(site, &transport, &bounds, &peer, record, place)
            .await
        {
            Ok(Routed {
                service: routed,
                request,
                source: _source,
            }) => {
                let conn = Conn {
                    service: &routed,
                    context,
                };
                bounds = conn.bounds(record);
                let how = (&peer, tls_env, request);
                let exchanged = exchange(&conn, &mut transport, how, &bounds, record, place).await;
                *service = routed;
                exchanged
            }
            Err(early) => Err(early),
        };
        // An answer that ended the exchange early (a page, an HTTP error, a
        // close frame) still gets through the TLS layer; a client that stops
        // taking the rest ends as a bound says.
        let clean = exchanged.as_ref().map_or(true, |(_, _, clean)| *clean);
        let idle = Idle::Traffic(record.traffic());
        let cut = transport.close(clean, &bounds, idle).await;
        exchanged.map(|(ended, end, _)| (ended, cut.unwrap_or(end)))
    }
}

/// Who the client is, the TLS layer's variables, and the request if a
/// shared socket's routing read it.
type How<'a> = (&'a Peer, Vec<(String, String)>, Option<Box<Read>>);

/// The rest of the pipeline, on the client's transport: open → banner →
/// spawn (or join the shared command) → supervise the transfer → end. Also
/// says whether the client's side ended its output in order.
async fn exchange(
    conn: &Conn<'_>,
    transport: &mut Transport,
    (peer, tls_env, read): How<'_>,
    bounds: &Bounds,
    record: &mut Record,
    place: &mut ServicePlace,
) -> Result<(Option<Ended>, End, bool), Early> {
    let (opening, request_env, forwarded) = conn
        .open(transport, bounds, read.map(|r| *r), peer, record)
        .await?;
    // Behind a trusted reverse proxy: the client it names, and that
    // client's place in max_per_source (held until the connection ends).
    let peer = match forwarded.as_deref() {
        Some((client, _place)) => {
            record.peer(client);
            client
        }
        None => peer,
    };
    // The handshakes are done: the connection's place in max_connections;
    // an HTTP client told at once if there is none.
    if let Opening::Http(..) = opening {
        if !place.try_settle() {
            conn.busy(transport, peer, place.max());
            return Err(Early::Refused);
        }
    }
    let settling = async {
        place.settle().await;
        Ok(())
    };
    bounds
        .watch(settling, Idle::Traffic(record.traffic()))
        .await
        .map_err(Early::Ended)?;
    // The steps before the transfer and after it are boxed, each while it
    // runs (the banner and the TLS handshake inside, only where there is
    // one): a connection's future is as large as its largest step, and is
    // held for the connection's whole life, which is mostly the transfer.
    conn.banner(transport, bounds, record).await?;
    if let Some(owner) = conn.service.shared_command() {
        return Box::pin(watch(conn, owner, transport, opening, bounds, record)).await;
    }
    let env = [tls_env, request_env].concat();
    let spawned = Box::pin(conn.spawn(transport, peer, env, &opening, bounds, record));
    let (command, output, input) = streams_of(spawned.await?);
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
    let (ended, clean) = Box::pin(finish(client, command, &end, service.kill_grace)).await;
    // The command has ended: its output may close now without a SIGPIPE.
    drop(output);
    Ok((Some(ended), end, clean))
}

/// The command and its output and input (none with `transfer = "direct"`:
/// the command has the client's socket).
fn streams_of(
    (command, streams): (Command, Option<Streams>),
) -> (Command, Option<AsyncFd<OwnedFd>>, Input) {
    match streams {
        Some(Streams { output, input }) => (command, Some(output), input),
        None => (command, None, Input::Null),
    }
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

#[cfg(test)]
mod tests;
