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

use crate::config::{split_host_port, Origin};

pub use handshake::{accept, check, Asked, Upgraded};
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
    crate::http::request::close_gently(socket);
}

/// Whether a browser's `Origin` header value names `origin`.
fn matches(origin: &Origin, browser: &Browser) -> bool {
    origin.scheme.as_ref().is_none_or(|s| *s == browser.scheme)
        && origin.host == browser.host
        && origin.port.is_none_or(|p| p == browser.port)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_and_match_as_documented() {
        let any_port: Origin = "example.com".parse().unwrap();
        let exact: Origin = "https://example.com:8443".parse().unwrap();
        let https: Origin = "https://Example.com".parse().unwrap();
        let b = |v| Browser::parse(v).unwrap();
        assert!(matches(&any_port, &b("http://example.com:8080")));
        assert!(matches(&any_port, &b("https://example.com")));
        assert!(!matches(&any_port, &b("https://evil.example")));
        assert!(matches(&exact, &b("https://example.com:8443")));
        assert!(!matches(&exact, &b("https://example.com")));
        assert!(matches(&https, &b("https://example.com")), "{https}");
        assert!(!matches(&https, &b("http://example.com")));
        assert_eq!(b("http://[::1]:9").port, 9);
        for bad in ["https://", "ex ample.com/x", "a://b/c", "://x", "x:port"] {
            assert!(bad.parse::<Origin>().is_err(), "{bad}");
        }
    }
}
