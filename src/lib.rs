//! splice-relay: a socket-activated daemon that runs a command for each
//! connection and moves the command's output to the client, with splice(2)
//! or through a buffer, from one event loop.
//!
//! # Layout
//!
//! Start-up, in `main.rs`: inherited sockets → config → logging → listeners →
//! READY=1 → serve. Then each connection is a pipeline (`connection`):
//! admit → secure (TLS) → open (an HTTP request or a WebSocket upgrade) →
//! banner → spawn →
//! supervise the transfer → end, by one policy → one record.
//!
//! The daemon:
//! - [`config`]: the TOML file: its schema, defaults, checks and error positions.
//! - [`listen`]: sockets adopted from systemd or bound from the config.
//! - [`server`]: accept loops, reload, status, watchdog, stop.
//! - [`places`]: connection places (`max_connections`), which the accept loops wait for.
//! - [`notify`]: sd_notify messages to systemd.
//! - [`reload`]: how `systemctl reload` waits until a file is applied.
//! - [`shutdown`]: the phases of stopping.
//! - [`log`]: journal or stderr logging.
//!
//! One connection:
//! - [`connection`]: the pipeline, from accept to its record.
//! - [`admit`]: whether a client gets a command: PROXY header, access rules,
//!   per-source limits, rates, and refusal episodes in the log.
//! - [`access`]: the rules themselves: address ranges, per-source counts, token buckets.
//! - [`proxy`]: the PROXY protocol v1/v2 header.
//! - [`vet`]: an HTTP or WebSocket request's checks before it is answered:
//!   the client a trusted reverse proxy names (`forwarded_from`), the login.
//! - [`peer`]: who is connected, for the log and the command's environment.
//! - [`tls`]: TLS on the client's connection: certificates and keys, the
//!   handshake, the command's `SSL_*` variables, the kernel's TLS, the layer.
//! - [`http`]: `protocol = "http"`: the request (read within bounds, its
//!   CGI environment, the errors), the response streamed as chunks or
//!   events, the body as the command's stdin; the WebSocket upgrade's
//!   request is read by it too.
//! - [`websocket`]: `protocol = "websocket"`: the upgrade, messages both
//!   ways, pings, the close, and the console page.
//! - [`client`]: the client's side: its transport (socket, kernel TLS, the
//!   TLS layer) and its protocol (raw, WebSocket, HTTP, direct), each with one
//!   `pump` and one `close`.
//! - [`command`]: the command: spawn, standard streams, stderr log, ending, reaping.
//! - [`shared`]: `shared = true`: one command for all of a service's
//!   clients, its output fanned out (`shared/fanout.rs`: tee(2) or a copy),
//!   its life (`shared/hub.rs`); a client joins it where it would spawn.
//! - [`cgroup`]: the connection's cgroup, its resources and what it used.
//! - [`runas`]: the command's user, group, rlimits and nice value.
//! - [`supervise`]: the one loop that runs a transfer beside what may end it first.
//! - [`end`]: why a connection ended, and the one policy for how it ends.
//! - [`relay`]: the loops that move bytes: `relay/splice.rs` (splice(2)) and
//!   `relay/copy.rs` (through a buffer).
//! - [`record`]: the connection's one record, and the daemon's figures.
//! - [`starved`]: out of descriptors, commands wait for a connection to end.
//!
//! Shared by the rest:
//! - [`fdio`]: waiting for readiness, and what each errno means.
//! - [`episode`]: logging a condition once per episode.
//! - `sys`: the only `unsafe` code: the spawn, and a few system calls behind safe functions.

pub mod access;
pub mod admit;
pub mod cgroup;
pub mod client;
pub mod command;
pub mod config;
pub mod connection;
pub mod end;
pub mod episode;
pub mod fdio;
pub mod http;
pub mod listen;
pub mod log;
pub mod notify;
pub mod peer;
pub mod places;
pub mod proxy;
pub mod record;
pub mod relay;
pub mod reload;
pub mod runas;
pub mod server;
pub mod shared;
pub mod shutdown;
pub mod starved;
pub mod supervise;
mod sys;
pub mod tls;
pub mod vet;
pub mod websocket;

pub use sys::{cloexec_from_3, commands_get_nofile};

/// The first thing `main` does: descriptors 0-2 open, SIGCHLD at its default.
pub fn prepare_process() -> std::io::Result<()> {
    fdio::ensure_standard_fds()?;
    sys::default_sigchld()
}

/// Exit codes, as documented in the README and the man page.
pub mod exit {
    /// Stopped by SIGTERM or SIGINT, or `--check` found the config valid.
    pub const OK: u8 = 0;
    /// A listener or the runtime failed; systemd may restart the daemon.
    pub const FAILURE: u8 = 1;
    /// Configuration error (EX_CONFIG): fix the config or the socket units.
    pub const CONFIG: u8 = 78;
}
