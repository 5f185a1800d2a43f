//! HTTP for `protocol = "http"`: a command's output streamed to curl, a
//! browser's `EventSource` or any HTTP client, with the request's body as
//! its stdin and the request as its CGI environment; and the request
//! parsing the WebSocket upgrade shares.
//!
//! - `request`: a request's head, read within bounds of size, count and
//!   time and parsed by httparse; the CGI environment; plain error answers.
//! - `opening`: an HTTP service's request, read and checked (method, path,
//!   body framing and size) before any command runs, then answered (HEAD,
//!   the page) or taken.
//! - `body`: the request body's decoding (length or chunked), and the
//!   response's encoding (chunks, events).
//! - `session`: the response in progress, and its end.
//! - `cgi`: a command's CGI header block (`cgi_headers = true`).
//! - `login`: `htpasswd` and `bearer_tokens`, checked before any answer.
//! - `console`: the page a browser gets with `console = true` (WebSocket
//!   and HTTP services both).

mod body;
mod cgi;
pub mod console;
pub mod login;
mod opening;
pub mod request;
mod session;

pub use opening::{accept, check, Asked, NoResponse, Opened};
pub use session::Session;

/// When the command cannot start: 500, best effort, without waiting, and
/// the connection closed.
pub fn fail_unserved(socket: &tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>, why: &str) {
    let _ = nix::unistd::write(
        socket.get_ref(),
        &request::error_response(500, why, &[], false),
    );
    request::close_gently(socket);
}

/// When the service is at its `max_connections`: 503 with `Retry-After`,
/// best effort, without waiting, and the connection closed.
pub fn fail_busy(socket: &tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>, max: usize) {
    let why = format!("at max_connections ({max})");
    let headers = [("Retry-After", "1")];
    let _ = nix::unistd::write(
        socket.get_ref(),
        &request::error_response(503, &why, &headers, false),
    );
    request::close_gently(socket);
}
