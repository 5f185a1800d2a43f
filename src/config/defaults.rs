//! Every default of the configuration, in one place. `config.example.toml`
//! shows the same values, and a test loads it and compares.

use std::time::Duration;

use super::keywords::{Containment, Protocol};
use super::{Lagging, Messages, Start, StdinMode, Transfer};

pub const LOG_LEVEL: &str = "info";
pub const MAX_CONNECTIONS: usize = 1024;
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

pub const SERVICE_MAX_CONNECTIONS: usize = 64;
pub const WORKING_DIRECTORY: &str = "/";
pub const STDIN: StdinMode = StdinMode::Null;
/// Measured the fastest relayed path for bulk output, at about the CPU of
/// splice (bench/results/latest.md; docs/performance.md).
pub const TRANSFER: Transfer = Transfer::Socketpair;
/// A shared command's output is fanned out by tee(2) and spliced to each
/// client: measured, ahead of a copy per client from 10 clients on, at
/// about a third of its CPU per GiB (docs/performance.md, "Shared commands").
pub const SHARED_TRANSFER: Transfer = Transfer::Splice;
pub const KILL_GRACE: Duration = Duration::from_secs(5);
pub const PIPE_SIZE: usize = 1 << 20;
/// IPv6 clients are counted per network of this many bits (one host's /64).
pub const IPV6_SOURCE_PREFIX: u8 = 64;
pub const PROXY_PROTOCOL: bool = false;

/// A shared command starts with its first client, and a client that falls
/// `max_lag` behind it is dropped.
pub const START: Start = Start::FirstClient;
pub const LAGGING: Lagging = Lagging::Drop;
/// A shared command runs on this long after its last client left.
pub const LINGER: Duration = Duration::from_secs(5);
/// A client of a shared command may be this far behind it (then `lagging`).
pub const MAX_LAG: u64 = 1 << 20;
/// A new client of a shared command gets no earlier output.
pub const REPLAY: u64 = 0;

/// Without `max_per_source`, one address may hold half of a service's
/// places (at least one), so that one host cannot take the service. Not for
/// loopback clients, which are this host's own (a local reverse proxy
/// without the PROXY header shows every client as 127.0.0.1), nor Unix
/// socket clients, which have no address.
pub fn max_per_source(max_connections: usize) -> usize {
    max_connections.div_ceil(2)
}
/// A cgroup per connection where the daemon has a delegated subtree.
pub const CONTAINMENT: Containment = Containment::Auto;

/// Bounds, not defaults: the longest `banner` or `busy_message`, and the
/// range of `pipe_size`.
pub const MAX_MESSAGE: usize = 64 * 1024;
pub const PIPE_SIZE_RANGE: std::ops::RangeInclusive<usize> = 4096..=1 << 30;

/// WebSocket services (`protocol = "websocket"`).
pub const PROTOCOL: Protocol = Protocol::Raw;
pub const MESSAGES: Messages = Messages::Text;
pub const PING_INTERVAL: Duration = Duration::from_secs(30);
pub const MAX_MESSAGE_SIZE: usize = 1 << 20;
pub const CONSOLE: bool = false;
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP services (`protocol = "http"`).
pub const CONTENT_TYPE: &str = "text/plain; charset=utf-8";
pub const MAX_BODY_SIZE: u64 = 1 << 20;
