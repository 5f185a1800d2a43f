//! A service's protocol (raw bytes, WebSocket or HTTP) and the keys that
//! belong to each: a key given for another protocol is an error that names
//! the protocol it applies to.

use super::keywords::Protocol as RawProtocol;
use super::raw::RawService;
use super::{defaults, Http, Protocol, Transfer, WebSocket};

/// Raw bytes, WebSocket or HTTP, with their settings; each protocol's keys
/// apply to it only.
pub fn protocol(s: &RawService, transfer: Transfer) -> Result<Protocol, (&'static str, String)> {
    let websocket_only = [
        ("messages", s.messages.is_some()),
        ("allowed_origins", s.allowed_origins.is_some()),
        ("max_message_size", s.max_message_size.is_some()),
    ];
    let http_only = [
        ("content_type", s.content_type.is_some()),
        ("max_body_size", s.max_body_size.is_some()),
        ("cgi_headers", s.cgi_headers.is_some()),
    ];
    let either = [
        ("paths", s.paths.is_some()),
        ("ping_interval", s.ping_interval.is_some()),
        ("console", s.console.is_some()),
        ("forwarded_from", s.forwarded_from.is_some()),
        ("htpasswd", s.htpasswd.is_some()),
        ("bearer_tokens", s.bearer_tokens.is_some()),
    ];
    let given =
        |keys: &[(&'static str, bool)]| keys.iter().find(|(_, given)| *given).map(|(k, _)| *k);
    let protocol = s.protocol.unwrap_or(defaults::PROTOCOL);
    let misplaced = match protocol {
        RawProtocol::Raw => given(&websocket_only)
            .map(|k| (k, r#"applies only with protocol = "websocket""#))
            .or(given(&http_only).map(|k| (k, r#"applies only with protocol = "http""#)))
            .or(given(&either)
                .map(|k| (k, r#"applies only with protocol = "websocket" or "http""#))),
        RawProtocol::WebSocket => {
            given(&http_only).map(|k| (k, r#"applies only with protocol = "http""#))
        }
        RawProtocol::Http => {
            given(&websocket_only).map(|k| (k, r#"applies only with protocol = "websocket""#))
        }
    };
    if let Some((key, why)) = misplaced {
        return Err((key, why.into()));
    }
    let name = match protocol {
        RawProtocol::Raw => return Ok(Protocol::Raw),
        RawProtocol::WebSocket => "websocket",
        RawProtocol::Http => "http",
    };
    if transfer == Transfer::Direct {
        return Err((
            "transfer",
            format!(
                r#""direct" does not apply with protocol = "{name}": the daemon frames the command's output"#
            ),
        ));
    }
    if s.banner.is_some() {
        let first = if name == "http" {
            "the response's head"
        } else {
            "the handshake's answer"
        };
        return Err((
            "banner",
            format!(r#"does not apply with protocol = "{name}": nothing may come before {first}"#),
        ));
    }
    let paths = s.paths.as_ref().map(|p| p.0.clone()).unwrap_or_default();
    let ping_interval = s
        .ping_interval
        .as_ref()
        .map_or(defaults::PING_INTERVAL, |p| p.0);
    if protocol == RawProtocol::Http {
        return Ok(Protocol::Http(Http {
            paths,
            content_type: s
                .content_type
                .as_ref()
                .map_or_else(|| defaults::CONTENT_TYPE.into(), |c| c.0.clone()),
            ping_interval,
            max_body_size: s.max_body_size.unwrap_or(defaults::MAX_BODY_SIZE),
            console: s.console.unwrap_or(defaults::CONSOLE),
            cgi_headers: s.cgi_headers.unwrap_or(false),
        }));
    }
    Ok(Protocol::WebSocket(WebSocket {
        messages: s.messages.unwrap_or(defaults::MESSAGES),
        allowed_origins: s
            .allowed_origins
            .as_ref()
            .map(|o| o.0.clone())
            .unwrap_or_default(),
        paths,
        ping_interval,
        max_message_size: s
            .max_message_size
            .as_ref()
            .map_or(defaults::MAX_MESSAGE_SIZE, |m| m.0),
        console: s.console.unwrap_or(defaults::CONSOLE),
    }))
}
