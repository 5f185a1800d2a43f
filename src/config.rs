//! The configuration file: its format, its defaults, and every check made on it.
//!
//! Loading is two steps. `parse` turns TOML into raw serde structs (unknown keys
//! and wrong types are refused there); `check` applies the defaults and proves
//! the rest (commands exist and are executable, names are unique, addresses
//! parse). Every error carries the file, line and column it is about, in the form
//! `PATH:LINE:COL: service "NAME": KEY: what is wrong`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::access::{Cidr, Rules};
use crate::runas::{self, Limit, RunAs};

/// Where the daemon looks for its configuration without `--config`.
pub const DEFAULT_PATH: &str = "/etc/splice-relay.toml";

/// The example configuration, built in: used when no file is given and
/// [`DEFAULT_PATH`] does not exist, outside socket activation.
pub const EXAMPLE: &str = include_str!("../config.example.toml");

/// Every default, in one place. `config.example.toml` documents the same values
/// and a test checks that the two agree.
pub mod defaults {
    use std::time::Duration;

    pub const LOG_LEVEL: &str = "info";
    pub const MAX_CONNECTIONS: usize = 1024;
    pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
    pub const SERVICE_MAX_CONNECTIONS: usize = 64;
    pub const KILL_GRACE: Duration = Duration::from_secs(5);
    pub const PIPE_SIZE: usize = 1 << 20;
    pub const WORKING_DIRECTORY: &str = "/";
    pub const IPV6_SOURCE_PREFIX: u8 = 64;
    /// Longest `banner` or `busy_message`.
    pub const MAX_MESSAGE: usize = 64 * 1024;
}

/// The validated configuration the daemon runs on.
#[derive(Debug)]
pub struct Config {
    /// The file it came from, or `<built-in>`.
    pub origin: String,
    pub log_level: String,
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
    pub services: Vec<std::sync::Arc<Service>>,
}

/// One `[[service]]`: what to run for a connection and how.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub listen: Vec<ListenAddr>,
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
    /// `PATH:LINE:COL: service "NAME"`, for errors found after loading.
    pub position: String,
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
    /// The client's socket is the command's stdin and stdout, as with inetd:
    /// nothing sits between them. The daemon still supervises the connection
    /// (limits, process group, record; bytes from TCP_INFO).
    Direct,
}

/// Deserializes a keyword enum with messages that name the choices (serde's
/// derive gives "wanted string or table" for a value of the wrong type).
macro_rules! keywords {
    ($ty:ident { $($word:literal => $variant:ident),+ }) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str(concat!("one of", $(" \"", $word, "\""),+))
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        match v {
                            $($word => Ok($ty::$variant),)+
                            _ => Err(E::custom(format!(
                                concat!("{:?}: expected one of", $(" \"", $word, "\""),+), v
                            ))),
                        }
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

keywords!(StdinMode { "null" => Null, "client" => Client });
keywords!(Transfer { "splice" => Splice, "copy" => Copy, "direct" => Direct });

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

// ---------------------------------------------------------------------------
// Raw form: exactly what serde reads. Options stand for "not given".

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    log_level: Option<String>,
    max_connections: Option<usize>,
    shutdown_timeout: Option<Seconds>,
    #[serde(default)]
    service: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    #[serde(default)]
    listen: OneOrMany,
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    working_directory: Option<PathBuf>,
    stdin: Option<StdinMode>,
    transfer: Option<Transfer>,
    max_connections: Option<usize>,
    kill_grace: Option<Seconds>,
    pipe_size: Option<usize>,
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
    max_per_source: Option<usize>,
    ipv6_source_prefix: Option<u8>,
    rate: Option<f64>,
    rate_per_source: Option<f64>,
    proxy_protocol: Option<bool>,
    proxy_from: Option<Vec<String>>,
    timeout: Option<Seconds>,
    idle_timeout: Option<Seconds>,
    max_bytes: Option<u64>,
    banner: Option<String>,
    busy_message: Option<String>,
    user: Option<String>,
    group: Option<String>,
    rlimit_as: Option<u64>,
    rlimit_nofile: Option<u64>,
    rlimit_nproc: Option<u64>,
    rlimit_cpu: Option<u64>,
    nice: Option<i32>,
}

/// A duration: a number of seconds, or a string such as `"250ms"`, `"5s"`, `"2m"`.
struct Seconds(Duration);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Seconds;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    r#"a duration: seconds as a number, or a string like "250ms", "5s", "2m""#,
                )
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seconds, E> {
                u64::try_from(v)
                    .map(|s| Seconds(Duration::from_secs(s)))
                    .map_err(|_| E::custom("a duration must not be negative"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Seconds, E> {
                Duration::try_from_secs_f64(v).map(Seconds).map_err(|_| {
                    E::custom("a duration must be a finite number of seconds, not negative")
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Seconds, E> {
                parse_duration(v).map(Seconds).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `"250ms"`, `"5s"`, `"1.5s"`, `"2m"`, `"1h"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let Ok(number) = number.parse::<f64>() else {
        return Err(format!(
            r#""{text}": expected a number and a unit, like "5s""#
        ));
    };
    let scale = match unit.trim() {
        "ms" => 0.001,
        "s" | "" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!(r#""{text}": unknown unit; use ms, s, m or h"#)),
    };
    Duration::try_from_secs_f64(number * scale).map_err(|_| format!(r#""{text}": out of range"#))
}

/// `listen = "addr"` or `listen = ["addr", …]`.
#[derive(Default)]
struct OneOrMany(Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address string or an array of them")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------
// Locating errors in the source.

/// Maps byte offsets and `(service, key)` pairs to `PATH:LINE:COL` positions.
struct Locator<'a> {
    origin: &'a str,
    text: &'a str,
    root: Option<&'a DeTable<'a>>,
}

impl<'a> Locator<'a> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }

    fn at(&self, offset: usize) -> String {
        let (line, col) = self.line_col(offset);
        format!("{}:{line}:{col}", self.origin)
    }

    fn services(&self) -> &'a [Spanned<DeValue<'a>>] {
        let services = self.root.and_then(|root| {
            root.iter()
                .find(|(k, _)| k.get_ref() == "service")
                .map(|(_, v)| v.get_ref())
        });
        match services {
            Some(DeValue::Array(a)) => a,
            _ => &[],
        }
    }

    fn service_table(&self, index: usize) -> Option<(&'a DeTable<'a>, Range<usize>)> {
        match self.services().get(index) {
            Some(v) => match v.get_ref() {
                DeValue::Table(t) => Some((t, v.span())),
                _ => None,
            },
            None => None,
        }
    }

    /// `service "NAME"`, or `service #N` when it has no usable name.
    fn service_label(&self, index: usize) -> String {
        let name = self.service_table(index).and_then(|(t, _)| {
            t.iter()
                .find(|(k, _)| k.get_ref() == "name")
                .and_then(|(_, v)| match v.get_ref() {
                    DeValue::String(s) => Some(s.to_string()),
                    _ => None,
                })
        });
        match name {
            Some(n) => format!("service {n:?}"),
            None => format!("service #{}", index + 1),
        }
    }

    /// The span of a key's value (or of the service table when the key is absent).
    fn span_of(&self, service: Option<usize>, key: &str) -> Option<Range<usize>> {
        let (table, fallback) = match service {
            Some(i) => {
                let (t, span) = self.service_table(i)?;
                (t, Some(span))
            }
            None => (self.root?, None),
        };
        table
            .iter()
            .find(|(k, _)| k.get_ref() == key)
            .map(|(_, v)| v.span())
            .or(fallback)
    }

    /// Which service and key a byte offset belongs to.
    fn find(&self, offset: usize) -> (Option<usize>, Option<String>) {
        let contains = |r: &Range<usize>| r.start <= offset && offset < r.end.max(r.start + 1);
        for (i, s) in self.services().iter().enumerate() {
            if let DeValue::Table(t) = s.get_ref() {
                for (k, v) in t.iter() {
                    if contains(&k.span()) || contains(&v.span()) {
                        return (Some(i), Some(k.get_ref().to_string()));
                    }
                }
                if contains(&s.span()) {
                    return (Some(i), None);
                }
            }
        }
        if let Some(root) = self.root {
            for (k, v) in root.iter() {
                if k.get_ref() != "service" && (contains(&k.span()) || contains(&v.span())) {
                    return (None, Some(k.get_ref().to_string()));
                }
            }
        }
        // Spans of `[[service]]` bodies are not always recorded: fall back to
        // the last service whose first key starts before the offset.
        let mut last = None;
        for (i, s) in self.services().iter().enumerate() {
            let start = match s.get_ref() {
                DeValue::Table(t) => t.iter().map(|(k, _)| k.span().start).min(),
                _ => None,
            };
            if start.is_some_and(|st| st <= offset) {
                last = Some(i);
            }
        }
        (last, None)
    }

    fn position(&self, service: Option<usize>, offset: Option<usize>) -> String {
        let mut p = match offset {
            Some(o) => self.at(o),
            None => self.origin.to_owned(),
        };
        if let Some(i) = service {
            p.push_str(": ");
            p.push_str(&self.service_label(i));
        }
        p
    }

    fn error(&self, service: Option<usize>, key: &str, message: impl Into<String>) -> ConfigError {
        let offset = self.span_of(service, key).map(|r| r.start);
        ConfigError {
            position: self.position(service, offset),
            key: Some(key.to_owned()),
            message: message.into(),
        }
    }
}

// ---------------------------------------------------------------------------
// Loading.

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
    let raw = parse(&root).map_err(|e| {
        let offset = e.span().map(|s| s.start);
        let (service, key) = offset.map_or((None, None), |o| loc.find(o));
        ConfigError {
            position: loc.position(service, offset),
            key,
            message: shorten_unknown_field(e.message().trim()),
        }
    })?;
    check(raw, &loc)
}

/// serde lists every key after an unknown one, which for a service is a
/// screenful; say instead which key was probably meant.
fn shorten_unknown_field(message: &str) -> String {
    let Some((head, known)) = message.split_once(", expected one of ") else {
        return message.to_owned();
    };
    let Some(unknown) = head
        .strip_prefix("unknown field `")
        .and_then(|r| r.strip_suffix('`'))
    else {
        return message.to_owned();
    };
    let best = known
        .split(", ")
        .map(|k| k.trim_matches('`'))
        .map(|k| (edit_distance(unknown, k), k))
        .min();
    match best {
        Some((d, k)) if d <= 2 || k.starts_with(unknown) || unknown.starts_with(k) => {
            format!("{head}; did you mean `{k}`?")
        }
        _ => format!("{head}; the keys are listed in splice-relay.toml(5)"),
    }
}

/// Levenshtein distance, for suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1)
                .min(row[j] + 1)
                .min(diag + usize::from(ca != *cb));
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

fn parse(root: &Spanned<DeTable<'_>>) -> Result<RawConfig, toml::de::Error> {
    RawConfig::deserialize(toml::de::Deserializer::from(root.clone()))
}

fn check(raw: RawConfig, loc: &Locator<'_>) -> Result<Config, ConfigError> {
    let log_level = raw
        .log_level
        .unwrap_or_else(|| defaults::LOG_LEVEL.to_owned());
    if let Err(e) = log_level.parse::<tracing_subscriber::EnvFilter>() {
        return Err(loc.error(None, "log_level", format!("{log_level:?}: {e}")));
    }
    let max_connections = raw.max_connections.unwrap_or(defaults::MAX_CONNECTIONS);
    if max_connections == 0 {
        return Err(loc.error(None, "max_connections", "must be at least 1"));
    }
    if raw.service.is_empty() {
        return Err(ConfigError {
            position: loc.origin.to_owned(),
            key: None,
            message: "no [[service]] is defined; at least one is needed".into(),
        });
    }
    let mut names = HashSet::new();
    let mut services = Vec::with_capacity(raw.service.len());
    for (i, s) in raw.service.into_iter().enumerate() {
        let service = check_service(i, s, loc)?;
        if !names.insert(service.name.clone()) {
            return Err(loc.error(
                Some(i),
                "name",
                "duplicate name: another service above has the same one",
            ));
        }
        services.push(std::sync::Arc::new(service));
    }
    Ok(Config {
        origin: loc.origin.to_owned(),
        log_level,
        max_connections,
        shutdown_timeout: raw
            .shutdown_timeout
            .map_or(defaults::SHUTDOWN_TIMEOUT, |s| s.0),
        services,
    })
}

fn check_service(i: usize, s: RawService, loc: &Locator<'_>) -> Result<Service, ConfigError> {
    let err = |key: &str, msg: String| loc.error(Some(i), key, msg);

    if s.name.is_empty() {
        return Err(err("name", "must not be empty".into()));
    }
    if s.name.len() > 255 || s.name.contains(|c: char| c == ':' || c.is_control()) {
        return Err(err(
            "name",
            "must be at most 255 characters with no ':' or control characters \
             (it is matched against systemd's FileDescriptorName=)"
                .into(),
        ));
    }

    let listen = s
        .listen
        .0
        .iter()
        .map(|a| parse_listen(a).map_err(|m| err("listen", m)))
        .collect::<Result<Vec<_>, _>>()?;

    let access = check_access(&s, &err)?;

    let Some(first) = s.command.first() else {
        return Err(err("command", "must not be empty".into()));
    };
    if s.command.iter().any(|a| a.contains('\0')) {
        return Err(err("command", "must not contain NUL bytes".into()));
    }
    let program = resolve_program(first).map_err(|m| err("command", m))?;

    let mut env = Vec::with_capacity(s.env.len());
    for (k, v) in s.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(err(
                "env",
                format!("{k:?}: a variable name must be non-empty without '=' or NUL, and its value without NUL"),
            ));
        }
        env.push((k, v));
    }

    let working_directory = s
        .working_directory
        .unwrap_or_else(|| PathBuf::from(defaults::WORKING_DIRECTORY));
    if !working_directory.is_absolute() {
        return Err(err(
            "working_directory",
            format!("{}: must be an absolute path", working_directory.display()),
        ));
    }
    match std::fs::metadata(&working_directory) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(err(
                "working_directory",
                format!("{}: not a directory", working_directory.display()),
            ))
        }
        Err(e) => {
            return Err(err(
                "working_directory",
                format!("{}: {}", working_directory.display(), crate::os::reason(&e)),
            ))
        }
    }

    let max_connections = s
        .max_connections
        .unwrap_or(defaults::SERVICE_MAX_CONNECTIONS);
    if max_connections == 0 {
        return Err(err("max_connections", "must be at least 1".into()));
    }
    let transfer = s.transfer.unwrap_or(Transfer::Splice);
    if transfer == Transfer::Direct && s.stdin == Some(StdinMode::Null) {
        return Err(err(
            "stdin",
            r#""null" does not apply with transfer = "direct": the client's socket is the command's stdin"#.into(),
        ));
    }
    let pipe_size = s.pipe_size.unwrap_or(defaults::PIPE_SIZE);
    if !(4096..=1 << 30).contains(&pipe_size) {
        return Err(err(
            "pipe_size",
            format!("{pipe_size}: must be between 4096 and 1073741824 bytes"),
        ));
    }

    let positive = |key: &str, d: &Option<Seconds>| match d {
        Some(Seconds(d)) if d.is_zero() => Err(err(key, "must be more than 0".into())),
        Some(Seconds(d)) => Ok(Some(*d)),
        None => Ok(None),
    };
    let timeout = positive("timeout", &s.timeout)?;
    let idle_timeout = positive("idle_timeout", &s.idle_timeout)?;
    if s.max_bytes == Some(0) {
        return Err(err("max_bytes", "must be at least 1".into()));
    }
    if s.max_bytes.is_some() && transfer == Transfer::Direct {
        return Err(err(
            "max_bytes",
            r#"does not apply with transfer = "direct": the output does not pass through the daemon"#.into(),
        ));
    }
    let message = |key: &str, m: Option<String>| match m {
        Some(m) if m.len() > defaults::MAX_MESSAGE => Err(err(
            key,
            format!(
                "{} bytes: must be at most {}",
                m.len(),
                defaults::MAX_MESSAGE
            ),
        )),
        Some(m) if m.is_empty() => Ok(None),
        other => Ok(other.map(String::into_bytes)),
    };
    let banner = message("banner", s.banner)?;
    if let (Some(b), Some(max)) = (&banner, s.max_bytes) {
        if b.len() as u64 >= max {
            return Err(err(
                "banner",
                format!("{} bytes: must be shorter than max_bytes ({max})", b.len()),
            ));
        }
    }
    let busy_message = message("busy_message", s.busy_message)?;
    let proxy_protocol = s.proxy_protocol.unwrap_or(false);
    let proxy_from = s
        .proxy_from
        .iter()
        .flatten()
        .map(|text| text.parse::<Cidr>().map_err(|m| err("proxy_from", m)))
        .collect::<Result<Vec<_>, _>>()?;
    if s.proxy_from.is_some() && !proxy_protocol {
        return Err(err(
            "proxy_from",
            "applies only with proxy_protocol = true".into(),
        ));
    }
    let rlimits: Vec<(Limit, u64)> = [s.rlimit_as, s.rlimit_nofile, s.rlimit_nproc, s.rlimit_cpu]
        .into_iter()
        .zip(Limit::ALL)
        .filter_map(|(v, (limit, _))| v.map(|v| (limit, v)))
        .collect();
    let run_as = runas::resolve(s.user.as_deref(), s.group.as_deref(), &rlimits, s.nice)
        .map_err(|e| err(e.key, e.message))?;

    let (line, col) = loc
        .span_of(Some(i), "name")
        .map_or((0, 0), |r| loc.line_col(r.start));
    Ok(Service {
        position: format!("{}:{line}:{col}: service {:?}", loc.origin, s.name),
        name: s.name,
        listen,
        program,
        argv: s.command,
        env,
        working_directory,
        stdin: match transfer {
            Transfer::Direct => StdinMode::Client,
            _ => s.stdin.unwrap_or(StdinMode::Null),
        },
        transfer,
        max_connections,
        kill_grace: s.kill_grace.map_or(defaults::KILL_GRACE, |d| d.0),
        pipe_size,
        access,
        proxy_protocol,
        proxy_from,
        timeout,
        idle_timeout,
        max_bytes: s.max_bytes,
        banner,
        busy_message,
        run_as,
    })
}

/// `allow`, `deny`, `max_per_source`, `ipv6_source_prefix`, `rate`, `rate_per_source`.
fn check_access(
    s: &RawService,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Rules, ConfigError> {
    let ranges = |key: &str, list: &Option<Vec<String>>| -> Result<Vec<Cidr>, ConfigError> {
        list.iter()
            .flatten()
            .map(|text| text.parse::<Cidr>().map_err(|m| err(key, m)))
            .collect()
    };
    if s.max_per_source == Some(0) {
        return Err(err("max_per_source", "must be at least 1".into()));
    }
    let prefix = s.ipv6_source_prefix.unwrap_or(defaults::IPV6_SOURCE_PREFIX);
    if !(1..=128).contains(&prefix) {
        return Err(err(
            "ipv6_source_prefix",
            format!("{prefix}: must be between 1 and 128"),
        ));
    }
    for (key, rate) in [("rate", s.rate), ("rate_per_source", s.rate_per_source)] {
        if rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            return Err(err(
                key,
                "must be a number of connections per second above 0".into(),
            ));
        }
    }
    Ok(Rules {
        allow: ranges("allow", &s.allow)?,
        deny: ranges("deny", &s.deny)?,
        max_per_source: s.max_per_source,
        source_prefix_v6: prefix,
        rate: s.rate,
        rate_per_source: s.rate_per_source,
    })
}

/// `IP:PORT`, `[IPv6]:PORT`, or an absolute path for a Unix socket.
fn parse_listen(text: &str) -> Result<ListenAddr, String> {
    if text.starts_with('/') {
        return Ok(ListenAddr::Unix(PathBuf::from(text)));
    }
    text.parse::<SocketAddr>()
        .map(ListenAddr::Tcp)
        .map_err(|_| {
            format!("{text:?}: expected IP:PORT, [IPv6]:PORT or an absolute Unix socket path")
        })
}

/// Resolves a command's program the way execvp would, but once, at load time:
/// a name without `/` is looked up in `PATH`; the result must be an executable file.
fn resolve_program(program: &str) -> Result<PathBuf, String> {
    if program.contains('/') {
        let path = PathBuf::from(program);
        if !path.is_absolute() {
            return Err(format!(
                "{program}: must be an absolute path or a name to look up in PATH"
            ));
        }
        return check_executable(&path).map(|()| path);
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&search) {
        let candidate = dir.join(program);
        if check_executable(&candidate).is_ok() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "{program}: not found in PATH ({})",
        search.to_string_lossy()
    ))
}

fn check_executable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("{}: {}", path.display(), crate::os::reason(&e)))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    // access(2) alone is not enough: for root it passes X_OK on any file on
    // some systems; a file with no execute bit at all is never runnable.
    use std::os::unix::fs::PermissionsExt;
    if meta.permissions().mode() & 0o111 == 0
        || nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_err()
    {
        return Err(format!("{}: not executable", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        load_str("t.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn example_config_loads_with_the_documented_defaults() {
        let c = load_str("config.example.toml", EXAMPLE).unwrap();
        assert_eq!(c.log_level, defaults::LOG_LEVEL);
        assert_eq!(c.max_connections, defaults::MAX_CONNECTIONS);
        assert_eq!(c.shutdown_timeout, defaults::SHUTDOWN_TIMEOUT);
        let s = &c.services[0];
        assert_eq!(s.max_connections, defaults::SERVICE_MAX_CONNECTIONS);
        assert_eq!(s.kill_grace, defaults::KILL_GRACE);
        assert_eq!(s.pipe_size, defaults::PIPE_SIZE);
        assert_eq!(s.stdin, StdinMode::Null);
        assert_eq!(s.transfer, Transfer::Splice);
        assert_eq!(
            s.listen,
            vec![ListenAddr::Tcp("127.0.0.1:9009".parse().unwrap())]
        );
        assert_eq!(s.access.source_prefix_v6, defaults::IPV6_SOURCE_PREFIX);
        assert_eq!(s.access.max_per_source, None);
        assert!(!s.proxy_protocol);
        assert!(s.timeout.is_none() && s.idle_timeout.is_none() && s.max_bytes.is_none());
        assert!(s.run_as.is_empty());
    }

    /// Every commented-out example in the file is valid when uncommented
    /// (user and group only as root, who may switch).
    #[test]
    fn example_config_with_every_option_uncommented_loads() {
        let root = nix::unistd::geteuid().is_root();
        let text: String = EXAMPLE
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.split_once(" = ").is_some_and(|(k, _)| {
                        k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }) && (root || !(rest.starts_with("user") || rest.starts_with("group"))) =>
                {
                    rest.to_owned()
                }
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
            // proxy_from applies only with the header on.
            .replace("proxy_protocol = false", "proxy_protocol = true");
        let c = load_str("config.example.toml", &text).unwrap();
        let s = &c.services[0];
        assert_eq!(s.access.allow.len(), 2);
        assert_eq!(s.access.max_per_source, Some(8));
        assert_eq!(s.access.rate, Some(200.0));
        assert_eq!(s.timeout, Some(Duration::from_secs(3600)));
        assert_eq!(s.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(s.max_bytes, Some(1 << 30));
        assert_eq!(s.busy_message.as_deref(), Some(&b"busy\n"[..]));
        assert_eq!(s.run_as.nice, Some(10));
        assert_eq!(s.run_as.rlimits.len(), 4);
        assert_eq!(s.proxy_from.len(), 2);
        if root {
            assert!(s.run_as.credentials.is_some());
        }
    }

    #[test]
    fn control_values_are_checked() {
        let svc = |extra: &str| {
            err(&format!(
                "[[service]]\nname = \"a\"\ncommand = [\"true\"]\n{extra}\n"
            ))
        };
        assert_eq!(
            svc("allow = [\"10.0.0.1/8\"]"),
            r#"t.toml:4:9: service "a": allow: "10.0.0.1/8": host bits set; did you mean "10.0.0.0/8"?"#
        );
        assert_eq!(
            svc("max_per_source = 0"),
            r#"t.toml:4:18: service "a": max_per_source: must be at least 1"#
        );
        assert_eq!(
            svc("rate = -1"),
            r#"t.toml:4:8: service "a": rate: must be a number of connections per second above 0"#
        );
        assert_eq!(
            svc("ipv6_source_prefix = 0"),
            r#"t.toml:4:22: service "a": ipv6_source_prefix: 0: must be between 1 and 128"#
        );
        assert_eq!(
            svc("idle_timeout = 0"),
            r#"t.toml:4:16: service "a": idle_timeout: must be more than 0"#
        );
        assert_eq!(
            svc("max_bytes = 5\ntransfer = \"direct\""),
            r#"t.toml:4:13: service "a": max_bytes: does not apply with transfer = "direct": the output does not pass through the daemon"#
        );
        assert_eq!(
            svc("nice = 42"),
            r#"t.toml:4:8: service "a": nice: 42: must be between -20 and 19"#
        );
        assert_eq!(
            svc("user = \"no-such-user-here\""),
            r#"t.toml:4:8: service "a": user: "no-such-user-here": no such user"#
        );
        assert_eq!(
            svc("max_bytes = 4\nbanner = \"hello\""),
            r#"t.toml:5:10: service "a": banner: 5 bytes: must be shorter than max_bytes (4)"#
        );
        assert_eq!(
            svc("proxy_from = [\"10.0.0.0/8\"]"),
            r#"t.toml:4:14: service "a": proxy_from: applies only with proxy_protocol = true"#
        );
        let long = "x".repeat(defaults::MAX_MESSAGE + 1);
        assert_eq!(
            svc(&format!("banner = \"{long}\"")),
            format!(
                r#"t.toml:4:10: service "a": banner: {} bytes: must be at most 65536"#,
                long.len()
            )
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
        assert_eq!(
            parse_duration("5 parsecs").unwrap_err(),
            r#""5 parsecs": unknown unit; use ms, s, m or h"#
        );
    }

    #[test]
    fn unknown_key_is_located_in_its_service() {
        let e = err("[[service]]\nname = \"a\"\ncommand = [\"/bin/true\"]\ncomand = 1\n");
        assert!(
            e.starts_with("t.toml:4:1: service \"a\": comand: unknown field `comand`"),
            "{e}"
        );
        assert_eq!(
            e,
            "t.toml:4:1: service \"a\": comand: unknown field `comand`; did you mean `command`?"
        );
        let e = err("[[service]]\nname = \"a\"\ncommand = [\"true\"]\nfrobnicate = 1\n");
        assert!(
            e.ends_with("unknown field `frobnicate`; the keys are listed in splice-relay.toml(5)"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_is_located_at_the_value() {
        let e = err("[[service]]\nname = \"a\"\ncommand = \"/bin/true\"\n");
        assert!(
            e.starts_with("t.toml:3:11: service \"a\": command: invalid type"),
            "{e}"
        );
        let e =
            err("shutdown_timeout = \"soon\"\n[[service]]\nname = \"a\"\ncommand = [\"true\"]\n");
        assert!(e.starts_with("t.toml:1:20: shutdown_timeout: "), "{e}");
    }

    #[test]
    fn syntax_error_has_a_position() {
        let e = err("[[service]\n");
        assert!(e.starts_with("t.toml:1:"), "{e}");
    }

    #[test]
    fn missing_command_names_the_service() {
        let e = err("[[service]]\nname = \"a\"\n");
        assert!(e.contains("service \"a\": missing field `command`"), "{e}");
    }

    #[test]
    fn bad_values() {
        assert_eq!(
            err("[[service]]\nname = \"a\"\ncommand = []\n"),
            "t.toml:3:11: service \"a\": command: must not be empty"
        );
        assert_eq!(
            err("[[service]]\nname = \"a\"\ncommand = [\"/nonexistent/x\"]\n"),
            "t.toml:3:11: service \"a\": command: /nonexistent/x: No such file or directory"
        );
        let plain = std::env::temp_dir().join(format!("splice-relay-plain-{}", std::process::id()));
        std::fs::write(&plain, "not a program").unwrap();
        let text = format!(
            "[[service]]\nname = \"a\"\ncommand = [\"{}\"]\n",
            plain.display()
        );
        let e = err(&text);
        std::fs::remove_file(&plain).unwrap();
        assert_eq!(
            e,
            format!(
                "t.toml:3:11: service \"a\": command: {}: not executable",
                plain.display()
            )
        );
        assert_eq!(
            err("[[service]]\nname = \"a\"\ncommand = [\"true\"]\n[[service]]\nname = \"a\"\ncommand = [\"true\"]\n"),
            "t.toml:5:8: service \"a\": name: duplicate name: another service above has the same one"
        );
        assert_eq!(
            err("[[service]]\nname = \"a\"\ncommand = [\"true\"]\nlisten = \"nowhere\"\n"),
            "t.toml:4:10: service \"a\": listen: \"nowhere\": expected IP:PORT, [IPv6]:PORT or an absolute Unix socket path"
        );
        assert_eq!(
            err(""),
            "t.toml: no [[service]] is defined; at least one is needed"
        );
    }

    #[test]
    fn bare_command_names_are_resolved_in_path() {
        let c = load_str("t", "[[service]]\nname = \"a\"\ncommand = [\"true\"]\n").unwrap();
        assert!(c.services[0].program.is_absolute());
        assert_eq!(c.services[0].argv[0], "true");
    }
}

#[cfg(test)]
mod fuzz {
    //! The loader on arbitrary and on damaged input: it never panics, and
    //! every error says where.
    use super::*;
    use proptest::prelude::*;

    /// Errors that are about the file as a whole, not a place in it.
    fn whole_file(e: &ConfigError) -> bool {
        e.message.starts_with("no [[service]] is defined")
    }

    fn located(e: &ConfigError) -> bool {
        let Some(rest) = e.position.strip_prefix("t.toml:") else {
            return false;
        };
        let mut parts = rest.splitn(3, ':');
        let line = parts.next().and_then(|l| l.parse::<usize>().ok());
        let col = parts
            .next()
            .and_then(|c| c.split(':').next())
            .and_then(|c| c.parse::<usize>().ok());
        matches!((line, col), (Some(l), Some(c)) if l >= 1 && c >= 1)
    }

    const KEYS: &[&str] = &[
        "name",
        "listen",
        "command",
        "env",
        "working_directory",
        "stdin",
        "transfer",
        "max_connections",
        "kill_grace",
        "pipe_size",
        "allow",
        "deny",
        "max_per_source",
        "ipv6_source_prefix",
        "rate",
        "rate_per_source",
        "proxy_protocol",
        "timeout",
        "idle_timeout",
        "max_bytes",
        "banner",
        "busy_message",
        "group",
        "rlimit_as",
        "rlimit_nofile",
        "rlimit_nproc",
        "rlimit_cpu",
        "nice",
        "log_level",
        "shutdown_timeout",
        "bogus",
    ];
    const VALUES: &[&str] = &[
        "1",
        "0",
        "-1",
        "1e400",
        "nan",
        "inf",
        "3.5",
        "true",
        "\"\"",
        "\"x\"",
        "\"5s\"",
        "\"10.0.0.0/8\"",
        "[\"10.0.0.1/8\"]",
        "[\"::1\", \"bogus\"]",
        "[]",
        "[\"true\"]",
        "[\"/nonexistent\"]",
        "{}",
        "{ A = \"b\" }",
        "\"direct\"",
        "\"client\"",
        "\"null\"",
        "18446744073709551615",
        "\"250ms\"",
        "\"1h\"",
        "[1, 2]",
        "\"127.0.0.1:0\"",
    ];

    /// A config built from real keys and values in random combinations.
    fn config_text() -> impl Strategy<Value = String> {
        let line = (0..KEYS.len(), 0..VALUES.len())
            .prop_map(|(k, v)| format!("{} = {}\n", KEYS[k], VALUES[v]));
        let service = prop::collection::vec(line, 0..8).prop_map(|lines| {
            format!(
                "[[service]]\nname = \"s\"\ncommand = [\"true\"]\n{}",
                lines.concat()
            )
        });
        prop::collection::vec(service, 0..3).prop_map(|s| s.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_bytes_never_panic_and_errors_are_located(text in "\\PC{0,200}") {
            if let Err(e) = load_str("t.toml", &text) {
                prop_assert!(located(&e) || whole_file(&e), "{e}");
            }
        }

        #[test]
        fn real_keys_with_wrong_values_are_located(text in config_text()) {
            if let Err(e) = load_str("t.toml", &text) {
                prop_assert!(located(&e) || whole_file(&e), "{e}");
                prop_assert!(!e.message.is_empty());
            }
        }

        #[test]
        fn the_example_damaged_anywhere_never_panics(at in 0..EXAMPLE.len(), cut in 0..40usize, junk in "[\\[\\]=\"{}#\n a-z0-9]{0,8}") {
            let mut text = EXAMPLE.to_owned();
            let at = (0..=at).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
            let end = (at + cut).min(text.len());
            let end = (end..=text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
            text.replace_range(at..end, &junk);
            if let Err(e) = load_str("t.toml", &text) {
                prop_assert!(located(&e) || whole_file(&e), "{e}");
            }
        }
    }
}
