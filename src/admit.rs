//! Admission: whether an accepted client gets a command at all. It runs first
//! in the connection's task: the PROXY header (when the service expects one)
//! gives the client's real address, then the service's `allow`/`deny`,
//! `max_per_source`, `rate_per_source` and `rate` decide. A refused client is
//! closed before any command runs; a client refused at a limit or a rate first
//! gets the service's `busy_message`, if it has one.
//!
//! Refusals are logged in episodes, not one line per client (a flood would
//! otherwise flood the journal): the first refusal of a kind for a service is
//! logged with its peer, later ones are counted, and when none has come for
//! [`QUIET`] the episode's end is logged with the count.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{shutdown, Shutdown as How};
use tokio::io::unix::AsyncFd;

use crate::access::{Admission, Refusal, Scope, SourceGuard};
use crate::config::{Protocol, Service};
use crate::episode::Counted;
use crate::peer::Peer;
use crate::proxy::{self, Header};

/// How long a client may take to send its PROXY header (or `timeout`, if shorter).
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// A refusal episode ends after this long without a refusal of its kind.
pub const QUIET: Duration = Duration::from_secs(5);

/// The admission state of every service (kept across reloads, by name) and
/// the refusal episodes.
#[derive(Default)]
pub struct Admissions {
    services: Mutex<HashMap<String, Arc<Admission>>>,
    episodes: Mutex<HashMap<(String, &'static str), Counted>>,
}

impl std::fmt::Debug for Admissions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admissions").finish_non_exhaustive()
    }
}

/// Why a client got no command.
pub enum Refused {
    /// A rule of the service (`allow`/`deny`, a limit, a rate).
    Rule(Refusal),
    /// `proxy_protocol = true` and the header was malformed, missing or late.
    ProxyHeader(String),
    /// `proxy_from` is set and the connection does not come from one of them.
    ProxyUntrusted,
    /// A WebSocket service's client sent no valid upgrade (it got the HTTP
    /// answer that says why, or left).
    Handshake(String),
    /// An HTTP or WebSocket service's client offered no login, or a wrong
    /// one (it got 401).
    Login(String),
    /// A TLS service's client did not complete the TLS handshake: the
    /// reason (`tls-timeout`, …) and what happened.
    Tls(&'static str, String),
    /// The client left before its command started (a reset in the backlog,
    /// during admission, a handshake or the banner): what happened.
    Left(String),
    /// An HTTP client whose service was at its `max_connections` (it got
    /// 503).
    Busy(usize),
    /// A login that waited too long for its password to be checked (it got
    /// 503): why.
    LoginBusy(String),
}

/// An HTTP refusal: the status, why, and the headers to send with it.
pub type HttpRefusal = (u16, String, &'static [(&'static str, &'static str)]);

/// The reason of [`Refused::Left`] episodes.
const LEFT: &str = "left-unserved";

impl Refused {
    fn reason(&self) -> &'static str {
        match self {
            Refused::Rule(r) => r.reason(),
            Refused::ProxyHeader(_) => "proxy-header",
            Refused::ProxyUntrusted => "proxy-untrusted",
            Refused::Handshake(_) => "handshake",
            Refused::Login(_) => "login",
            Refused::Tls(reason, _) => reason,
            Refused::Left(_) => LEFT,
            Refused::Busy(_) => "max-connections",
            Refused::LoginBusy(_) => "login-busy",
        }
    }
}

impl Admissions {
    fn of(&self, service: &Service) -> Arc<Admission> {
        let mut map = self.services.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            map.entry(service.name.clone())
                .or_insert_with(Admission::new),
        )
    }

    /// Decides for one client. On success, returns the peer to use (from
    /// the PROXY header, if any) and the client's place in `max_per_source`.
    pub async fn admit(
        &self,
        service: &Service,
        socket: &AsyncFd<OwnedFd>,
        peer: Peer,
    ) -> Result<(Peer, SourceGuard), (Peer, Refused)> {
        let peer = self.proxied(service, socket, peer).await?;
        match self.rules(service, &peer) {
            Ok(guard) => Ok((peer, guard)),
            Err(refusal) => {
                if let Some(answer) = http_refusal(service, refusal) {
                    tell_and_close(socket, &answer);
                } else if refusal != Refusal::Denied {
                    if let Some(message) = &service.busy_message {
                        tell_and_close(socket, message);
                    }
                }
                Err((peer, Refused::Rule(refusal)))
            }
        }
    }

    /// The client's address: from the PROXY header, when the service
    /// expects one (from its `proxy_from` peers only); else the peer's. On a
    /// shared socket this is all of admission that comes before the request
    /// names its service ([`Admissions::admit_routed`] does the rest).
    pub async fn proxied(
        &self,
        service: &Service,
        socket: &AsyncFd<OwnedFd>,
        peer: Peer,
    ) -> Result<Peer, (Peer, Refused)> {
        if !service.proxy_protocol {
            return Ok(peer);
        }
        if let Peer::Tcp { remote, .. } = &peer {
            let ip = remote.ip();
            if !service.proxy_from.is_empty() && !service.proxy_from.iter().any(|c| c.contains(ip))
            {
                let refused = Refused::ProxyUntrusted;
                self.note(service, &peer, &refused);
                return Err((peer, refused));
            }
        }
        let limit = service
            .timeout
            .map_or(PROXY_HEADER_TIMEOUT, |t| t.min(PROXY_HEADER_TIMEOUT));
        match proxy::read_header(socket, limit).await {
            Ok(Header::Proxied {
                source,
                destination,
            }) => Ok(Peer::Tcp {
                remote: source,
                local: destination,
            }),
            Ok(Header::Local) => Ok(peer),
            Err(e) => {
                let refused = Refused::ProxyHeader(e.to_string());
                self.note(service, &peer, &refused);
                Err((peer, refused))
            }
        }
    }

    /// The service's rules (`allow`/`deny`, the limits, the rates) for
    /// `peer`; a refusal is counted and logged.
    fn rules(&self, service: &Service, peer: &Peer) -> Result<SourceGuard, Refusal> {
        let ip: Option<IpAddr> = match peer {
            Peer::Tcp { remote, .. } => Some(remote.ip()),
            Peer::Unix { .. } => None,
        };
        // A trusted reverse proxy's client is decided once its request says
        // who it is (`admit_forwarded`).
        let scope = match ip {
            Some(ip) if service.forwarded_from.iter().any(|c| c.contains(ip)) => Scope::Service,
            _ => Scope::All,
        };
        let admitted = self
            .of(service)
            .admit_in(scope, ip, &service.access, Instant::now());
        admitted.inspect_err(|refusal| self.note(service, peer, &Refused::Rule(*refusal)))
    }

    /// A client of a shared socket whose request named `service`: its rules
    /// applied to it, as admission applies them to the client of a socket
    /// of its own. Returns the client's place in `max_per_source`, or the
    /// HTTP status that refuses it, why, and its headers.
    pub fn admit_routed(&self, service: &Service, peer: &Peer) -> Result<SourceGuard, HttpRefusal> {
        self.rules(service, peer).map_err(|refusal| {
            let (status, headers) = refusal_status(refusal);
            (status, refusal.to_string(), headers)
        })
    }

    /// An HTTP client whose service is at `max_connections` (it was told
    /// 503): counted and logged in episodes.
    pub fn refused_busy(&self, service: &Service, peer: &Peer, max: usize) {
        self.note(service, peer, &Refused::Busy(max));
    }

    /// The client a trusted reverse proxy names in its request (or the
    /// proxy itself, if it names none): `allow`/`deny`, `max_per_source`
    /// and `rate_per_source` applied to it; refusals are counted and logged
    /// as admission's are. Returns the client's place in `max_per_source`.
    pub fn admit_forwarded(
        &self,
        service: &Service,
        client: &Peer,
    ) -> Result<SourceGuard, Refusal> {
        let ip = match client {
            Peer::Tcp { remote, .. } => Some(remote.ip()),
            Peer::Unix { .. } => None,
        };
        let admitted =
            self.of(service)
                .admit_in(Scope::Source, ip, &service.access, Instant::now());
        admitted.inspect_err(|refusal| self.note(service, client, &Refused::Rule(*refusal)))
    }

    /// A client turned away for its login (none, or a wrong one): counted
    /// and logged in episodes, never a line per attempt.
    pub fn refused_login(&self, service: &Service, peer: &Peer, why: String) {
        self.note(service, peer, &Refused::Login(why));
    }

    /// A login whose password could not be checked in time, for the
    /// others being checked: counted and logged in episodes of its own.
    pub fn refused_busy_login(&self, service: &Service, peer: &Peer, why: String) {
        self.note(service, peer, &Refused::LoginBusy(why));
    }

    /// A wrong login spends a token of the client's `rate_per_source`, so
    /// that guessing is slowed as connecting is.
    pub fn failed_login(&self, service: &Service, peer: &Peer) {
        if let Peer::Tcp { remote, .. } = peer {
            self.of(service)
                .spend(remote.ip(), &service.access, Instant::now());
        }
    }

    /// A WebSocket client that got no session: counted and logged as
    /// admission's refusals are, in episodes.
    pub fn refused_handshake(&self, service: &Service, peer: &Peer, why: String) {
        self.note(service, peer, &Refused::Handshake(why));
    }

    /// A TLS client whose handshake failed: counted and logged in episodes,
    /// one kind per reason.
    pub fn refused_tls(
        &self,
        service: &Service,
        peer: &Peer,
        refused: &crate::tls::HandshakeError,
    ) {
        self.note(
            service,
            peer,
            &Refused::Tls(refused.reason(), refused.to_string()),
        );
    }

    /// A client that left before its command started: counted and logged
    /// in episodes, since a flood of connect-and-reset would otherwise
    /// write a record each. `peer`: "unknown" if it left in the backlog.
    pub fn left_unserved(&self, service: &Service, peer: &dyn std::fmt::Display, why: String) {
        self.note(service, peer, &Refused::Left(why));
    }

    /// Counts a refusal; logs it if it starts an episode.
    fn note(&self, service: &Service, peer: &dyn std::fmt::Display, refused: &Refused) {
        let now = Instant::now();
        let reason = refused.reason();
        let detail = match refused {
            Refused::Rule(r) => r.to_string(),
            Refused::ProxyHeader(e)
            | Refused::Handshake(e)
            | Refused::Login(e)
            | Refused::Tls(_, e)
            | Refused::LoginBusy(e)
            | Refused::Left(e) => e.clone(),
            Refused::ProxyUntrusted => {
                "not in proxy_from, so it may not send a PROXY header".into()
            }
            Refused::Busy(max) => format!("at max_connections ({max}); answered 503"),
        };
        let mut episodes = self.episodes.lock().unwrap_or_else(|e| e.into_inner());
        let episode = episodes
            .entry((service.name.clone(), reason))
            .or_insert(Counted::new(now));
        let first = episode.add(now);
        if first && reason == LEFT {
            tracing::info!(
                service = %service.name, peer = %peer, reason,
                "{peer} left before its command started: {detail}; further such clients are counted, and logged when they stop"
            );
        } else if first {
            tracing::warn!(
                service = %service.name, peer = %peer, reason,
                "refused {peer}: {detail}; further refusals of this kind are counted, and logged when they stop"
            );
        } else {
            tracing::debug!(service = %service.name, peer = %peer, reason, "refused {peer}: {detail}");
        }
    }

    /// Ends every episode, quiet or not: at stop.
    pub fn finish(&self) {
        self.sweep_after(Duration::ZERO);
    }

    /// Ends the episodes that have been quiet for [`QUIET`], logging each
    /// with its count. Called once a second.
    pub fn sweep(&self) {
        self.sweep_after(QUIET);
    }

    fn sweep_after(&self, quiet: Duration) {
        let now = Instant::now();
        let mut episodes = self.episodes.lock().unwrap_or_else(|e| e.into_inner());
        episodes.retain(|(service, reason), e| {
            if !e.is_over(now, quiet) {
                return true;
            }
            let seconds = e.span().as_secs_f64();
            if *reason == LEFT {
                tracing::info!(
                    service = %service, reason = *reason, clients = e.count(),
                    "{} client(s) left before their command started, over {seconds:.1} s",
                    e.count()
                );
                return false;
            }
            tracing::info!(
                service = %service, reason = *reason, refused = e.count(),
                "refusals ended: {} client(s) refused ({reason}) over {seconds:.1} s",
                e.count()
            );
            false
        });
    }
}

/// An HTTP or WebSocket client refused before its request is read (its
/// client speaks HTTP first, in plaintext): the HTTP answer that says why,
/// 403 when it is denied, 429 at a limit or a rate (with `busy_message`, if
/// the service has one, as what it says). None for other services, and
/// over TLS, whose clients expect a handshake first.
fn http_refusal(service: &Service, refusal: Refusal) -> Option<Vec<u8>> {
    if service.protocol == Protocol::Raw || service.tls.is_some() {
        return None;
    }
    let busy = service.busy_message.as_deref().map(String::from_utf8_lossy);
    let why = match (refusal, busy) {
        (Refusal::Denied, _) => refusal.to_string(),
        (_, Some(message)) => message.trim_end().to_owned(),
        (_, None) => refusal.to_string(),
    };
    let (status, headers) = refusal_status(refusal);
    Some(crate::http::request::error_response(
        status, &why, headers, false,
    ))
}

/// The HTTP status of a refusal and its headers: 403 when denied, 429 at a
/// limit or a rate (a rate's with `Retry-After`).
fn refusal_status(refusal: Refusal) -> (u16, &'static [(&'static str, &'static str)]) {
    match refusal {
        Refusal::Denied => (403, &[]),
        Refusal::PerSource { .. } => (429, &[]),
        Refusal::Rate | Refusal::RatePerSource => (429, &[("Retry-After", "1")]),
    }
}

/// Best effort, without waiting: the message if the socket takes it now,
/// then our side shut down. Whatever the client sent is read and dropped, so
/// that closing does not answer with a reset that could destroy the message.
fn tell_and_close(socket: &AsyncFd<OwnedFd>, message: &[u8]) {
    let fd = socket.get_ref();
    let _ = nix::unistd::write(fd, message);
    let _ = shutdown(fd.as_raw_fd(), How::Write);
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        match nix::unistd::read(fd, &mut buf) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}
