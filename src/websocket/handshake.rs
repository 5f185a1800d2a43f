//! The HTTP upgrade: one request, read within bounds (size, header count,
//! time), answered with 101 Switching Protocols or with a plain HTTP error
//! and no command; a plain GET gets the console page where the service has
//! one. The accepted request becomes the command's CGI-style environment.

use std::os::fd::OwnedFd;
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use super::Browser;
use crate::config::WebSocket;
use crate::fdio;

/// The longest request line and headers, together.
const MAX_REQUEST: usize = 8 * 1024;
/// The most headers in a request.
const MAX_HEADERS: usize = 64;
/// The longest header value passed to the command (longer ones are cut).
const MAX_VALUE: usize = 1024;
/// The page a plain GET gets with `console = true`.
const CONSOLE_PAGE: &str = include_str!("console.html");

/// A request that upgraded.
#[derive(Debug)]
pub struct Upgraded {
    /// The CGI-style variables for the command.
    pub env: Vec<(String, String)>,
    /// What the client sent after its request (frames, already).
    pub leftover: Vec<u8>,
}

/// Why no WebSocket session began.
#[derive(Debug)]
pub enum NoSession {
    /// Not a valid upgrade: answered with `status`, and `why` for the log.
    Answered { status: u16, why: String },
    /// A plain GET got the console page.
    Page,
    /// The client left, sent nothing usable, or was too slow.
    Gone(String),
}

/// Reads the client's upgrade request and answers it. `tls` says whether
/// the client came over TLS (for the origin's default port and `HTTPS`).
pub async fn handshake(
    socket: &AsyncFd<OwnedFd>,
    ws: &WebSocket,
    tls: bool,
    limit: Duration,
) -> Result<Upgraded, NoSession> {
    let read = tokio::time::timeout(limit, read_request(socket)).await;
    let (buf, end) = match read {
        Ok(Ok(read)) => read,
        Ok(Err(Unreadable::Gone(why))) => return Err(NoSession::Gone(why)),
        Ok(Err(Unreadable::Bad(why))) => return Err(answer(socket, 400, why, &[]).await),
        Err(_) => {
            let why = format!("no complete request within {} ms", limit.as_millis());
            return Err(answer(socket, 408, why, &[]).await);
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    if let Err(e) = request.parse(&buf[..end]) {
        return Err(answer(socket, 400, format!("malformed request: {e}"), &[]).await);
    }
    let request = Request::of(&request, tls);
    match decide(&request, ws) {
        Decision::Upgrade { accept } => {
            let response = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            fdio::write_all(socket, response.as_bytes(), |_| {})
                .await
                .map_err(|e| {
                    NoSession::Gone(format!("writing the handshake's answer: {}", e.desc()))
                })?;
            Ok(Upgraded {
                env: request.environment(ws),
                leftover: buf[end..].to_vec(),
            })
        }
        Decision::Page => {
            let page = CONSOLE_PAGE;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
                 Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
                 Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src ws: wss:\r\n\
                 Connection: close\r\n\r\n",
                page.len()
            );
            let _ = fdio::write_all(socket, head.as_bytes(), |_| {}).await;
            let _ = fdio::write_all(socket, page.as_bytes(), |_| {}).await;
            close_gently(socket);
            Err(NoSession::Page)
        }
        Decision::Refuse {
            status,
            why,
            headers,
        } => Err(answer(socket, status, why, headers).await),
    }
}

enum Unreadable {
    Gone(String),
    Bad(String),
}

/// Reads until the blank line that ends the headers; returns the bytes read
/// and where the headers end. Bytes after it are the client's first frames.
async fn read_request(socket: &AsyncFd<OwnedFd>) -> Result<(Vec<u8>, usize), Unreadable> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    loop {
        let n = fdio::read_with(socket, |fd| fdio::read(fd, &mut buf[len..]))
            .await
            .map_err(|e| Unreadable::Gone(format!("reading the request: {}", e.desc())))?;
        if n == 0 {
            return Err(Unreadable::Gone(
                "the client closed before its request was complete".into(),
            ));
        }
        let from = len.saturating_sub(3);
        len += n;
        if let Some(at) = buf[from..len].windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(len);
            return Ok((buf, from + at + 4));
        }
        if len == MAX_REQUEST {
            return Err(Unreadable::Bad(format!(
                "the request line and headers are longer than {MAX_REQUEST} bytes"
            )));
        }
    }
}

/// What was asked, in the parts the decision and the environment need.
struct Request {
    method: String,
    target: String,
    path: String,
    query: String,
    version: u8,
    /// Name (as sent) and value of each header.
    headers: Vec<(String, String)>,
    tls: bool,
}

impl Request {
    fn of(r: &httparse::Request<'_, '_>, tls: bool) -> Request {
        let target = r.path.unwrap_or("").to_owned();
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_owned(), q.to_owned()),
            None => (target.clone(), String::new()),
        };
        Request {
            method: r.method.unwrap_or("").to_owned(),
            target,
            path,
            query,
            version: r.version.unwrap_or(1),
            headers: r
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_owned(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect(),
            tls,
        }
    }

    /// A header's values, joined with ", " when it comes more than once.
    fn header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }

    /// Whether a header's comma-separated tokens include `token`.
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.header(name)
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    /// The `Host` header's name and port (the default for the scheme).
    fn host(&self) -> Option<(String, u16)> {
        let host = self.header("Host")?;
        let (name, port) = super::split_host_port(host.trim())?;
        let default = if self.tls { 443 } else { 80 };
        Some((name.to_ascii_lowercase(), port.unwrap_or(default)))
    }

    /// The configured path this request is under (or "/" for any).
    fn script_name(&self, ws: &WebSocket) -> Option<String> {
        if ws.paths.is_empty() {
            return Some("/".into());
        }
        ws.paths
            .iter()
            .find(|p| {
                self.path == **p
                    || self
                        .path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| p.ends_with('/') || rest.starts_with('/'))
            })
            .cloned()
    }

    /// The variables websocketd gives a program, CGI's names: the request,
    /// the server as the client named it, and each header as `HTTP_*`
    /// (names of letters, digits and '-' only; control characters become
    /// spaces; values cut at 1 KiB).
    fn environment(&self, ws: &WebSocket) -> Vec<(String, String)> {
        let script = self.script_name(ws).unwrap_or_else(|| "/".into());
        let path_info = match script.as_str() {
            "/" => self.path.clone(),
            s => self.path[s.len()..].to_owned(),
        };
        let (server, port) = self
            .host()
            .unwrap_or_else(|| (String::new(), if self.tls { 443 } else { 80 }));
        let mut env = vec![
            ("GATEWAY_INTERFACE".into(), "CGI/1.1".into()),
            (
                "SERVER_SOFTWARE".into(),
                concat!("splice-relay/", env!("CARGO_PKG_VERSION")).into(),
            ),
            ("SERVER_PROTOCOL".into(), format!("HTTP/1.{}", self.version)),
            ("REQUEST_METHOD".into(), self.method.clone()),
            ("REQUEST_URI".into(), clean(&self.target)),
            ("SCRIPT_NAME".into(), clean(&script)),
            ("PATH_INFO".into(), clean(&path_info)),
            ("QUERY_STRING".into(), clean(&self.query)),
            ("SERVER_NAME".into(), clean(&server)),
            ("SERVER_PORT".into(), port.to_string()),
        ];
        if self.tls {
            env.push(("HTTPS".into(), "on".into()));
        }
        let mut seen: Vec<String> = Vec::new();
        for (name, _) in &self.headers {
            if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                continue;
            }
            let var = format!("HTTP_{}", name.to_ascii_uppercase().replace('-', "_"));
            if seen.contains(&var) {
                continue;
            }
            if let Some(value) = self.header(name) {
                env.push((var.clone(), clean(&value)));
            }
            seen.push(var);
        }
        env
    }
}

/// A value safe for the environment: control characters as spaces, at
/// most `MAX_VALUE` bytes (cut at a character's start).
fn clean(value: &str) -> String {
    let mut out: String = value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > MAX_VALUE {
        let cut = (0..=MAX_VALUE)
            .rev()
            .find(|i| out.is_char_boundary(*i))
            .unwrap_or(0);
        out.truncate(cut);
    }
    out
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
    if r.script_name(ws).is_none() {
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

/// A plain HTTP error, and the connection closed.
async fn answer(
    socket: &AsyncFd<OwnedFd>,
    status: u16,
    why: String,
    headers: &[(&str, &str)],
) -> NoSession {
    let reason = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        _ => "Error",
    };
    let body = format!("{status} {reason}: {why}\n");
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str("\r\n");
    response.push_str(&body);
    // Best effort, without waiting: a client that does not read is not
    // waited for.
    let _ = nix::unistd::write(socket.get_ref(), response.as_bytes());
    close_gently(socket);
    NoSession::Answered { status, why }
}

/// Shuts our side down and reads what the client already sent, so that the
/// close does not become a reset that destroys the answer in flight.
pub(super) fn close_gently(socket: &AsyncFd<OwnedFd>) {
    let fd = socket.get_ref();
    fdio::end_output(fd);
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        match fdio::read(fd, &mut buf) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
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
            ping_interval: Duration::from_secs(30),
            max_message_size: 1 << 20,
            console,
        }
    }

    fn request(text: &str) -> Request {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
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

    #[test]
    fn the_environment_is_cgi_s_with_headers_cleaned() {
        let r = request(&UPGRADE.replace("X-Custom: a", "X-Custom: a\tb"));
        let env = r.environment(&ws(&["/chat"], &[], false));
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("REQUEST_URI"), Some("/chat?room=1"));
        assert_eq!(get("SCRIPT_NAME"), Some("/chat"));
        assert_eq!(get("PATH_INFO"), Some(""));
        assert_eq!(get("QUERY_STRING"), Some("room=1"));
        assert_eq!(get("SERVER_NAME"), Some("relay.example"));
        assert_eq!(get("SERVER_PORT"), Some("9009"));
        assert_eq!(
            get("HTTP_X_CUSTOM"),
            Some("a b, b"),
            "joined, control characters as spaces"
        );
        assert_eq!(get("HTTP_HOST"), Some("relay.example:9009"));
        assert_eq!(get("HTTPS"), None);
        let any = r.environment(&ws(&[], &[], false));
        assert!(any.contains(&("PATH_INFO".into(), "/chat".into())));
        assert_eq!(clean(&"é".repeat(600)).len(), 1024);
    }
}
