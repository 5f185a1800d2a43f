//! The configuration file: its format, its defaults, and every check made on it.
//!
//! Loading is three steps, one submodule each: `raw` reads the TOML with
//! serde (unknown keys, wrong types and bad single values are refused
//! there, each value by its type in `values` or `keywords`), `check`
//! applies the [`defaults`] and the rules between keys, and `locate` gives
//! every error its place in the file, in the form
//! `PATH:LINE:COL: service "NAME": KEY: what is wrong`.

mod check;
pub mod defaults;
#[cfg(test)]
mod fuzz;
mod keywords;
mod locate;
pub mod login;
mod origin;
mod protocol;
mod raw;
pub mod sites;
#[cfg(test)]
mod tests;
mod tls;
mod values;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::de::DeTable;

use crate::access::{Cidr, Rules};
use crate::runas::RunAs;
use locate::Locator;
pub use origin::{split_host_port, Origin};
pub use tls::{certificate_problem, words, ClientAuth, Tls};
pub use values::parse_duration;

/// Where the daemon looks for its configuration without `--config`.
pub const DEFAULT_PATH: &str = "/etc/splice-relay.toml";

/// The example configuration, built in: used when no file is given and
/// [`DEFAULT_PATH`] does not exist, outside socket activation.
pub const EXAMPLE: &str = include_str!("../../config.example.toml");

#[derive(Debug)]
pub struct Config {
    /// The file it came from, or `<built-in>`.
    pub origin: String,
    pub log_level: String,
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
    /// The delegated cgroup v2 subtree, found when the file was loaded, or
    /// why there is none.
    pub cgroups: crate::cgroup::Offer,
    pub services: Vec<std::sync::Arc<Service>>,
}

/// One `[[service]]`: what to run for a connection and how.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub listen: Vec<ListenAddr>,
    /// The systemd socket it serves (`FileDescriptorName=`): `socket_name`,
    /// else its name. Services that give the same one share that socket.
    pub socket_name: String,
    /// The program to execute, resolved to an absolute path at check time.
    pub program: PathBuf,
    /// The command as written; `argv[0]` is passed to the program unchanged.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_directory: PathBuf,
    pub stdin: StdinMode,
    pub transfer: Transfer,
    pub max_connections: usize,
    pub kill_grace: Duration,
    pub pipe_size: usize,
    /// Who may connect, and how many and how often (`allow`, `deny`,
    /// `max_per_source`, `rate`, …).
    pub access: Rules,
    /// The client's address comes from a PROXY protocol header.
    pub proxy_protocol: bool,
    /// Peers allowed to send that header (empty: any).
    pub proxy_from: Vec<Cidr>,
    /// HTTP and WebSocket: reverse proxies whose `Forwarded` or
    /// `X-Forwarded-For` header names the client (empty: none).
    pub forwarded_from: Vec<Cidr>,
    /// HTTP and WebSocket: who may log in (`htpasswd`, `bearer_tokens`).
    pub login: Option<std::sync::Arc<login::Login>>,
    /// Longest life of a connection.
    pub timeout: Option<Duration>,
    /// Longest time without a byte moving either way.
    pub idle_timeout: Option<Duration>,
    /// Most bytes of output sent to one client.
    pub max_bytes: Option<u64>,
    /// Sent to the client before the command's output.
    pub banner: Option<Vec<u8>>,
    /// Sent to a client refused by `max_per_source` or a rate.
    pub busy_message: Option<Vec<u8>>,
    /// User, group, resource limits and nice value of the command.
    pub run_as: RunAs,
    /// A process group, or a cgroup with limits, per connection.
    pub containment: Containment,
    /// What the client speaks: bytes, WebSocket or HTTP.
    pub protocol: Protocol,
    /// TLS on the client's connection, if the service has a certificate.
    pub tls: Option<std::sync::Arc<Tls>>,
    /// Longest time for the TLS handshake, and for the HTTP request (or WebSocket upgrade).
    pub handshake_timeout: Duration,
    /// `shared = true`: one command for all of the service's clients.
    pub shared: Option<SharedCommand>,
    /// `shared = "NAME"`: the shared service whose command this service's
    /// clients watch (its `program` and `argv` are NAME's, for the log).
    pub shared_from: Option<std::sync::Arc<Service>>,
    /// `PATH:LINE:COL: service "NAME"`, for errors found after loading.
    pub position: String,
}

/// A shared service's command: one for all of its clients, its output
/// fanned out to each (see `shared`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedCommand {
    /// When it starts: with the first client, or with the daemon.
    pub start: Start,
    /// How long it runs on after its last client left (None: for ever).
    pub linger: Option<Duration>,
    /// The most output a client may be behind the command, in bytes.
    pub max_lag: u64,
    /// The latest output a new client gets first, in bytes.
    pub replay: u64,
    /// What happens to a client more than `max_lag` behind.
    pub lagging: Lagging,
}

/// When a shared command starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With its first client; it stops `linger` after its last left.
    FirstClient,
    /// With the daemon; restarted after a back-off if it exits.
    Daemon,
}

/// What happens to a client of a shared command that falls `max_lag` behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lagging {
    /// It is disconnected (reason `lagging`): the others and the command go on.
    Drop,
    /// The command waits for it (backpressure): exact delivery to every client.
    Wait,
}

impl Service {
    /// The service whose shared command this service's clients watch: its
    /// own (`shared = true`), another's (`shared = "NAME"`), or none.
    pub fn shared_command(self: &std::sync::Arc<Service>) -> Option<&std::sync::Arc<Service>> {
        match (&self.shared, &self.shared_from) {
            (_, Some(owner)) => Some(owner),
            (Some(_), None) => Some(self),
            (None, None) => None,
        }
    }

    /// Whether a client completes a handshake before its command runs: TLS,
    /// a WebSocket upgrade, a PROXY header.
    pub fn has_handshake(&self) -> bool {
        self.tls.is_some() || self.proxy_protocol || self.protocol != Protocol::Raw
    }
}

/// What a service's clients speak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// A byte stream both ways.
    Raw,
    /// WebSocket (RFC 6455): an HTTP upgrade, then messages.
    WebSocket(WebSocket),
    /// HTTP/1.1 and 1.0: a request, answered with the command's output.
    Http(Http),
}

/// An HTTP service's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http {
    /// The paths answered (empty: any); each also answers below it.
    pub paths: Vec<String>,
    /// The response's `Content-Type` (except for `text/event-stream`).
    pub content_type: String,
    /// How often an event stream gets a keep-alive comment.
    pub ping_interval: Duration,
    /// The largest request body, in bytes (the command's stdin).
    pub max_body_size: u64,
    /// A browser's GET gets a page that watches the output as events.
    pub console: bool,
    /// The command's output starts with a CGI header block.
    pub cgi_headers: bool,
}

/// A WebSocket service's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSocket {
    /// Text (a line a message) or binary (output as it comes).
    pub messages: Messages,
    /// Origins accepted besides the service's own (cross-site requests).
    pub allowed_origins: Vec<Origin>,
    /// The paths answered (empty: any); each also answers below it.
    pub paths: Vec<String>,
    /// How often the client is pinged, and how long it has to answer.
    pub ping_interval: Duration,
    /// The largest message either way, in bytes.
    pub max_message_size: usize,
    /// A plain GET of a path gets a page that connects back.
    pub console: bool,
}

/// How a WebSocket service frames the command's streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Messages {
    /// Each line of output is a text message; each message a line of input.
    Text,
    /// Output goes out as binary messages as it comes; messages go to the
    /// command's stdin as they are, nothing added.
    Binary,
}

/// How a service's commands are contained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Containment {
    /// Each command leads a process group of its own.
    ProcessGroup,
    /// Each connection's command in a cgroup of its own, with these limits.
    Cgroup(crate::cgroup::Resources),
}

impl Config {
    /// The controllers the services' limits need.
    pub fn controllers(&self) -> Vec<&'static str> {
        let mut all: Vec<&'static str> = self
            .services
            .iter()
            .filter_map(|s| match &s.containment {
                Containment::Cgroup(limits) => Some(limits.controllers()),
                Containment::ProcessGroup => None,
            })
            .flatten()
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Whether any service puts its commands in cgroups.
    pub fn uses_cgroups(&self) -> bool {
        self.services
            .iter()
            .any(|s| matches!(s.containment, Containment::Cgroup(_)))
    }
}

/// What the command reads on its standard input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdinMode {
    /// `/dev/null`; whatever the client sends is read and discarded.
    Null,
    /// The client's bytes; the client's half-close closes the command's stdin.
    Client,
}

/// How the command's output reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// splice(2) from a pipe to the socket: no copy through user space.
    Splice,
    /// read(2)/write(2) through a buffer: for comparison, or where splice cannot work.
    Copy,
    /// The command writes to (and, with `stdin = "client"`, reads from) a
    /// socket pair, as inetd gives it a socket; the daemon copies through a
    /// buffer of up to 1 MiB. The fastest relayed path for bulk output.
    Socketpair,
    /// The client's socket is the command's stdin and stdout, as with inetd:
    /// nothing sits between them. The daemon still supervises the connection
    /// (limits, process group, record; bytes from TCP_INFO).
    Direct,
}

/// An address to bind when the daemon is not socket-activated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A configuration error, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `PATH`, `PATH:LINE:COL`, or `PATH:LINE:COL: service "NAME"`.
    pub position: String,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.position)?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Reads and checks the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        position: origin.clone(),
        key: None,
        message: format!("cannot read: {e}"),
    })?;
    load_str(&origin, &text)
}

/// Parses and checks configuration text; `origin` names it in errors.
pub fn load_str(origin: &str, text: &str) -> Result<Config, ConfigError> {
    let root = DeTable::parse(text).map_err(|e| {
        let loc = Locator {
            origin,
            text,
            root: None,
        };
        ConfigError {
            position: loc.position(None, e.span().map(|s| s.start)),
            key: None,
            message: e.message().trim().to_owned(),
        }
    })?;
    let loc = Locator {
        origin,
        text,
        root: Some(root.get_ref()),
    };
    let raw =
        raw::RawConfig::deserialize(toml::de::Deserializer::from(root.clone())).map_err(|e| {
            let offset = e.span().map(|s| s.start);
            let (service, key) = offset.map_or((None, None), |o| loc.find(o));
            ConfigError {
                position: loc.position(service, offset),
                key,
                message: locate::shorten_unknown_field(e.message().trim()),
            }
        })?;
    check::config(raw, &loc)
}
