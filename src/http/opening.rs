//! An HTTP service's request, before any command starts: read within
//! bounds, checked (method, path, how its body is framed and how large),
//! answered with an error where it cannot be served; a HEAD request is
//! answered with the headers alone, and no command.

use std::os::fd::OwnedFd;

use tokio::io::unix::AsyncFd;

use super::body::Body;
use super::cgi::CgiHead;
use super::console::{self, Console};
use super::request::{self, answer, close_gently, NoRequest, Request};
use crate::config::Http;
use crate::fdio;

/// The methods served; the command sees which in `REQUEST_METHOD`.
const ALLOW: &str = "GET, HEAD, POST, PUT";

/// A request to serve with the command's output.
#[derive(Debug)]
pub struct Opened {
    /// The CGI variables for the command.
    pub env: Vec<(String, String)>,
    /// What the client sent after its request's head (the body's start).
    pub leftover: Vec<u8>,
    /// The request's body, still to read (the command's stdin).
    pub body: Body,
    pub response: Response,
}

/// How the response is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// HTTP/1.1: chunked (so a cut response is told from a whole one);
    /// HTTP/1.0: ended by the close.
    pub chunked: bool,
    /// `text/event-stream`, asked for in `Accept`: each line an event.
    pub events: bool,
}

/// Why no command runs for the connection (an HTTP request, or a WebSocket
/// upgrade).
#[derive(Debug)]
pub enum NoResponse {
    /// Answered with `status`, and `why` for the log.
    Answered { status: u16, why: String },
    /// A HEAD request got the headers alone.
    Head,
    /// A browser's GET got the console page.
    Page,
    /// The client left, sent nothing usable, or was too slow.
    Gone(String),
}

impl From<NoRequest> for NoResponse {
    fn from(no: NoRequest) -> NoResponse {
        match no {
            NoRequest::Answered { status, why } => NoResponse::Answered { status, why },
            NoRequest::Gone(why) => NoResponse::Gone(why),
        }
    }
}

/// A request read and checked, not yet answered: the connection may still
/// refuse it (the client a proxy names, a login).
#[derive(Debug)]
pub struct Asked {
    pub request: Request,
    leftover: Vec<u8>,
    body: Body,
    response: Response,
}

/// Checks a request read by `request::read` (which knows whether it came
/// over TLS); one that cannot be served is answered now.
pub async fn check(
    socket: &AsyncFd<OwnedFd>,
    http: &Http,
    request: Request,
    leftover: Vec<u8>,
) -> Result<Asked, NoResponse> {
    match decide(&request, http) {
        Ok((body, response)) => Ok(Asked {
            request,
            leftover,
            body,
            response,
        }),
        Err(Refusal { status, why, allow }) => {
            let headers: &[(&str, &str)] = if allow { &[("Allow", ALLOW)] } else { &[] };
            Err(answer(socket, status, why, headers).await.into())
        }
    }
}

/// Answers a request the connection takes: a HEAD with the headers alone,
/// a browser with the console page (`console = true`); else the response
/// is to stream, and a client that waits for `100 Continue` gets it.
pub async fn accept(
    socket: &AsyncFd<OwnedFd>,
    http: &Http,
    asked: Asked,
) -> Result<Opened, NoResponse> {
    let Asked {
        request,
        leftover,
        body,
        response,
    } = asked;
    if http.console && wants_page(&request) {
        console::serve(socket, Console::Events).await;
        return Err(NoResponse::Page);
    }
    if request.method == "HEAD" {
        let head = head(http, response, 200);
        let _ = fdio::write_all(socket, head.as_bytes(), |_| {}).await;
        close_gently(socket);
        return Err(NoResponse::Head);
    }
    if !body.is_done() && request.has_token("Expect", "100-continue") {
        // The client waits for this before it sends its body.
        fdio::write_all(socket, b"HTTP/1.1 100 Continue\r\n\r\n", |_| {})
            .await
            .map_err(|e| NoResponse::Gone(format!("writing 100 Continue: {}", e.desc())))?;
    }
    Ok(Opened {
        env: request.environment(&http.paths),
        leftover,
        body,
        response,
    })
}

/// A browser opening the address: a GET that takes HTML, not events.
fn wants_page(r: &Request) -> bool {
    r.method == "GET" && accepts(r, "text/html") && !accepts(r, "text/event-stream")
}

/// Whether the request's `Accept` names the media type `kind`.
fn accepts(r: &Request, kind: &str) -> bool {
    r.header("Accept").is_some_and(|accept| {
        accept.split(',').any(|k| {
            let k = k.split(';').next().unwrap_or("").trim();
            k.eq_ignore_ascii_case(kind)
        })
    })
}

/// The response's head: the status, the content type, how the body ends.
pub fn head(http: &Http, response: Response, status: u16) -> String {
    let cgi = CgiHead {
        status,
        content_type: None,
        headers: Vec::new(),
    };
    head_as(http, response, &cgi)
}

/// The head, as a command's CGI header block asks (its status, its type
/// unless events were asked for, its other headers).
pub fn head_as(http: &Http, response: Response, cgi: &CgiHead) -> String {
    let content_type = match (response.events, &cgi.content_type) {
        (true, _) => "text/event-stream",
        (false, Some(own)) => own,
        (false, None) => &http.content_type,
    };
    let framing = match response.chunked {
        true => "Transfer-Encoding: chunked\r\n",
        false => "",
    };
    let status = cgi.status;
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\n{framing}\
         Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\n\
         X-Accel-Buffering: no\r\nConnection: close\r\n",
        request::reason(status)
    );
    for (name, value) in &cgi.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head
}

#[derive(Debug)]
struct Refusal {
    status: u16,
    why: String,
    /// The answer carries `Allow`.
    allow: bool,
}

fn refuse(status: u16, why: impl Into<String>) -> Refusal {
    Refusal {
        status,
        why: why.into(),
        allow: false,
    }
}

/// What a request asks, checked: its body's framing, and the response's.
fn decide(r: &Request, http: &Http) -> Result<(Body, Response), Refusal> {
    if !ALLOW.split(", ").any(|m| m == r.method) {
        return Err(Refusal {
            status: 405,
            why: format!("method {}", r.method),
            allow: true,
        });
    }
    if r.script_name(&http.paths).is_none() {
        return Err(refuse(404, format!("path {} is not served", r.path)));
    }
    let body = body(r, http.max_body_size)?;
    if let Some(expect) = r.header("Expect") {
        if !expect.eq_ignore_ascii_case("100-continue") {
            return Err(refuse(417, format!("Expect: {expect}")));
        }
    }
    let events = accepts(r, "text/event-stream");
    let response = Response {
        chunked: r.version >= 1,
        events,
    };
    Ok((body, response))
}

/// How the request's body is framed (RFC 9112 section 6.3), and whether it
/// fits `max_body_size`. A request with both framings, or with lengths that
/// disagree, is refused: a proxy in front might read it the other way.
fn body(r: &Request, max: u64) -> Result<Body, Refusal> {
    let length = r.header("Content-Length");
    if let Some(coding) = r.header("Transfer-Encoding") {
        if r.version == 0 {
            return Err(refuse(400, "Transfer-Encoding in an HTTP/1.0 request"));
        }
        if length.is_some() {
            return Err(refuse(400, "both Transfer-Encoding and Content-Length"));
        }
        if !coding.eq_ignore_ascii_case("chunked") {
            return Err(refuse(
                501,
                format!("Transfer-Encoding: {coding} (chunked is read)"),
            ));
        }
        return Ok(Body::chunked());
    }
    let Some(length) = length else {
        return Ok(Body::none());
    };
    // Repeated, the values are joined with ", ": all must be the same.
    let mut values = length.split(',').map(str::trim);
    let first = values.next().unwrap_or("");
    let n = first
        .parse::<u64>()
        .ok()
        .filter(|_| first.bytes().all(|b| b.is_ascii_digit()) && values.all(|v| v == first))
        .ok_or_else(|| refuse(400, format!("Content-Length: {length}")))?;
    if n > max {
        return Err(refuse(
            413,
            format!("a body of {n} bytes; max_body_size is {max}"),
        ));
    }
    Ok(if n == 0 {
        Body::none()
    } else {
        Body::Length(n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(paths: &[&str]) -> Http {
        Http {
            paths: paths.iter().map(|p| p.to_string()).collect(),
            content_type: "text/plain; charset=utf-8".into(),
            ping_interval: std::time::Duration::from_secs(30),
            max_body_size: 100,
            console: false,
            cgi_headers: false,
        }
    }

    fn request(text: &str) -> Request {
        let mut headers = [httparse::EMPTY_HEADER; request::MAX_HEADERS];
        let mut r = httparse::Request::new(&mut headers);
        r.parse(text.as_bytes()).unwrap();
        Request::of(&r, false)
    }

    fn status(text: &str, http: &Http) -> u16 {
        match decide(&request(text), http) {
            Ok(_) => 200,
            Err(refusal) => refusal.status,
        }
    }

    #[test]
    fn each_bad_request_gets_its_status() {
        let any = http(&[]);
        let get = |extra: &str| format!("GET /x HTTP/1.1\r\nHost: h\r\n{extra}\r\n");
        assert_eq!(status(&get(""), &any), 200);
        assert_eq!(status("PATCH /x HTTP/1.1\r\n\r\n", &any), 405);
        assert_eq!(status("DELETE /x HTTP/1.1\r\n\r\n", &any), 405);
        assert_eq!(status(&get(""), &http(&["/y"])), 404);
        assert_eq!(status(&get(""), &http(&["/x"])), 200);
        assert_eq!(status(&get("Content-Length: 101\r\n"), &any), 413);
        assert_eq!(status(&get("Content-Length: 100\r\n"), &any), 200);
        assert_eq!(status(&get("Content-Length: -1\r\n"), &any), 400);
        assert_eq!(status(&get("Content-Length: +5\r\n"), &any), 400);
        assert_eq!(
            status(&get("Content-Length: 5\r\nContent-Length: 6\r\n"), &any),
            400
        );
        assert_eq!(
            status(&get("Content-Length: 5\r\nContent-Length: 5\r\n"), &any),
            200
        );
        assert_eq!(status(&get("Transfer-Encoding: gzip\r\n"), &any), 501);
        assert_eq!(
            status(
                &get("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"),
                &any
            ),
            400
        );
        assert_eq!(
            status(
                "POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                &any
            ),
            400
        );
        assert_eq!(status(&get("Expect: 100-continue\r\n"), &any), 200);
        assert_eq!(status(&get("Expect: something\r\n"), &any), 417);
    }

    #[test]
    fn the_response_is_chunked_for_1_1_and_events_when_asked() {
        let decided = |text: &str| decide(&request(text), &http(&[])).unwrap();
        let (body, response) = decided("POST / HTTP/1.1\r\nContent-Length: 7\r\n\r\n");
        assert_eq!(body, Body::Length(7));
        assert_eq!(
            response,
            Response {
                chunked: true,
                events: false
            }
        );
        let (body, response) =
            decided("GET / HTTP/1.0\r\nAccept: text/html, text/event-stream;q=0.9\r\n\r\n");
        assert_eq!(body, Body::Done);
        assert_eq!(
            response,
            Response {
                chunked: false,
                events: true
            }
        );
        let (body, _) = decided("PUT / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n");
        assert_eq!(body, Body::chunked());
    }

    #[test]
    fn the_head_names_the_type_and_the_framing() {
        let head = head(
            &http(&[]),
            Response {
                chunked: true,
                events: false,
            },
            200,
        );
        assert!(head.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nTransfer-Encoding: chunked\r\n"), "{head}");
        assert!(head.ends_with("Connection: close\r\n\r\n"));
        let events = super::head(
            &http(&[]),
            Response {
                chunked: false,
                events: true,
            },
            200,
        );
        assert!(
            events.contains("Content-Type: text/event-stream\r\n") && !events.contains("chunked"),
            "{events}"
        );
    }
}
