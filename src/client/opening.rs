//! The protocol's opening, before any command: a WebSocket service's upgrade
//! or an HTTP service's request is read and checked by its protocol, vetted
//! (`vet`: the client a trusted reverse proxy names, the login), then
//! answered (101, the response to come, HEAD's headers, the console page)
//! or refused with the status that says why. A raw service has none.

use std::time::Duration;

use super::route::Read;
use super::{Opening, Transport};
use crate::access::SourceGuard;
use crate::admit::Admissions;
use crate::config::{Http, Protocol, Service, WebSocket};
use crate::end::End;
use crate::http::{self, NoResponse};
use crate::peer::Peer;
use crate::record::Record;
use crate::vet::{self, Turned, Vetted};
use crate::websocket;

/// What the opening gives the rest: the opening, the request's variables
/// (CGI's, and the login's), and the client a trusted reverse proxy named,
/// with its place in `max_per_source` (boxed: a connection's future keeps
/// it for the connection's life, and most have none).
pub type Opened<'a> = (
    Opening<'a>,
    Vec<(String, String)>,
    Option<Box<(Peer, SourceGuard)>>,
);

/// Why no command runs.
pub enum Unopened {
    /// Refused as admission refuses, in episodes (an invalid request, a
    /// client turned away or gone): no record of its own.
    Refused,
    /// Answered, with a record: the console page, a HEAD.
    Ended(End),
}

/// A request read and checked by its protocol, not yet answered.
enum Asked<'a> {
    WebSocket(&'a WebSocket, websocket::Asked),
    Http(&'a Http, http::Asked),
}

impl Asked<'_> {
    fn request(&mut self) -> &mut http::request::Request {
        match self {
            Asked::WebSocket(_, asked) => &mut asked.request,
            Asked::Http(_, asked) => &mut asked.request,
        }
    }
}

/// The opening of `service`'s protocol on `transport`, within `limit`;
/// `read` is the request if it was read already (to route it).
pub async fn open<'a>(
    service: &'a Service,
    admissions: &Admissions,
    (transport, limit): (&Transport, Duration),
    read: Option<Read>,
    peer: &Peer,
    record: &mut Record,
) -> Result<Opened<'a>, Unopened> {
    let (tls, plain) = (service.tls.is_some(), transport.plain());
    let refused = |why| {
        admissions.refused_handshake(service, peer, why);
        Unopened::Refused
    };
    if service.protocol == Protocol::Raw {
        return Ok((Opening::Raw, Vec::new(), None));
    }
    // On a shared socket the request was read to route it.
    let (request, rest) = match read {
        Some(read) => read,
        None => http::request::read(plain, tls, limit)
            .await
            .map_err(|no| unopened(no.into(), &refused))?,
    };
    let mut asked = match &service.protocol {
        Protocol::WebSocket(ws) => websocket::check(plain, ws, request, rest)
            .await
            .map(|asked| Asked::WebSocket(ws, asked)),
        Protocol::Http(settings) => http::check(plain, settings, request, rest)
            .await
            .map(|asked| Asked::Http(settings, asked)),
        Protocol::Raw => return Ok((Opening::Raw, Vec::new(), None)),
    }
    .map_err(|no| unopened(no, &refused))?;
    let Vetted { forwarded, login } =
        match vet::vet(service, admissions, asked.request(), peer).await {
            Ok(vetted) => vetted,
            Err(Turned {
                status,
                why,
                header,
            }) => {
                let headers: Vec<(&str, &str)> = header
                    .as_ref()
                    .map(|(name, value)| (*name, value.as_str()))
                    .into_iter()
                    .collect();
                let _ = http::request::answer(plain, status, why, &headers).await;
                return Err(Unopened::Refused);
            }
        };
    let mut login_env = Vec::new();
    if let Some(login) = login {
        login_env.push(("AUTH_TYPE".to_string(), login.scheme.to_string()));
        if let Some(user) = login.user {
            record.user(&user);
            login_env.push(("REMOTE_USER".to_string(), user));
        }
    }
    let opened = match asked {
        Asked::WebSocket(ws, asked) => {
            websocket::accept(plain, ws, asked)
                .await
                .map(|mut upgraded| {
                    record.framed();
                    let env = std::mem::take(&mut upgraded.env);
                    (Opening::WebSocket(ws, upgraded), env)
                })
        }
        Asked::Http(settings, asked) => {
            http::accept(plain, settings, asked)
                .await
                .map(|mut opened| {
                    let env = std::mem::take(&mut opened.env);
                    (Opening::Http(settings, opened), env)
                })
        }
    };
    let (opening, env) = opened.map_err(|no| unopened(no, &refused))?;
    Ok((opening, [env, login_env].concat(), forwarded.map(Box::new)))
}

/// What an opening that ends the connection means for it.
fn unopened(no: NoResponse, refused: &dyn Fn(String) -> Unopened) -> Unopened {
    match no {
        NoResponse::Head => Unopened::Ended(End::HeadersOnly),
        NoResponse::Page => Unopened::Ended(End::Page),
        NoResponse::Answered { status, why } => refused(format!("answered {status}: {why}")),
        NoResponse::Gone(why) => refused(why),
    }
}
