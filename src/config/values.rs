//! The types of the file's values: each reads one value and refuses it where it
//! stands if it breaks a rule about it alone; rules across keys are in `check`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer, Error as _, Visitor};
use serde::Deserialize;

use super::defaults;
use super::{ListenAddr, Origin};
use crate::access::Cidr;

/// Declares a value type: `$inner` as serde reads it, then `$rule` turns it
/// into the value or a message (which serde locates at the value).
macro_rules! value_type {
    ($(#[$doc:meta])* $name:ident($out:ty) from $inner:ty, $rule:expr) => {
        $(#[$doc])*
        pub struct $name(pub $out);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let rule: fn($inner) -> Result<$out, String> = $rule;
                rule(<$inner>::deserialize(d)?).map($name).map_err(D::Error::custom)
            }
        }
    };
}

value_type!(
    /// A tracing filter: `info`, `splice_relay=debug`, …
    LogLevel(String) from String,
    |v| match v.parse::<tracing_subscriber::EnvFilter>() {
        Ok(_) => Ok(v),
        Err(e) => Err(format!("{v:?}: {e}")),
    }
);

value_type!(
    /// A service's name: matched against systemd's FileDescriptorName=.
    Name(String) from String,
    |v| {
        if v.is_empty() {
            Err("must not be empty".into())
        } else if v.len() > 255 || v.contains(|c: char| c == ':' || c.is_control()) {
            Err("must be at most 255 characters with no ':' or control characters \
                 (it is matched against systemd's FileDescriptorName=)"
                .into())
        } else {
            Ok(v)
        }
    }
);

value_type!(
    /// The argv of a command: not empty, no NUL byte.
    Command(Vec<String>) from Vec<String>,
    |v| {
        if v.is_empty() {
            Err("must not be empty".into())
        } else if v.iter().any(|a| a.contains('\0')) {
            Err("must not contain NUL bytes".into())
        } else {
            Ok(v)
        }
    }
);

value_type!(
    /// Extra environment variables, in a stable order.
    #[derive(Default)]
    Env(Vec<(String, String)>) from BTreeMap<String, String>,
    |v| {
        for (k, value) in &v {
            if k.is_empty() || k.contains('=') || k.contains('\0') || value.contains('\0') {
                return Err(format!(
                    "{k:?}: a variable name must be non-empty without '=' or NUL, and its value without NUL"
                ));
            }
        }
        Ok(v.into_iter().collect())
    }
);

value_type!(
    /// A path that must be absolute (whether it exists is checked later).
    AbsolutePath(PathBuf) from PathBuf,
    |v| if v.is_absolute() {
        Ok(v)
    } else {
        Err(format!("{}: must be an absolute path", v.display()))
    }
);

value_type!(
    /// Bytes in the stdout pipe.
    PipeSize(usize) from usize,
    |v| if defaults::PIPE_SIZE_RANGE.contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{v}: must be between {} and {} bytes",
            defaults::PIPE_SIZE_RANGE.start(),
            defaults::PIPE_SIZE_RANGE.end()
        ))
    }
);

value_type!(
    /// The IPv6 network size that counts as one source.
    Ipv6Prefix(u8) from u8,
    |v| if (1..=128).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v}: must be between 1 and 128"))
    }
);

value_type!(
    /// Connections per second.
    Rate(f64) from f64,
    |v| if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err("must be a number of connections per second above 0".into())
    }
);

value_type!(
    /// A scheduling niceness.
    Nice(i32) from i32,
    |v| if (-20..=19).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v}: must be between -20 and 19"))
    }
);

value_type!(
    /// A `banner` or `busy_message`: at most `MAX_MESSAGE` bytes; empty is none.
    Message(Option<Vec<u8>>) from String,
    |v| if v.len() > defaults::MAX_MESSAGE {
        Err(format!("{} bytes: must be at most {}", v.len(), defaults::MAX_MESSAGE))
    } else {
        Ok((!v.is_empty()).then(|| v.into_bytes()))
    }
);

value_type!(
    /// Addresses and CIDR ranges. Parsed as a list, so an error points at the
    /// list, as for every other key.
    Ranges(Vec<Cidr>) from Vec<String>,
    |v| v.iter().map(|t| t.parse::<Cidr>()).collect()
);

value_type!(
    /// A duration above zero.
    Positive(Duration) from Seconds,
    |v| if v.0.is_zero() {
        Err("must be more than 0".into())
    } else {
        Ok(v.0)
    }
);

value_type!(
    /// A weight, as `CPUWeight=` and `IOWeight=`: 1 to 10000 (100 is the default share).
    Weight(u32) from u32,
    |v| if (1..=10_000).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v}: must be between 1 and 10000"))
    }
);

value_type!(
    /// A CPU quota as `CPUQuota=`: `"50%"` of one CPU, `"200%"` of two;
    /// kept in hundredths of a percent.
    CpuQuota(u32) from String,
    |v| {
        let number = v.trim().strip_suffix('%').map(str::trim);
        match number.map(str::parse::<f64>) {
            Some(Ok(p)) if p.is_finite() && p > 0.0 && p <= 100_000.0 => Ok((p * 100.0).round().max(1.0) as u32),
            _ => Err(format!("{v:?}: expected a percentage above 0 of one CPU, like \"50%\" (as CPUQuota=)")),
        }
    }
);

/// A size in bytes, as systemd's `MemoryMax=`: a number of bytes, or a
/// string with K, M, G, T, P or E (powers of 1024; `"1.5G"` works), a
/// percentage of the physical memory (`"50%"`), or `"infinity"` (no limit:
/// `None`).
pub struct Bytes(pub Option<u64>);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Option<u64>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    r#"a size: bytes, or a string like "512M", "1.5G", "50%" or "infinity""#,
                )
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<u64>, E> {
                match u64::try_from(v) {
                    Ok(0) | Err(_) => Err(E::custom("must be more than 0")),
                    Ok(n) => Ok(Some(n)),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<u64>, E> {
                parse_size(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V).map(Bytes)
    }
}

/// Parses `"512M"`, `"1.5G"`, `"50%"`, `"infinity"`.
pub fn parse_size(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    if t == "infinity" {
        return Ok(None);
    }
    let bad = || {
        format!(
            r#"{text:?}: expected bytes, a number with K, M, G, T, P or E, a percentage, or "infinity""#
        )
    };
    let bytes = if let Some(pct) = t.strip_suffix('%') {
        let pct: f64 = pct.trim().parse().map_err(|_| bad())?;
        if !(pct.is_finite() && pct > 0.0 && pct <= 100.0) {
            return Err(format!(
                "{text:?}: a percentage of the memory must be above 0 and at most 100"
            ));
        }
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as u64;
        let pages = nix::unistd::sysconf(nix::unistd::SysconfVar::_PHYS_PAGES)
            .ok()
            .flatten()
            .unwrap_or(0) as u64;
        ((pages as f64 * pct / 100.0) as u64) * page
    } else {
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let number: f64 = number.parse().map_err(|_| bad())?;
        let shift = match unit.trim() {
            "" | "B" => 0,
            "K" => 10,
            "M" => 20,
            "G" => 30,
            "T" => 40,
            "P" => 50,
            "E" => 60,
            _ => return Err(bad()),
        };
        let value = number * (1u64 << shift) as f64;
        if !(value.is_finite() && value < u64::MAX as f64) {
            return Err(format!("{text:?}: out of range"));
        }
        value as u64
    };
    if bytes == 0 {
        return Err(format!("{text:?}: must be more than 0"));
    }
    Ok(Some(bytes))
}

/// `tasks_max`: a number of processes and threads, or `"infinity"`.
pub struct TasksMax(pub Option<u64>);

impl<'de> Deserialize<'de> for TasksMax {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Option<u64>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a number of tasks, or "infinity""#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<u64>, E> {
                match u64::try_from(v) {
                    Ok(0) | Err(_) => Err(E::custom("must be at least 1")),
                    Ok(n) => Ok(Some(n)),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<u64>, E> {
                match v {
                    "infinity" => Ok(None),
                    _ => Err(E::custom(format!(
                        r#"{v:?}: expected a number or "infinity""#
                    ))),
                }
            }
        }
        d.deserialize_any(V).map(TasksMax)
    }
}

/// A count that must be at least 1 (`max_connections`, `max_bytes`, …).
pub struct AtLeastOne<T>(pub T);

impl<'de, T> Deserialize<'de> for AtLeastOne<T>
where
    T: Deserialize<'de> + PartialOrd + From<u8>,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = T::deserialize(d)?;
        if v < T::from(1) {
            return Err(D::Error::custom("must be at least 1"));
        }
        Ok(AtLeastOne(v))
    }
}

/// A duration: a number of seconds, or a string such as `"250ms"`, `"5s"`, `"2m"`.
pub struct Seconds(pub Duration);

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

/// `shared`: `true` (the service's one command is shared by its clients),
/// `false`, or the name of a shared service whose command this service's
/// clients watch.
pub enum SharedKey {
    Own(bool),
    Of(String),
}

impl<'de> Deserialize<'de> for SharedKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SharedKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false, or the name of a service with shared = true")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<SharedKey, E> {
                Ok(SharedKey::Own(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SharedKey, E> {
                if v.is_empty() {
                    return Err(E::custom("a service's name must not be empty"));
                }
                Ok(SharedKey::Of(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `linger`: a duration as [`Seconds`] reads one, or `"never"` (None).
pub struct Linger(pub Option<Duration>);

impl<'de> Deserialize<'de> for Linger {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Linger;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a duration (seconds, or a string like "5s", "2m"), or "never""#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Linger, E> {
                Seconds::deserialize(de::value::I64Deserializer::<E>::new(v))
                    .map(|s| Linger(Some(s.0)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Linger, E> {
                Seconds::deserialize(de::value::F64Deserializer::<E>::new(v))
                    .map(|s| Linger(Some(s.0)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Linger, E> {
                if v.trim() == "never" {
                    return Ok(Linger(None));
                }
                parse_duration(v)
                    .map(|d| Linger(Some(d)))
                    .map_err(|e| E::custom(format!(r#"{e}, or "never""#)))
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

/// `listen = "addr"` or `listen = ["addr", …]`, each parsed.
#[derive(Default)]
pub struct Listen(pub Vec<ListenAddr>);

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<String>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address string or an array of them")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
                Ok(vec![v.to_owned()])
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(out)
            }
        }
        let texts = d.deserialize_any(V)?;
        texts
            .iter()
            .map(|t| parse_listen(t))
            .collect::<Result<_, _>>()
            .map(Listen)
            .map_err(D::Error::custom)
    }
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

value_type!(
    /// A file for TLS: an absolute path, or a credential's name (no '/').
    Source(String) from String,
    |v| {
        if v.starts_with('/') || (!v.is_empty() && !v.contains('/') && !v.chars().any(char::is_control)) {
            Ok(v)
        } else {
            Err(format!("{v:?}: an absolute path, or the name of a systemd credential (LoadCredential=), expected"))
        }
    }
);

value_type!(
    /// Origins a WebSocket service accepts besides its own:
    /// `"https://example.com"`, `"example.com:8443"`, `"example.com"`.
    Origins(Vec<Origin>) from Vec<String>,
    |v| v.iter().map(|t| t.parse()).collect()
);

value_type!(
    /// An HTTP service's `Content-Type`: a media type and its parameters,
    /// printable ASCII (it is sent as a header).
    ContentType(String) from String,
    |v| {
        let (kind, _) = v.split_once(';').unwrap_or((&v, ""));
        let (main, sub) = kind.trim().split_once('/').unwrap_or(("", ""));
        let token = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b));
        if token(main) && token(sub) && v.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            Ok(v)
        } else {
            Err(format!("{v:?}: a media type such as \"text/plain; charset=utf-8\" expected"))
        }
    }
);

value_type!(
    /// The paths a WebSocket or HTTP service answers: absolute, no query.
    Paths(Vec<String>) from Vec<String>,
    |v| {
        for p in &v {
            if !p.starts_with('/') || p.contains(['?', '#']) || p.chars().any(char::is_control) {
                return Err(format!("{p:?}: a path starts with '/' and has no '?', '#' or control characters"));
            }
        }
        Ok(v)
    }
);
