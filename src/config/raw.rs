//! The file as serde reads it. `Option` stands for "not given"; defaults are
//! applied later, in `check`.
//!
//! A rule about one value lives in that value's type (a count of at least 1,
//! a duration above 0, a prefix length, a size in range, …), so serde refuses
//! the value where it stands and the error carries its position. Rules that
//! relate several keys, or look at the filesystem or the user database, are
//! in `check`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer, Error as _, Visitor};
use serde::Deserialize;

use super::defaults;
use super::{ListenAddr, StdinMode, Transfer};
use crate::access::Cidr;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub log_level: Option<LogLevel>,
    pub max_connections: Option<AtLeastOne<usize>>,
    pub shutdown_timeout: Option<Seconds>,
    #[serde(default)]
    pub service: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub name: Name,
    #[serde(default)]
    pub listen: Listen,
    pub command: Command,
    #[serde(default)]
    pub env: Env,
    pub working_directory: Option<AbsolutePath>,
    pub stdin: Option<StdinMode>,
    pub transfer: Option<Transfer>,
    pub max_connections: Option<AtLeastOne<usize>>,
    pub kill_grace: Option<Seconds>,
    pub pipe_size: Option<PipeSize>,
    pub allow: Option<Ranges>,
    pub deny: Option<Ranges>,
    pub max_per_source: Option<AtLeastOne<usize>>,
    pub ipv6_source_prefix: Option<Ipv6Prefix>,
    pub rate: Option<Rate>,
    pub rate_per_source: Option<Rate>,
    pub proxy_protocol: Option<bool>,
    pub proxy_from: Option<Ranges>,
    pub timeout: Option<Positive>,
    pub idle_timeout: Option<Positive>,
    pub max_bytes: Option<AtLeastOne<u64>>,
    pub banner: Option<Message>,
    pub busy_message: Option<Message>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub rlimit_as: Option<u64>,
    pub rlimit_nofile: Option<u64>,
    pub rlimit_nproc: Option<u64>,
    pub rlimit_cpu: Option<u64>,
    pub nice: Option<Nice>,
}

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

/// The keys of a struct as serde sees them: `deserialize_struct` is handed
/// the field list, so a deserializer that stops there reveals it. The fuzz
/// tests draw keys from this, so their list cannot go stale.
#[cfg(test)]
pub fn keys<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Fields;
    #[derive(Debug)]
    struct Found(&'static [&'static str]);
    impl fmt::Display for Found {
        fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }
    impl std::error::Error for Found {}
    impl de::Error for Found {
        fn custom<M: fmt::Display>(_: M) -> Found {
            Found(&[])
        }
    }
    impl<'de> Deserializer<'de> for Fields {
        type Error = Found;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Found> {
            Err(Found(&[]))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Found> {
            Err(Found(fields))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    match T::deserialize(Fields) {
        Ok(_) => &[],
        Err(Found(fields)) => fields,
    }
}
