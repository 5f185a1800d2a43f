//! One HTTP request's head, read within bounds (size, header count, time)
//! and parsed by httparse; what it asks for, in the parts the answers and
//! the command's CGI environment need; and the plain answers that end a
//! connection with no command (400, 404, 408, 431, …).

use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use crate::access::Cidr;
use crate::config::split_host_port;
use crate::fdio;

/// The longest request line and headers, together.
pub const MAX_HEAD: usize = 8 * 1024;
/// The most headers in a request.
pub const MAX_HEADERS: usize = 64;
/// The longest header value passed to the command (longer ones are cut).
const MAX_VALUE: usize = 1024;

/// A request answered with an error, or a client that sent none: no command.
#[derive(Debug)]
pub enum NoRequest {
    /// Answered with `status`, and `why` for the log.
    Answered { status: u16, why: String },
    /// The client left, sent nothing usable, or was too slow.
    Gone(String),
}

/// Reads a request's head within `limit` and parses it; a client that
/// sends none in time, or a malformed or oversized one, is answered with
/// the status that says so. Returns the request and what the client sent
/// after its head (a body, or frames).
pub async fn read(
    socket: &AsyncFd<OwnedFd>,
    tls: bool,
    limit: Duration,
) -> Result<(Request, Vec<u8>), NoRequest> {
    let (buf, end) = match tokio::time::timeout(limit, read_head(socket)).await {
        Ok(Ok(read)) => read,
        Ok(Err(Unreadable::Gone(why))) => return Err(NoRequest::Gone(why)),
        Ok(Err(Unreadable::TooLong(why))) => return Err(answer(socket, 431, why, &[]).await),
        Err(_) => {
            let why = format!("no complete request within {} ms", limit.as_millis());
            return Err(answer(socket, 408, why, &[]).await);
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(&buf[..end]) {
        Ok(_) => {}
        Err(httparse::Error::TooManyHeaders) => {
            let why = format!("more than {MAX_HEADERS} headers");
            return Err(answer(socket, 431, why, &[]).await);
        }
        Err(e) => {
            let why = format!("malformed request: {e}");
            return Err(answer(socket, 400, why, &[]).await);
        }
    }
    Ok((Request::of(&parsed, tls), buf[end..].to_vec()))
}

enum Unreadable {
    Gone(String),
    TooLong(String),
}

/// Reads until the blank line that ends the head; returns the bytes read
/// and where the head ends.
async fn read_head(socket: &AsyncFd<OwnedFd>) -> Result<(Vec<u8>, usize), Unreadable> {
    let mut buf = vec![0u8; MAX_HEAD];
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
        if len == MAX_HEAD {
            return Err(Unreadable::TooLong(format!(
                "the request line and headers are longer than {MAX_HEAD} bytes"
            )));
        }
    }
}

/// What was asked, in the parts the answers and the environment need.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub path: String,
    pub query: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Name (as sent) and value of each header.
    pub headers: Vec<(String, String)>,
    pub tls: bool,
}

impl Request {
    pub fn of(r: &httparse::Request<'_, '_>, tls: bool) -> Request {
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
    pub fn header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }

    /// Whether a header's comma-separated tokens include `token`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.header(name)
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    /// The `Host` header's name and port (the default for the scheme).
    pub fn host(&self) -> Option<(String, u16)> {
        let host = self.header("Host")?;
        let (name, port) = split_host_port(host.trim())?;
        let default = if self.tls { 443 } else { 80 };
        Some((name.to_ascii_lowercase(), port.unwrap_or(default)))
    }

    /// The configured path this request is under (or "/" when `paths` is
    /// empty: any); each path also answers below it.
    pub fn script_name(&self, paths: &[String]) -> Option<String> {
        if paths.is_empty() {
            return Some("/".into());
        }
        paths
            .iter()
            .filter(|p| {
                self.path == **p
                    || self
                        .path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| p.ends_with('/') || rest.starts_with('/'))
            })
            .max_by_key(|p| p.len())
            .cloned()
    }

    /// The variables CGI and websocketd give a program: the request, the
    /// server as the client named it, and each header as `HTTP_*` (names of
    /// letters, digits and '-' only; control characters become spaces;
    /// values cut at 1 KiB). `Content-Type` and `Content-Length` are
    /// CGI's `CONTENT_TYPE` and `CONTENT_LENGTH` instead.
    pub fn environment(&self, paths: &[String]) -> Vec<(String, String)> {
        let script = self.script_name(paths).unwrap_or_else(|| "/".into());
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
            let upper = name.to_ascii_uppercase().replace('-', "_");
            let var = match upper.as_str() {
                "CONTENT_TYPE" | "CONTENT_LENGTH" => upper,
                _ => format!("HTTP_{upper}"),
            };
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

impl Request {
    /// The client a trusted reverse proxy names, and whether it came over
    /// TLS: from `Forwarded` (RFC 7239) if the request has one, else
    /// `X-Forwarded-For` and `X-Forwarded-Proto`. Each proxy appends the
    /// address it got the request from, so the client is the last address
    /// that is not one of the `trusted` proxies; a name that is not an
    /// address (`unknown`, an obfuscated one) ends the search there, and
    /// None means the request names no client to believe.
    pub fn forwarded(&self, trusted: &[Cidr]) -> Option<Forwarded> {
        let (hops, schemes): (Vec<Option<SocketAddr>>, Vec<Option<String>>) =
            match self.header("Forwarded") {
                Some(value) => value.split(',').map(forwarded_element).unzip(),
                None => {
                    let chain = self.header("X-Forwarded-For")?;
                    let proto = self.header("X-Forwarded-Proto");
                    let first = proto.as_deref().map(|p| {
                        p.split(',')
                            .next()
                            .unwrap_or("")
                            .trim()
                            .to_ascii_lowercase()
                    });
                    let hops: Vec<_> = chain.split(',').map(|h| node(h.trim())).collect();
                    let schemes = vec![first; hops.len()];
                    (hops, schemes)
                }
            };
        let mut found = None;
        for (hop, scheme) in hops.into_iter().zip(schemes).rev() {
            let addr = hop?;
            found = Some(Forwarded {
                client: addr,
                https: scheme.as_deref() == Some("https"),
            });
            if !trusted.iter().any(|c| c.contains(addr.ip())) {
                break;
            }
        }
        found
    }
}

/// The client a reverse proxy names, and whether it came over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarded {
    /// Its address (port 0 when the proxy gives none).
    pub client: SocketAddr,
    pub https: bool,
}

/// One element of `Forwarded`: its `for` node and its `proto`.
fn forwarded_element(element: &str) -> (Option<SocketAddr>, Option<String>) {
    let (mut hop, mut proto) = (None, None);
    for pair in element.split(';') {
        let Some((name, value)) = pair.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        match name.trim().to_ascii_lowercase().as_str() {
            "for" => hop = node(value),
            "proto" => proto = Some(value.to_ascii_lowercase()),
            _ => {}
        }
    }
    (hop, proto)
}

/// A node: `192.0.2.1`, `192.0.2.1:4711`, `[2001:db8::1]`,
/// `[2001:db8::1]:4711` or a bare IPv6 address; None for anything else.
fn node(text: &str) -> Option<SocketAddr> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some(addr);
    }
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0))
}

/// A value safe for the environment: control characters as spaces, at
/// most `MAX_VALUE` bytes (cut at a character's start).
pub fn clean(value: &str) -> String {
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

/// The reason phrase of a status the daemon sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// A plain error answer's bytes: the status, `headers`, and a one-line
/// body that says why (none for HEAD).
pub fn error_response(status: u16, why: &str, headers: &[(&str, &str)], head: bool) -> Vec<u8> {
    let reason = reason(status);
    let body = format!("{status} {reason}: {why}\n");
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str("\r\n");
    if !head {
        response.push_str(&body);
    }
    response.into_bytes()
}

/// A plain HTTP error, and the connection closed.
pub async fn answer(
    socket: &AsyncFd<OwnedFd>,
    status: u16,
    why: String,
    headers: &[(&str, &str)],
) -> NoRequest {
    let response = error_response(status, &why, headers, false);
    // Best effort, without waiting: a client that does not read is not
    // waited for.
    let _ = nix::unistd::write(socket.get_ref(), &response);
    close_gently(socket);
    NoRequest::Answered { status, why }
}

/// Shuts our side down and reads what the client already sent, so that the
/// close does not become a reset that destroys the answer in flight.
pub fn close_gently(socket: &AsyncFd<OwnedFd>) {
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

    fn request(text: &str) -> Request {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Request::new(&mut headers);
        r.parse(text.as_bytes()).unwrap();
        Request::of(&r, false)
    }

    const GET: &str = "GET /chat/room?x=1 HTTP/1.1\r\nHost: relay.example:9009\r\n\
        X-Custom: a\tb\r\nX-Custom: b\r\nContent-Type: text/csv\r\nContent-Length: 3\r\n\r\n";

    #[test]
    fn the_environment_is_cgi_s_with_headers_cleaned() {
        let r = request(GET);
        let env = r.environment(&["/chat".into()]);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("REQUEST_URI"), Some("/chat/room?x=1"));
        assert_eq!(get("SCRIPT_NAME"), Some("/chat"));
        assert_eq!(get("PATH_INFO"), Some("/room"));
        assert_eq!(get("QUERY_STRING"), Some("x=1"));
        assert_eq!(get("SERVER_NAME"), Some("relay.example"));
        assert_eq!(get("SERVER_PORT"), Some("9009"));
        assert_eq!(get("SERVER_PROTOCOL"), Some("HTTP/1.1"));
        assert_eq!(get("HTTP_X_CUSTOM"), Some("a b, b"), "joined, cleaned");
        assert_eq!(get("CONTENT_TYPE"), Some("text/csv"));
        assert_eq!(get("CONTENT_LENGTH"), Some("3"));
        assert_eq!(get("HTTP_CONTENT_TYPE"), None);
        assert_eq!(get("HTTPS"), None);
        let any = r.environment(&[]);
        assert!(any.contains(&("PATH_INFO".into(), "/chat/room".into())));
        assert_eq!(clean(&"é".repeat(600)).len(), 1024);
    }

    #[test]
    fn the_client_is_the_last_address_no_trusted_proxy_owns() {
        let trusted: Vec<Cidr> = ["127.0.0.1/32", "10.0.0.0/8"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        let with = |headers: &str| request(&format!("GET / HTTP/1.1\r\nHost: h\r\n{headers}\r\n"));
        let client = |headers: &str| {
            with(headers)
                .forwarded(&trusted)
                .map(|f| (f.client.to_string(), f.https))
        };
        assert_eq!(client(""), None);
        assert_eq!(
            client("X-Forwarded-For: 203.0.113.7\r\n"),
            Some(("203.0.113.7:0".into(), false))
        );
        assert_eq!(
            client("X-Forwarded-For: 198.51.100.1, 203.0.113.7, 10.1.2.3\r\nX-Forwarded-Proto: https\r\n"),
            Some(("203.0.113.7:0".into(), true)),
            "a client that sends its own X-Forwarded-For cannot choose its address"
        );
        assert_eq!(
            client("Forwarded: for=\"[2001:db8::1]:4711\";proto=https, for=10.0.0.2\r\n"),
            Some(("[2001:db8::1]:4711".into(), true))
        );
        assert_eq!(
            client("Forwarded: for=192.0.2.60;proto=http;by=203.0.113.43\r\n"),
            Some(("192.0.2.60:0".into(), false))
        );
        assert_eq!(
            client("Forwarded: for=unknown, for=10.0.0.2\r\n"),
            None,
            "an unknown hop stops the search"
        );
        assert_eq!(
            client("X-Forwarded-For: 10.9.9.9, 127.0.0.1\r\n"),
            Some(("10.9.9.9:0".into(), false)),
            "all trusted: the first"
        );
        assert_eq!(
            client("Forwarded: for=192.0.2.1\r\nX-Forwarded-For: 203.0.113.9\r\n"),
            Some(("192.0.2.1:0".into(), false)),
            "Forwarded wins"
        );
    }

    #[test]
    fn the_longest_matching_path_wins() {
        let r = request(GET);
        let paths = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            r.script_name(&paths(&["/", "/chat"])).as_deref(),
            Some("/chat")
        );
        assert_eq!(
            r.script_name(&paths(&["/chat", "/chat/room"])).as_deref(),
            Some("/chat/room")
        );
        assert_eq!(
            r.script_name(&paths(&["/ch"])),
            None,
            "a prefix of a name is not a path above it"
        );
        assert_eq!(r.script_name(&paths(&["/other"])), None);
    }

    #[test]
    fn an_error_answer_says_why_and_closes() {
        let text = String::from_utf8(error_response(
            405,
            "method PATCH",
            &[("Allow", "GET")],
            false,
        ))
        .unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(
            text.contains("\r\nAllow: GET\r\n") && text.contains("\r\nConnection: close\r\n"),
            "{text}"
        );
        let body = "405 Method Not Allowed: method PATCH\n";
        assert!(
            text.ends_with(&format!(
                "Content-Length: {}\r\nConnection: close\r\nAllow: GET\r\n\r\n{body}",
                body.len()
            )),
            "{text}"
        );
        let head = String::from_utf8(error_response(405, "x", &[], true)).unwrap();
        assert!(head.ends_with("\r\n\r\n"), "HEAD gets no body: {head}");
    }
}
