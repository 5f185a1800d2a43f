//! A request's checks once it is read and before it is answered (HTTP and
//! WebSocket): behind a trusted reverse proxy (`forwarded_from`), the client
//! the proxy names, admitted as any client is; then the service's login
//! (`htpasswd`, `bearer_tokens`). A request turned away gets the status that
//! says why (403, 429, 401 with its challenge) and no command.

use crate::access::{Refusal, SourceGuard};
use crate::admit::Admissions;
use crate::config::Service;
use crate::http::login::{self, Failed, LoggedIn};
use crate::http::request::Request;
use crate::peer::Peer;

/// A request's checks, passed: the client a trusted proxy named, with its
/// place in `max_per_source`, and who logged in.
pub struct Vetted {
    pub forwarded: Option<(Peer, SourceGuard)>,
    pub login: Option<LoggedIn>,
}

/// A request turned away: the status, why, and a header to send with it
/// (a login's challenge, or when to come back).
pub struct Turned {
    pub status: u16,
    pub why: String,
    pub header: Option<(&'static str, String)>,
}

impl Turned {
    fn new(status: u16, why: String) -> Turned {
        Turned {
            status,
            why,
            header: None,
        }
    }
}

/// The checks of `request`, from `peer`. Refusals are counted and logged in
/// episodes, and a wrong login spends a token of `rate_per_source`.
pub async fn vet(
    service: &Service,
    admissions: &Admissions,
    request: &mut Request,
    peer: &Peer,
) -> Result<Vetted, Turned> {
    let mut forwarded = None;
    if let Some(client) = forwarded_client(service, request, peer) {
        match admissions.admit_forwarded(service, &client) {
            Ok(place) => forwarded = Some((client, place)),
            Err(refusal) => {
                let status = if refusal == Refusal::Denied { 403 } else { 429 };
                return Err(Turned::new(status, refusal.to_string()));
            }
        }
    }
    let client = forwarded.as_ref().map_or(peer, |(client, _)| client);
    let Some(logins) = &service.login else {
        return Ok(Vetted {
            forwarded,
            login: None,
        });
    };
    match login::check(logins, request).await {
        Ok(logged_in) => Ok(Vetted {
            forwarded,
            login: Some(logged_in),
        }),
        Err(Failed::Busy) => {
            let why = format!(
                "more logins than CPUs to check them; this one waited {} ms",
                login::HASH_WAIT.as_millis()
            );
            admissions.refused_busy_login(service, client, why.clone());
            let mut turned = Turned::new(503, why);
            turned.header = Some(("Retry-After", "1".into()));
            Err(turned)
        }
        Err(failed) => {
            let why = match failed {
                Failed::Busy | Failed::Missing => "no login".to_string(),
                Failed::Wrong(why) => {
                    admissions.failed_login(service, client);
                    why
                }
            };
            admissions.refused_login(service, client, why.clone());
            let mut turned = Turned::new(401, why);
            let challenge = login::challenge(logins, &service.name);
            turned.header = Some(("WWW-Authenticate", challenge));
            Err(turned)
        }
    }
}

/// Behind a reverse proxy in `forwarded_from`: the client its request names
/// (or the proxy, if it names none), and whether that client came over TLS
/// (then the request is marked so, for `HTTPS`). From any other peer: None,
/// and the headers are only `HTTP_*` variables.
fn forwarded_client(service: &Service, request: &mut Request, peer: &Peer) -> Option<Peer> {
    let Peer::Tcp { remote, local } = peer else {
        return None;
    };
    let trusted = &service.forwarded_from;
    if !trusted.iter().any(|c| c.contains(remote.ip())) {
        return None;
    }
    Some(match request.forwarded(trusted) {
        Some(named) => {
            request.tls |= named.https;
            Peer::Tcp {
                remote: named.client,
                local: *local,
            }
        }
        None => peer.clone(),
    })
}
