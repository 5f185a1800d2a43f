//! The HTTP upgrade: one request, read within bounds (size, header count,
//! time), answered with 101 Switching Protocols or with a plain HTTP error
//! and no command; a plain GET gets the console page where the service has
//! one. The accepted request becomes the command's CGI-style environment.

use std::os::fd::OwnedFd;

use tokio::io::unix::AsyncFd;

use super::Browser;
use crate::config::WebSocket;
use crate::fdio;
use crate::http::console::{self, Console};
use crate::http::request::{answer, Request};
use crate::http::NoResponse;

/// A request that upgraded.
#[derive(Debug)]
pub struct Upgraded {
    /// The CGI-style variables for the command.
    pub env: Vec<(String, String)>,
    /// What the client sent after its request (frames, already).
    pub leftover: Vec<u8>,
}

/// An upgrade request read and checked, not yet answered: the connection
/// may still refuse it (the client a proxy names, a login).
pub struct Asked {
    pub request: Request,
    leftover: Vec<u8>,
    decision: Decision,
}

/// Checks an upgrade request read by `request::read`; one that is not a
/// valid upgrade is answered now.
pub async fn check(
    socket: &AsyncFd<OwnedFd>,
    ws: &WebSocket,
    request: Request,
    leftover: Vec<u8>,
) -> Result<Asked, NoResponse> {
    match decide(&request, ws) {
        Decision::Refuse {
            status,
            why,
            headers,
        } => Err(answer(socket, status, why, headers).await.into()),
        decision => Ok(Asked {
            request,
            leftover,
            decision,
        }),
    }
}

/// Answers an upgrade the connection takes: 101 Switching Protocols, or
/// the console page to a plain GET.
pub async fn accept(
    socket: &AsyncFd<OwnedFd>,
    ws: &WebSocket,
    asked: Asked,
) -> Result<Upgraded, NoResponse> {
    let Asked {
        request,
        leftover,
        decision,
    } = asked;
    let Decision::Upgrade { accept } = decision else {
        console::serve(socket, Console::WebSocket).await;
        return Err(NoResponse::Page);
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    fdio::write_all(socket, response.as_bytes(), |_| {})
        .await
        .map_err(|e| NoResponse::Gone(format!("writing the handshake's answer: {}", e.desc())))?;
    Ok(Upgraded {
        env: request.environment(&ws.paths),
        leftover,
    })
}

enum Decision {
    Upgrade {
        accept: String,
    },
    Page,
    Refuse {
        status: u16,
        why: String,
        headers: &'static [(&'static str, &'static str)],
    },
}

fn refuse(status: u16, why: impl Into<String>) -> Decision {
    Decision::Refuse {
        status,
        why: why.into(),
        headers: &[],
    }
}

/// RFC 6455 section 4.2, and the service's paths and origins.
fn decide(r: &Request, ws: &WebSocket) -> Decision {
    if r.method != "GET" {
        return Decision::Refuse {
            status: 405,
            why: format!("method {}", r.method),
            headers: &[("Allow", "GET")],
        };
    }
    if r.version < 1 {
        return refuse(400, "HTTP/1.0: an upgrade needs HTTP/1.1");
    }
    if r.script_name(&ws.paths).is_none() {
        return refuse(404, format!("path {} is not served", r.path));
    }
    let upgrade = r.has_token("Upgrade", "websocket") && r.has_token("Connection", "upgrade");
    if !upgrade {
        if ws.console {
            return Decision::Page;
        }
        return Decision::Refuse {
            status: 426,
            why: "not a WebSocket upgrade".into(),
            headers: &[("Upgrade", "websocket"), ("Connection", "Upgrade")],
        };
    }
    if r.header("Sec-WebSocket-Version").as_deref() != Some("13") {
        return Decision::Refuse {
            status: 426,
            why: format!(
                "WebSocket version {:?} (13 is spoken)",
                r.header("Sec-WebSocket-Version").unwrap_or_default()
            ),
            headers: &[("Sec-WebSocket-Version", "13")],
        };
    }
    let Some(key) = r.header("Sec-WebSocket-Key").filter(|k| is_key(k)) else {
        return refuse(400, "no valid Sec-WebSocket-Key");
    };
    if let Some(origin) = r.header("Origin") {
        if !origin_allowed(r, ws, &origin) {
            return refuse(403, format!("origin {origin:?} is not allowed"));
        }
    }
    Decision::Upgrade {
        accept: tungstenite::handshake::derive_accept_key(key.as_bytes()),
    }
}

/// A key is 16 random bytes in base64: 22 characters and "==".
fn is_key(key: &str) -> bool {
    key.len() == 24
        && key.ends_with("==")
        && key[..22]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// Same-origin requests (the page's host and port are the ones the client
/// connected to), and the listed ones. Browsers always send `Origin`; other
/// clients need not, and are not asked to.
fn origin_allowed(r: &Request, ws: &WebSocket, origin: &str) -> bool {
    let Some(browser) = Browser::parse(origin) else {
        return false;
    };
    let same = r
        .host()
        .is_some_and(|(host, port)| host == browser.host && port == browser.port);
    same || ws
        .allowed_origins
        .iter()
        .any(|o| super::matches(o, &browser))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Messages;

    fn ws(paths: &[&str], origins: &[&str], console: bool) -> WebSocket {
        WebSocket {
            messages: Messages::Text,
            allowed_origins: origins.iter().map(|o| o.parse().unwrap()).collect(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
            ping_interval: std::time::Duration::from_secs(30),
            max_message_size: 1 << 20,
            console,
        }
    }

    fn request(text: &str) -> Request {
        let mut headers = [httparse::EMPTY_HEADER; crate::http::request::MAX_HEADERS];
        let mut r = httparse::Request::new(&mut headers);
        r.parse(text.as_bytes()).unwrap();
        Request::of(&r, false)
    }

    const UPGRADE: &str = "GET /chat?room=1 HTTP/1.1\r\nHost: relay.example:9009\r\n\
        Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
        X-Custom: a\r\nX-Custom: b\r\n\r\n";

    fn status(d: Decision) -> u16 {
        match d {
            Decision::Upgrade { .. } => 101,
            Decision::Page => 200,
            Decision::Refuse { status, .. } => status,
        }
    }

    #[test]
    fn an_upgrade_is_accepted_with_the_rfc_key() {
        match decide(&request(UPGRADE), &ws(&[], &[], false)) {
            // RFC 6455 section 1.3's example.
            Decision::Upgrade { accept } => assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            _ => panic!("not upgraded"),
        }
    }

    #[test]
    fn each_bad_request_gets_its_status() {
        let any = ws(&[], &[], false);
        let with = |from: &str, to: &str| request(&UPGRADE.replacen(from, to, 1));
        assert_eq!(status(decide(&with("GET", "POST"), &any)), 405);
        assert_eq!(
            status(decide(&with("Upgrade: websocket\r\n", ""), &any)),
            426
        );
        assert_eq!(
            status(decide(
                &with("Upgrade: websocket\r\n", ""),
                &ws(&[], &[], true)
            )),
            200,
            "the console page"
        );
        assert_eq!(
            status(decide(&with("Version: 13", "Version: 8"), &any)),
            426
        );
        assert_eq!(
            status(decide(&with("dGhlIHNhbXBsZSBub25jZQ==", "short"), &any)),
            400
        );
        assert_eq!(
            status(decide(&request(UPGRADE), &ws(&["/other"], &[], false))),
            404
        );
        assert_eq!(
            status(decide(&request(UPGRADE), &ws(&["/chat"], &[], false))),
            101
        );
        assert_eq!(
            status(decide(&request(UPGRADE), &ws(&["/"], &[], false))),
            101
        );
        assert_eq!(
            status(decide(
                &request(&UPGRADE.replace("/chat?", "/chatty?")),
                &ws(&["/chat"], &[], false)
            )),
            404
        );
    }

    #[test]
    fn cross_site_origins_need_a_listing() {
        let origin = |o: &str| request(&UPGRADE.replace("X-Custom: a", &format!("Origin: {o}")));
        let any = ws(&[], &[], false);
        assert_eq!(
            status(decide(&origin("http://relay.example:9009"), &any)),
            101,
            "same origin"
        );
        assert_eq!(status(decide(&origin("http://evil.example"), &any)), 403);
        assert_eq!(status(decide(&origin("null"), &any)), 403);
        let listed = ws(&[], &["https://app.example"], false);
        assert_eq!(status(decide(&origin("https://app.example"), &listed)), 101);
        assert_eq!(status(decide(&origin("http://app.example"), &listed)), 403);
    }
}
