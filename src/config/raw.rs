//! The file as serde reads it: the schema, key by key. `Option` stands for
//! "not given"; defaults are applied later, in `check`. Each value's own
//! rule is in its type, in `values` or `keywords`.

use serde::Deserialize;

use super::keywords::{ClientAuth, Containment, Protocol};
use super::values::{
    AbsolutePath, AtLeastOne, Bytes, Command, ContentType, CpuQuota, Env, Ipv6Prefix, Linger,
    Listen, LogLevel, Message, Name, Nice, Origins, Paths, PipeSize, Positive, Ranges, Rate,
    Seconds, SharedKey, Source, TasksMax, Weight,
};
use super::{Lagging, Start};
use super::{Messages, StdinMode, Transfer};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub log_level: Option<LogLevel>,
    pub max_connections: Option<AtLeastOne<usize>>,
    pub shutdown_timeout: Option<Seconds>,
    pub delegated_cgroup: Option<AbsolutePath>,
    #[serde(default)]
    pub service: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub name: Name,
    #[serde(default)]
    pub listen: Listen,
    pub socket_name: Option<Name>,
    /// Required, except with `shared = "NAME"` (the command is NAME's).
    pub command: Option<Command>,
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
    pub forwarded_from: Option<Ranges>,
    pub htpasswd: Option<Source>,
    pub bearer_tokens: Option<Source>,
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
    pub containment: Option<Containment>,
    pub memory_max: Option<Bytes>,
    pub memory_high: Option<Bytes>,
    pub cpu_quota: Option<CpuQuota>,
    pub cpu_weight: Option<Weight>,
    pub tasks_max: Option<TasksMax>,
    pub io_weight: Option<Weight>,
    pub protocol: Option<Protocol>,
    pub messages: Option<Messages>,
    pub allowed_origins: Option<Origins>,
    pub paths: Option<Paths>,
    pub ping_interval: Option<Positive>,
    pub max_message_size: Option<AtLeastOne<usize>>,
    pub console: Option<bool>,
    pub content_type: Option<ContentType>,
    pub max_body_size: Option<u64>,
    pub cgi_headers: Option<bool>,
    pub handshake_timeout: Option<Positive>,
    pub tls_certificate: Option<Source>,
    pub tls_key: Option<Source>,
    pub tls_client_ca: Option<Source>,
    pub tls_client_auth: Option<ClientAuth>,
    pub shared: Option<SharedKey>,
    pub start: Option<Start>,
    pub linger: Option<Linger>,
    pub max_lag: Option<AtLeastOne<u64>>,
    pub replay: Option<u64>,
    pub lagging: Option<Lagging>,
}

/// The keys of a struct as serde sees them: `deserialize_struct` is handed
/// the field list, so a deserializer that stops there reveals it. The fuzz
/// tests draw keys from this, so their list cannot go stale.
#[cfg(test)]
pub fn keys<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    use serde::de::{self, Deserializer, Visitor};
    use std::fmt;

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
