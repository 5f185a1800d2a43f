//! The console page (`console = true`): a small self-contained page that a
//! browser opening the service's address gets. For a WebSocket service it
//! connects back, shows the output live and sends what is typed as lines of
//! input; for an HTTP service it watches the output as Server-Sent Events
//! until the last event says how it ended.

use std::os::fd::OwnedFd;

use tokio::io::unix::AsyncFd;

use super::request::close_gently;
use crate::fdio;

const PAGE: &str = include_str!("console.html");

/// What the page connects back with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Console {
    WebSocket,
    Events,
}

/// The page, as the service's clients get it.
fn page(console: Console) -> String {
    match console {
        Console::WebSocket => PAGE.to_owned(),
        Console::Events => PAGE.replacen(
            r#"const mode = "websocket";"#,
            r#"const mode = "events";"#,
            1,
        ),
    }
}

/// Sends the page and closes the connection.
pub async fn serve(socket: &AsyncFd<OwnedFd>, console: Console) {
    let page = page(console);
    let connect = match console {
        Console::WebSocket => "ws: wss:",
        Console::Events => "'self'",
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src {connect}\r\n\
         Connection: close\r\n\r\n",
        page.len()
    );
    let _ = fdio::write_all(socket, head.as_bytes(), |_| {}).await;
    let _ = fdio::write_all(socket, page.as_bytes(), |_| {}).await;
    close_gently(socket);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_service_s_page_watches_events() {
        assert!(page(Console::WebSocket).contains(r#"const mode = "websocket";"#));
        let events = page(Console::Events);
        assert!(events.contains(r#"const mode = "events";"#));
        assert!(!events.contains(r#"const mode = "websocket";"#));
    }
}
