//! WebSocket (RFC 6455) for `protocol = "websocket"`: any command in a
//! browser, as websocketd does, with every guarantee a raw connection has.
//!
//! - `handshake`: the HTTP upgrade request, read within bounds of size,
//!   count and time; the answer (101, or 400/403/404/405/426 and no
//!   command); the console page; and the CGI-style environment the command
//!   gets.
//! - `session`: the messages. Client frames are read by tungstenite (masks,
//!   fragments, control frames between fragments, UTF-8, sizes); pings keep
//!   the client honest; every end of the connection closes with the code
//!   that fits.
//! - `frames`: the daemon's own frames, written whole and in order, so binary
//!   output is spliced from the pipe behind each frame's header; and text
//!   output cut into a message a line.
//! - `console.html`: the page.

mod frames;
mod handshake;
mod session;

use std::fmt;
use std::str::FromStr;

pub use handshake::{handshake, Refused, Upgraded};
pub use session::Session;

/// After the upgrade, when no session can follow (the command did not
/// start): a close frame with 1011 and `reason`, best effort, without
/// waiting, and the connection closed.
pub fn close_unserved(socket: &tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>, reason: &str) {
    let reason = &reason.as_bytes()[..reason.len().min(120)];
    let mut frame = vec![0x88, 2 + reason.len() as u8];
    frame.extend_from_slice(&1011u16.to_be_bytes());
    frame.extend_from_slice(reason);
    let _ = nix::unistd::write(socket.get_ref(), &frame);
    handshake::close_gently(socket);
}

/// An origin a service accepts: `scheme://host[:port]`, or `host[:port]`
/// for any scheme; without a port, any port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: Option<String>,
    host: String,
    port: Option<u16>,
}

impl FromStr for Origin {
    type Err = String;

    fn from_str(text: &str) -> Result<Origin, String> {
        let bad = || {
            format!(
                "{text:?}: expected an origin like \"https://example.com\", \"example.com:8443\" or \"example.com\""
            )
        };
        let (scheme, rest) = match text.split_once("://") {
            Some((s, r))
                if !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
            {
                (Some(s.to_ascii_lowercase()), r)
            }
            Some(_) => return Err(bad()),
            None => (None, text),
        };
        let (host, port) = split_host_port(rest).ok_or_else(bad)?;
        if host.is_empty() || rest.contains(['/', '?', '#', '@']) {
            return Err(bad());
        }
        Ok(Origin {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(s) = &self.scheme {
            write!(f, "{s}://")?;
        }
        f.write_str(&self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl Origin {
    /// Whether a browser's `Origin` header value names this origin.
    fn matches(&self, origin: &Browser) -> bool {
        self.scheme.as_ref().is_none_or(|s| *s == origin.scheme)
            && self.host == origin.host
            && self.port.is_none_or(|p| p == origin.port)
    }
}

/// An `Origin` header's value, parsed: scheme, host and port (the scheme's
/// default when absent).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Browser {
    scheme: String,
    host: String,
    port: u16,
}

impl Browser {
    fn parse(value: &str) -> Option<Browser> {
        let (scheme, rest) = value.trim().split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let (host, port) = split_host_port(rest.trim_end_matches('/'))?;
        let port = port.or(match scheme.as_str() {
            "http" | "ws" => Some(80),
            "https" | "wss" => Some(443),
            _ => None,
        })?;
        Some(Browser {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`; None for a bad port.
fn split_host_port(text: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(p) => Some((host, Some(p.parse().ok()?))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match text.rsplit_once(':') {
        Some((host, p)) if !host.contains(':') => Some((host, Some(p.parse().ok()?))),
        Some(_) => None,
        None => Some((text, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_and_match_as_documented() {
        let any_port: Origin = "example.com".parse().unwrap();
        let exact: Origin = "https://example.com:8443".parse().unwrap();
        let https: Origin = "https://Example.com".parse().unwrap();
        let b = |v| Browser::parse(v).unwrap();
        assert!(any_port.matches(&b("http://example.com:8080")));
        assert!(any_port.matches(&b("https://example.com")));
        assert!(!any_port.matches(&b("https://evil.example")));
        assert!(exact.matches(&b("https://example.com:8443")));
        assert!(!exact.matches(&b("https://example.com")));
        assert!(https.matches(&b("https://example.com")), "{https}");
        assert!(!https.matches(&b("http://example.com")));
        assert_eq!(b("http://[::1]:9").port, 9);
        for bad in ["https://", "ex ample.com/x", "a://b/c", "://x", "x:port"] {
            assert!(bad.parse::<Origin>().is_err(), "{bad}");
        }
    }
}
