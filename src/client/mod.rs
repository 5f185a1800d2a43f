//! The client's side of a connection: what carries its bytes (a
//! [`Transport`]: its socket, the kernel's TLS, or TLS in the daemon, which
//! looks like a plaintext socket to the rest), and what it speaks over it (a
//! protocol: raw bytes, WebSocket messages, or an HTTP response; or, with `transfer =
//! "direct"`, whatever the command speaks on the socket itself).
//!
//! Every protocol makes the same two moves, and the pipeline knows no
//! other: [`Client::pump`] moves the bytes until the transfer ends, and
//! [`Client::close`] ends the client's side the way the end policy
//! ([`crate::end::Ending`]) says. A new protocol is one more implementation
//! of these two, whatever transport carries it.
//!
//! - `opening`: the protocol's opening, before any command (an HTTP request,
//!   a WebSocket upgrade): read, vetted and answered;
//! - `transport`: the socket, or the TLS layer's task and its socket pair;
//! - `raw`: raw bytes, moved by the relay's loops;
//! - `direct`: the command has the socket; the daemon watches;
//! - WebSocket sessions are `websocket::Session`, HTTP responses
//!   `http::Session`.

mod direct;
pub mod opening;
mod raw;
pub mod route;
mod transport;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::unix::AsyncFd;

use crate::command::Input;
use crate::config::{Http, Service, Transfer, WebSocket};
use crate::end::{End, Ending, Exit};
use crate::http;
use crate::record::Traffic;
use crate::relay::Mode;
use crate::supervise::Idle;
use crate::websocket::{Session, Upgraded};
use direct::Direct;
use raw::Raw;
pub use transport::Transport;

/// A client, over its transport, in the middle of a transfer.
pub enum Client<'a> {
    Raw(Raw<'a>),
    WebSocket(Box<Session<'a>>),
    Http(Box<http::Session<'a>>),
    Direct(Direct<'a>),
}

/// What the protocol's opening left for the transfer.
pub enum Opening<'a> {
    /// Raw bytes: nothing to open.
    Raw,
    /// A WebSocket upgrade, done.
    WebSocket(&'a WebSocket, Upgraded),
    /// An HTTP request, read and checked.
    Http(&'a Http, http::Opened),
}

impl<'a> Client<'a> {
    /// The client for a command whose output comes from `output` and whose
    /// stdin is `input` (no output: the command has the socket itself).
    pub fn new(
        opening: Opening<'a>,
        transport: &'a Transport,
        (output, input): (Option<&'a AsyncFd<OwnedFd>>, Input),
        service: &'a Service,
        traffic: &'a Arc<Traffic>,
    ) -> Client<'a> {
        let socket = transport.plain();
        let mode = match service.transfer {
            Transfer::Splice => Mode::Splice,
            Transfer::Copy | Transfer::Socketpair | Transfer::Direct => Mode::Copy,
        };
        let Some(output) = output else {
            // The configuration allows "direct" for raw services only.
            return Client::Direct(Direct {
                socket,
                kernel: transport.kernel_socket(),
                traffic,
            });
        };
        match opening {
            Opening::Raw => Client::Raw(Raw {
                socket,
                output,
                input,
                mode,
                chunk: service.pipe_size,
                // The banner counts.
                budget: service
                    .max_bytes
                    .map(|m| m.saturating_sub(traffic.bytes_sent())),
                traffic,
            }),
            Opening::WebSocket(ws, upgraded) => Client::WebSocket(Box::new(Session::new(
                socket,
                ws,
                traffic,
                upgraded.leftover,
                (output, mode == Mode::Splice, input),
                service.max_bytes,
            ))),
            Opening::Http(settings, opened) => Client::Http(Box::new(http::Session::new(
                socket,
                settings,
                traffic,
                opened,
                (output, input),
                service.max_bytes,
            ))),
        }
    }

    /// Moves the bytes until the transfer ends: the output ended, the client
    /// closed or failed, or `max_bytes` of output went.
    pub async fn pump(&mut self) -> End {
        match self {
            Client::Raw(raw) => raw.pump().await,
            Client::WebSocket(session) => session.pump().await,
            Client::Http(session) => session.pump().await,
            Client::Direct(direct) => direct.pump().await,
        }
    }

    /// Ends the client's side after `end`, as `ending` says; `exit` is the
    /// command's, when it has been waited for ([`Client::awaits_exit`]).
    /// True when the protocol ended its output in order (the transport may
    /// then end in order too).
    pub async fn close(self, end: &End, ending: &Ending, exit: Option<&Exit>) -> bool {
        match self {
            Client::Raw(raw) => raw.close(ending).await,
            Client::WebSocket(session) => session.close(end, ending).await,
            Client::Http(session) => session.close(end, ending, exit).await,
            Client::Direct(direct) => direct.close(ending).await,
        }
    }

    /// Whether what the client is told waits for the command's exit: an
    /// HTTP response whose command wrote nothing gets its status from it.
    pub fn awaits_exit(&self) -> bool {
        match self {
            Client::Http(session) => session.awaits_exit(),
            _ => false,
        }
    }

    /// What tells that this client is idle.
    pub fn idle(&self, started: Instant) -> Idle<'a> {
        match self {
            Client::Direct(Direct {
                kernel: Some(socket),
                ..
            }) => Idle::Kernel { socket, started },
            Client::Raw(Raw { traffic, .. }) => Idle::Traffic(traffic),
            Client::Direct(Direct { traffic, .. }) => Idle::Traffic(traffic),
            Client::WebSocket(session) => Idle::Traffic(session.traffic()),
            Client::Http(session) => Idle::Traffic(session.traffic()),
        }
    }
}
