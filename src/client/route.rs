//! A shared socket's request to its service. On a socket several services
//! share (`config::sites`), the request is read before anything else, and
//! its path names the service: the one with the longest of its `paths` the
//! path is under. That service's rules (`allow`/`deny`, the per-source limits,
//! the rates) then apply to the client, as they would on a socket of its own,
//! and its `max_connections` is where the connection takes its place. A
//! request for no service's path gets 404.

use std::sync::Arc;
use std::time::Duration;

use super::opening::Unopened;
use super::Transport;
use crate::access::SourceGuard;
use crate::admit::Admissions;
use crate::config::sites::Site;
use crate::config::Service;
use crate::http::request::{self, NoRequest, Request};
use crate::peer::Peer;
use crate::places::{Gates, ServicePlace};
use crate::record::Record;

/// A request read to route it, and what the client sent after its head.
pub type Read = (Request, Vec<u8>);

/// Where a connection goes.
pub struct Routed {
    pub service: Arc<Service>,
    /// The request, read to route it, and what the client sent after its
    /// head; None on a socket of one service, whose opening reads it.
    /// Boxed: it is handed on once, and a connection's future should not
    /// keep room for it while the connection lives.
    pub request: Option<Box<Read>>,
    /// The client's place in its service's `max_per_source`, held until
    /// the connection ends.
    pub source: Option<SourceGuard>,
}

impl Routed {
    /// The connection of a socket of one service: its opening reads the
    /// request, and admission has applied its rules.
    pub fn alone(service: &Arc<Service>) -> Routed {
        Routed {
            service: Arc::clone(service),
            request: None,
            source: None,
        }
    }
}

/// What routing needs from the daemon.
pub struct Routing<'a> {
    pub admissions: &'a Admissions,
    pub gates: &'a Gates,
}

/// The service of the connection from `peer` on `site`'s socket; the
/// request is read within `limit`. The record and the place follow the
/// service it names.
pub async fn route(
    site: &Site,
    routing: Routing<'_>,
    (transport, limit): (&Transport, Duration),
    peer: &Peer,
    record: &mut Record,
    place: &mut ServicePlace,
) -> Result<Routed, Unopened> {
    let front = site.front();
    if !site.is_shared() {
        return Ok(Routed::alone(front));
    }
    let Routing { admissions, gates } = routing;
    let plain = transport.plain();
    let refused = |why: String| {
        admissions.refused_handshake(front, peer, why);
        Unopened::Refused
    };
    let (request, leftover) = match request::read(plain, front.tls.is_some(), limit).await {
        Ok(read) => read,
        Err(NoRequest::Answered { status, why }) => {
            return Err(refused(format!("answered {status}: {why}")))
        }
        Err(NoRequest::Gone(why)) => return Err(refused(why)),
    };
    let Some(service) = site.route(&request.path) else {
        let why = format!("no service of this socket answers {:?}", request.path);
        let _ = request::answer(plain, 404, why.clone(), &[]).await;
        return Err(refused(format!("answered 404: {why}")));
    };
    record.routed(&service.name);
    let source = match admissions.admit_routed(service, peer) {
        Ok(source) => source,
        Err((status, why, headers)) => {
            let _ = request::answer(plain, status, why, headers).await;
            return Err(Unopened::Refused);
        }
    };
    place.reroute(gates.of(&service.name, service.max_connections));
    Ok(Routed {
        service: Arc::clone(service),
        request: Some(Box::new((request, leftover))),
        source: Some(source),
    })
}
