//! The values of the file that are one word out of a few (`stdin`,
//! `transfer`, `containment`, `protocol`, `messages`, `tls_client_auth`).

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::{Lagging, Messages, Start, StdinMode, Transfer};

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
keywords!(Transfer { "splice" => Splice, "copy" => Copy, "socketpair" => Socketpair, "direct" => Direct });
keywords!(Messages { "text" => Text, "binary" => Binary });
keywords!(Start { "first-client" => FirstClient, "daemon" => Daemon });
keywords!(Lagging { "drop" => Drop, "wait" => Wait });

/// Where a service's commands are contained, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Containment {
    /// A cgroup per connection where the daemon has a delegated subtree,
    /// else process groups.
    Auto,
    /// A cgroup per connection, or a configuration error.
    Cgroup,
    /// Process groups, even where cgroups are offered.
    ProcessGroup,
}

keywords!(Containment { "auto" => Auto, "cgroup" => Cgroup, "process-group" => ProcessGroup });

/// What the service's clients speak, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Raw,
    WebSocket,
    Http,
}

keywords!(Protocol { "raw" => Raw, "websocket" => WebSocket, "http" => Http });

/// Whether TLS clients present a certificate, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    None,
    Optional,
    Required,
}

keywords!(ClientAuth { "none" => None, "optional" => Optional, "required" => Required });
