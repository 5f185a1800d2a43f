//! The daemon's log lines on stderr (tracing's fmt format:
//! `TIMESTAMP LEVEL message key=value …`), and the one a connection ends
//! with, parsed into a typed [`Record`].

use std::fmt;
use std::net::SocketAddr;

/// What a record's message starts with (src/record.rs, `Record::write`).
const RECORD: &str = "connection ended: ";

/// A record's fields, in the order the daemon writes them: whether each is
/// quoted (strings are; numbers and the peer are not), and whether it is
/// always there (the others are left out when not known).
const FIELDS: [(&str, bool, bool); 18] = [
    ("conn", false, true),
    ("service", true, true),
    ("peer", false, true),
    ("pid", false, true),
    ("bytes", false, true),
    ("bytes_received", false, true),
    ("duration_ms", false, true),
    ("exit", true, false),
    ("reason", true, true),
    ("cpu_usec", false, false),
    ("memory_peak", false, false),
    ("tasks_peak", false, false),
    ("oom_kills", false, false),
    ("messages_sent", false, false),
    ("messages_received", false, false),
    ("tls", true, false),
    ("instance", false, false),
    ("user", true, false),
];

/// The record the daemon logs when a connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// INFO, WARN (an error on the way) or ERROR (the command never started).
    pub level: String,
    /// What follows "connection ended: " up to the fields, detail included.
    pub message: String,
    pub conn: u64,
    pub service: String,
    pub peer: String,
    /// The command's pid (its process group's id); 0 if it never started.
    pub pid: i32,
    pub bytes: u64,
    pub bytes_received: u64,
    pub duration_ms: u64,
    /// "0", another exit code, a signal name ("SIGTERM"), or "none" when no
    /// command ran (the field is then left out).
    pub exit: String,
    pub reason: String,
    /// What the command used (None: left out, not known here).
    pub cpu_usec: Option<u64>,
    pub memory_peak: Option<u64>,
    pub tasks_peak: Option<u64>,
    pub oom_kills: Option<u64>,
    /// WebSocket messages either way (None: left out, a raw connection).
    pub messages_sent: Option<u64>,
    pub messages_received: Option<u64>,
    /// The TLS version, cipher and who encrypts; "none" (left out) without TLS.
    pub tls: String,
    /// The shared command's instance the client watched (None: its own command).
    pub instance: Option<u64>,
    /// Who logged in; "none" (left out) without a login.
    pub user: String,
    /// The whole line, for messages.
    pub line: String,
}

impl Record {
    /// True for a record line, well formed or not: its message starts with
    /// "connection ended: ". A command's stderr line that says the same is
    /// not one.
    pub fn is_record(line: &str) -> bool {
        split_line(line).is_some_and(|(_, text)| text.starts_with(RECORD))
            && !line.ends_with(" stream=\"stderr\"")
    }

    /// The record of `line`; None for any other line. Panics on a malformed
    /// record: a changed format must fail the tests, not make them skip it.
    pub fn from_line(line: &str) -> Option<Record> {
        Record::is_record(line)
            .then(|| Record::parse(line).unwrap_or_else(|e| panic!("{e}\nin the record: {line}")))
    }

    /// Parses a record line; the error says what is wrong with it.
    pub fn parse(line: &str) -> Result<Record, String> {
        let (level, text) = split_line(line).ok_or("no timestamp and level")?;
        let text = text
            .strip_prefix(RECORD)
            .ok_or_else(|| format!("not a record: no {RECORD:?}"))?;
        // The message is free text; the fields are the last " conn=" on.
        let at = text.rfind(" conn=").ok_or("no conn= field")?;
        let (message, mut rest) = (&text[..at], &text[at + 1..]);
        let mut values: Vec<Option<String>> = Vec::with_capacity(FIELDS.len());
        let mut first = true;
        for (key, quoted, always) in FIELDS {
            let at_key = if first {
                Some(rest)
            } else {
                rest.strip_prefix(' ')
            }
            .and_then(|r| r.strip_prefix(key))
            .and_then(|r| r.strip_prefix('='));
            let Some(after_key) = at_key else {
                if always {
                    return Err(format!("expected {key}= at {rest:?}"));
                }
                values.push(None);
                continue;
            };
            first = false;
            let (value, after) = if quoted {
                unquote(after_key)
                    .ok_or_else(|| format!("{key}: expected a quoted value at {after_key:?}"))?
            } else {
                let end = after_key.find(' ').unwrap_or(after_key.len());
                (after_key[..end].to_owned(), &after_key[end..])
            };
            if value == "none" {
                return Err(format!("{key}=none: an unknown value is left out"));
            }
            rest = after;
            values.push(Some(value));
        }
        if !rest.is_empty() {
            return Err(format!("unexpected text after the fields: {rest:?}"));
        }
        let text = |i: usize| values[i].clone().unwrap_or_else(|| "none".to_owned());
        let maybe = |i: usize| -> Result<Option<u64>, String> {
            values[i]
                .as_deref()
                .map(|v| v.parse().map_err(|e| format!("{}={v:?}: {e}", FIELDS[i].0)))
                .transpose()
        };
        let number = |i: usize| -> Result<u64, String> { maybe(i).map(|v| v.unwrap_or(0)) };
        Ok(Record {
            level: level.to_owned(),
            message: message.to_owned(),
            conn: number(0)?,
            service: text(1),
            peer: text(2),
            pid: text(3)
                .parse()
                .map_err(|e| format!("pid={:?}: {e}", text(3)))?,
            bytes: number(4)?,
            bytes_received: number(5)?,
            duration_ms: number(6)?,
            exit: text(7),
            reason: text(8),
            cpu_usec: maybe(9)?,
            memory_peak: maybe(10)?,
            tasks_peak: maybe(11)?,
            oom_kills: maybe(12)?,
            messages_sent: maybe(13)?,
            messages_received: maybe(14)?,
            tls: text(15),
            instance: maybe(16)?,
            user: text(17),
            line: line.to_owned(),
        })
    }

    /// Asserts how the connection ended: its reason and the command's exit.
    pub fn assert_ended(&self, reason: &str, exit: &str) {
        assert_eq!(
            (self.reason.as_str(), self.exit.as_str()),
            (reason, exit),
            "{self}"
        );
    }

    /// The client's port, for a TCP peer.
    pub fn peer_port(&self) -> u16 {
        let addr: SocketAddr = self
            .peer
            .parse()
            .unwrap_or_else(|e| panic!("peer {:?}: {e}", self.peer));
        addr.port()
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.line)
    }
}

/// A quoted value as tracing writes a string (Rust's `{:?}`), and the text
/// after it. Only the escapes a config's service name or an exit could need.
fn unquote(s: &str) -> Option<(String, &str)> {
    let mut chars = s.strip_prefix('"')?.char_indices();
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 2..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                c @ ('"' | '\\' | '\'') => out.push(c),
                _ => return None,
            },
            c => out.push(c),
        }
    }
    None
}

/// The level and the text (message and fields) of a log line; None for a
/// line without a timestamp (what the daemon prints before logging starts).
pub fn split_line(line: &str) -> Option<(&str, &str)> {
    let (_timestamp, rest) = line.split_once(' ')?;
    let (level, text) = rest.trim_start().split_once(' ')?;
    ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"]
        .contains(&level)
        .then_some((level, text))
}

/// A field of a log line, `name=value` or `name="value"`, without the quotes.
pub fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=");
    let start = line.find(&key)? + key.len();
    let rest = &line[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        quoted.split('"').next()
    } else {
        rest.split(' ').next()
    }
}

/// The text of a command's stderr line as the daemon logs it: between the
/// level and the fields.
pub fn stderr_text(line: &str) -> &str {
    let (_, text) = split_line(line).unwrap_or_else(|| panic!("not a log line: {line}"));
    let end = text
        .find(" conn=")
        .unwrap_or_else(|| panic!("no conn field: {line}"));
    &text[..end]
}
