//! `protocol = "http"`: what real clients (curl, Python's http.client) get
//! from a command's output: streamed as it is written, chunked for
//! HTTP/1.1 and ended by the close for 1.0, as Server-Sent Events when
//! asked for; the request's body as the command's stdin; the CGI
//! environment; and an HTTP answer for every error, never a silent close.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// An HTTP service running `command`, with `extra` config lines.
fn http_serve(command: &str, extra: &str) -> (Daemon, SocketAddr) {
    serve(command, &format!("protocol = \"http\"\n{extra}"))
}

/// `splice-relay --check` of a one-service file with `extra` lines: its exit
/// code, what it said, and the file's path.
fn check(extra: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, one_service(&sh("echo"), extra)).unwrap();
    let out = check_config(&path);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), said, path.display().to_string())
}

// --- Streaming ---

#[test]
fn curl_gets_each_line_as_the_command_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let script = format!("echo first; cat {}; echo last", fifo.display());
    let (d, addr) = http_serve(&sh(&script), "");
    let (mut child, mut out, line) = streaming(&url(addr, "/"));
    // The first line arrived while the command still waits for the second:
    // nothing is held back until the end.
    assert_eq!(line, "first\n");
    std::fs::write(&fifo, "second\n").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "second\nlast\n");
    assert!(child.wait().unwrap().success(), "a whole chunked response");
    let r = d.wait_record_where(|r| r.reason == "output-ended");
    assert_eq!((r.bytes, r.exit.as_str()), (18, "0"), "{r}");
}

#[test]
fn http_1_1_is_chunked_and_http_1_0_ends_with_the_close() {
    let (_d, addr) = http_serve(&sh("echo one; echo two"), "");
    let chunked = curl(&url(addr, "/"), &[]);
    assert_eq!(
        (chunked.code, chunked.status()),
        (0, 200),
        "{}",
        chunked.stderr
    );
    assert_eq!(
        chunked.header("Transfer-Encoding").as_deref(),
        Some("chunked")
    );
    assert_eq!(
        chunked.header("Content-Type").as_deref(),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(chunked.text(), "one\ntwo\n");
    let old = curl(&url(addr, "/"), &["--http1.0"]);
    assert_eq!((old.code, old.status()), (0, 200), "{}", old.stderr);
    assert_eq!(old.header("Transfer-Encoding"), None, "{}", old.head);
    assert_eq!(old.text(), "one\ntwo\n");
}

#[test]
fn the_service_s_content_type_is_the_response_s() {
    let (_d, addr) = http_serve(&sh("echo '{}'"), "content_type = \"application/json\"");
    let got = curl(&url(addr, "/"), &[]);
    assert_eq!(
        got.header("Content-Type").as_deref(),
        Some("application/json")
    );
    assert_eq!(got.text(), "{}\n");
}

#[test]
fn python_http_client_reads_the_stream_and_the_cgi_environment() {
    let script = "echo $REQUEST_METHOD $SCRIPT_NAME $PATH_INFO $QUERY_STRING; \
                  echo $CONTENT_TYPE $CONTENT_LENGTH $HTTP_X_TRACE $SERVER_PROTOCOL; cat";
    let (_d, addr) = http_serve(&sh(script), "paths = [\"/run\"]");
    let program = r#"
import http.client, sys, json
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=60)
c.request("POST", "/run/job?x=1", body=b"the body\n", headers={"Content-Type": "text/csv", "X-Trace": "t-1"})
r = c.getresponse()
print(json.dumps({"status": r.status, "chunked": r.chunked, "body": r.read().decode()}))
"#;
    let out = Command::new("python3")
        .args([
            "-c",
            program,
            &addr.ip().to_string(),
            &addr.port().to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], 200);
    assert_eq!(v["chunked"], true);
    assert_eq!(
        v["body"],
        "POST /run /job x=1\ntext/csv 9 t-1 HTTP/1.1\nthe body\n"
    );
}

// --- The request's body ---

#[test]
fn post_bodies_reach_the_command_whole_by_length_and_chunked() {
    let (_d, addr) = http_serve(r#"["sha256sum"]"#, "max_body_size = 200000000");
    let dir = tempfile::tempdir().unwrap();
    for size in [0u64, 1, 100_000_000] {
        let file = dir.path().join(format!("body-{size}"));
        let sum = random_file(&file, size);
        let data = format!("@{}", file.display());
        for framing in [&[][..], &["-H", "Transfer-Encoding: chunked"][..]] {
            let mut args = vec!["--data-binary", &data];
            args.extend_from_slice(framing);
            let got = curl(&url(addr, "/"), &args);
            assert_eq!(
                (got.code, got.status()),
                (0, 200),
                "{size} bytes {framing:?}: {}",
                got.stderr
            );
            assert_eq!(
                got.text(),
                format!("{sum}  -\n"),
                "{size} bytes {framing:?}"
            );
        }
    }
}

#[test]
fn a_body_over_max_body_size_is_refused_with_413() {
    let (d, addr) = http_serve(r#"["cat"]"#, "max_body_size = 10");
    let got = curl(&url(addr, "/"), &["--data-binary", "0123456789A"]);
    assert_eq!(got.status(), 413, "{}", got.head);
    assert!(got.text().contains("max_body_size is 10"), "{}", got.text());
    d.wait_log(&["answered 413"]);
    // Chunked, the size is known only as it comes: the command has started,
    // and the answer is 413 all the same.
    let chunked = curl(
        &url(addr, "/"),
        &[
            "--data-binary",
            "0123456789A",
            "-H",
            "Transfer-Encoding: chunked",
        ],
    );
    assert_eq!(chunked.status(), 413, "{}", chunked.head);
    let r = d.wait_record_where(|r| r.reason == "message-too-big");
    assert!(r.message.contains("max_body_size"), "{r}");
    // Exactly the limit is fine.
    let fits = curl(&url(addr, "/"), &["--data-binary", "0123456789"]);
    assert_eq!(fits.text(), "0123456789");
}

// --- Event streams ---

#[test]
fn an_event_stream_sends_a_line_an_event_and_says_how_it_ended() {
    let (d, addr) = http_serve(&sh(r"printf 'one\\n\\ntwo\\rthree\\nlast'"), "");
    let got = curl(&url(addr, "/"), &["-H", "Accept: text/event-stream"]);
    assert_eq!(
        got.header("Content-Type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(
        got.text(),
        "data: one\n\ndata: \n\ndata: two\ndata: three\n\ndata: last\n\nevent: end\ndata: output-ended\n\n"
    );
    let r = d.wait_record_where(|r| r.reason == "output-ended");
    assert_eq!(r.bytes, 19, "the command's bytes, not the events': {r}");
}

#[test]
fn a_quiet_event_stream_gets_keep_alive_comments() {
    let (_d, addr) = http_serve(&sh("sleep 1; echo late"), "ping_interval = \"200ms\"");
    let got = curl(&url(addr, "/"), &["-H", "Accept: text/event-stream"]);
    let text = got.text();
    let (quiet, after) = text.split_once("data: late\n\n").expect(&text);
    assert!(quiet.matches(": keep-alive\n\n").count() >= 2, "{text}");
    assert_eq!(quiet.replace(": keep-alive\n\n", ""), "", "{text}");
    // The end may come more than a ping_interval after the last line on a
    // loaded machine, with a comment before it.
    assert_eq!(
        after.replace(": keep-alive\n\n", ""),
        "event: end\ndata: output-ended\n\n",
        "{text}"
    );
}

#[test]
fn a_stream_that_keeps_talking_gets_no_keep_alive_comments() {
    // A line every 100 ms for 2 s; a comment only after 1 s of quiet.
    let (_d, addr) = http_serve(
        &sh("for i in $(seq 20); do echo $i; sleep 0.1; done"),
        "ping_interval = \"1s\"",
    );
    let got = curl(&url(addr, "/"), &["-H", "Accept: text/event-stream"]);
    let text = got.text();
    assert_eq!(text.matches("data: ").count(), 21, "{text}");
    assert_eq!(text.matches(": keep-alive").count(), 0, "{text}");
}

// --- HEAD ---

#[test]
fn head_gets_the_headers_alone_and_runs_no_command() {
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("ran");
    let (d, addr) = http_serve(&sh(&format!("touch {}; echo hi", ran.display())), "");
    let got = curl(&url(addr, "/"), &["-I"]);
    assert_eq!((got.code, got.status()), (0, 200), "{}", got.stderr);
    assert_eq!(
        got.header("Content-Type").as_deref(),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(
        got.text(),
        got.head,
        "curl -I prints the head, and nothing came after it"
    );
    let r = d.wait_record_where(|r| r.reason == "headers-only");
    assert_eq!(r.exit, "none", "{r}");
    assert!(!ran.exists(), "the command ran for a HEAD");
}

// --- Errors: an HTTP answer, never a silent close ---

#[test]
fn each_refused_request_gets_its_status_and_refusals_are_logged_in_episodes() {
    let (d, addr) = http_serve(&sh("echo hi"), "paths = [\"/here\"]");
    let cases: [(&[&str], &str, u16); 4] = [
        (&[], "/elsewhere", 404),
        (&["-X", "PATCH"], "/here", 405),
        (&["-H", "Transfer-Encoding: gzip"], "/here", 501),
        (&["-H", "Expect: the-unexpected"], "/here", 417),
    ];
    for (args, path, status) in cases {
        let got = curl(&url(addr, path), args);
        assert_eq!(got.status(), status, "{args:?} {path}: {}", got.head);
        assert!(
            got.text().starts_with(&format!("{status} ")),
            "{}",
            got.text()
        );
    }
    // The first refusal is logged with its answer; the rest are counted.
    d.wait_log(&["answered 404: path /elsewhere is not served"]);
    let patch = curl(&url(addr, "/here"), &["-X", "PATCH"]);
    assert_eq!(
        patch.header("Allow").as_deref(),
        Some("GET, HEAD, POST, PUT")
    );
    let huge = "x".repeat(9000);
    let got = curl(&url(addr, "/here"), &["-H", &format!("X-Huge: {huge}")]);
    assert_eq!(got.status(), 431, "{}", got.head);
    assert!(d.records().is_empty(), "refusals are episodes, not records");
}

#[test]
fn a_malformed_request_gets_400_and_a_slow_one_408() {
    let (d, addr) = http_serve(&sh("echo hi"), "handshake_timeout = \"300ms\"");
    let mut s = connect(addr);
    s.write_all(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
        .unwrap();
    let text = String::from_utf8(read_all(&mut s)).unwrap();
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    let mut slow = connect(addr);
    slow.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    let text = String::from_utf8(read_all(&mut slow)).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{text}"
    );
    d.wait_log(&["answered 400: malformed request"]);
}

#[test]
fn a_command_that_fails_silently_is_502_and_one_that_succeeds_silently_200() {
    let (d, addr) = http_serve(&sh("exit 3"), "");
    let got = curl(&url(addr, "/"), &[]);
    assert_eq!(got.status(), 502, "{}", got.head);
    assert!(got.text().contains("exit 3"), "{}", got.text());
    let r = d.wait_record_where(|r| r.reason == "output-ended");
    assert_eq!(r.exit, "3", "{r}");

    let (_d, addr) = http_serve(&sh("exit 0"), "");
    let got = curl(&url(addr, "/"), &[]);
    assert_eq!((got.code, got.status()), (0, 200), "{}", got.stderr);
    assert!(got.body.is_empty());
}

#[test]
fn a_command_that_cannot_start_is_500() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("gone");
    std::fs::create_dir(&gone).unwrap();
    let (d, addr) = http_serve(
        &sh("echo hi"),
        &format!("working_directory = \"{}\"", gone.display()),
    );
    std::fs::remove_dir(&gone).unwrap();
    let got = curl(&url(addr, "/"), &[]);
    assert_eq!(got.status(), 500, "{}", got.head);
    assert!(got.text().contains("could not be started"));
    d.wait_record_where(|r| r.reason == "spawn-failed");
}

#[test]
fn a_timeout_before_any_output_is_504_and_after_it_a_cut_response() {
    let (d, addr) = http_serve(&sh("sleep 30"), "timeout = \"1s\"");
    let got = curl(&url(addr, "/"), &[]);
    assert_eq!(got.status(), 504, "{}", got.head);
    d.wait_record_where(|r| r.reason == "timeout");

    let (d, addr) = http_serve(&sh("echo partial; sleep 30"), "timeout = \"1s\"");
    let got = curl(&url(addr, "/"), &[]);
    assert_eq!(got.status(), 200);
    assert_eq!(got.text(), "partial\n");
    // No last chunk: curl knows the response is not whole.
    assert_eq!(got.code, 18, "{}", got.stderr);
    d.wait_record_where(|r| r.reason == "timeout");
}

#[test]
fn max_bytes_ends_a_whole_response_at_the_limit() {
    let (d, addr) = http_serve(&sh("yes"), "max_bytes = 1000");
    let got = curl(&url(addr, "/"), &[]);
    assert_eq!((got.code, got.body.len()), (0, 1000), "{}", got.stderr);
    let r = d.wait_record_where(|r| r.reason == "max-bytes");
    assert_eq!(r.bytes, 1000, "{r}");
}

// --- Configuration ---

#[test]
fn http_keys_elsewhere_are_errors_with_their_position() {
    for (extra, key, why) in [
        (
            "content_type = \"text/html\"",
            "content_type",
            "protocol = \"http\"",
        ),
        ("max_body_size = 5", "max_body_size", "protocol = \"http\""),
        (
            "protocol = \"websocket\"\nmax_body_size = 5",
            "max_body_size",
            "protocol = \"http\"",
        ),
        (
            "protocol = \"http\"\nmessages = \"binary\"",
            "messages",
            "protocol = \"websocket\"",
        ),
        (
            "protocol = \"http\"\ntransfer = \"direct\"",
            "transfer",
            "frames the command's output",
        ),
        (
            "protocol = \"http\"\ncontent_type = \"text\"",
            "content_type",
            "a media type",
        ),
    ] {
        let (code, err, path) = check(extra);
        assert_eq!(code, Some(78), "{extra}");
        let at = format!("{path}:");
        assert!(
            err.contains(&at) && err.contains(key) && err.contains(why),
            "{extra}: {err}"
        );
    }
}

// --- The console page: EventSource in a real browser ---

/// Headless Chromium opens an HTTP service's address and gets the console
/// page, whose `EventSource` shows each line and then the end the last
/// event names; curl at the same address gets the output itself.
#[test]
fn the_console_page_watches_the_output_with_eventsource_in_chromium() {
    let (d, addr) = http_serve(&sh("echo one; echo two"), "console = true");
    let (v, shot) = console_watching_in_chromium(&url(addr, "/"), "http-console.png");
    assert_eq!(v["out"], serde_json::json!(["one", "two"]), "{v}");
    assert_eq!(v["closed"], "closed, output-ended", "{v}");
    assert!(std::fs::read(&shot).unwrap().starts_with(b"\x89PNG"));
    d.wait_record_where(|r| r.reason == "page");
    let r = d.wait_record_where(|r| r.reason == "output-ended");
    assert_eq!(r.bytes, 8, "{r}");
    assert_eq!(
        curl(&url(addr, "/"), &[]).text(),
        "one\ntwo\n",
        "curl asks for no HTML"
    );
}

// --- Behind a reverse proxy: Debian's nginx in front ---

/// Debian's nginx, run for one test: `proxy_pass` to the daemon with the
/// usual headers, for HTTP and for WebSocket, on a port of its own.
struct Nginx {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn before(daemon: SocketAddr) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let (probe, addr) = tcp_listener();
        drop(probe);
        let conf = dir.path().join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nerror_log {dir}/error.log warn;\npid {dir}/nginx.pid;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n\
                 server {{\n    listen {addr};\n    location / {{\n\
                 proxy_pass http://{daemon};\n      proxy_http_version 1.1;\n      proxy_buffering off;\n\
                 proxy_set_header Host $host;\n\
                 proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
                 proxy_set_header X-Forwarded-Proto $scheme;\n\
                 proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection $http_connection;\n\
                 }}\n  }}\n}}\n",
                dir = dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (Debian's nginx-light package)");
        let nginx = Nginx {
            child,
            addr,
            _dir: dir,
        };
        // nginx says nothing when it is ready: it is once it accepts.
        let log = nginx._dir.path().join("error.log");
        poll(PATIENCE, || std::net::TcpStream::connect(addr).ok()).unwrap_or_else(|| {
            panic!(
                "nginx is not listening: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Behind nginx, the record, the command's REMOTE_ADDR and the service's
/// rules see the client nginx names (curl at 127.0.0.7), not nginx at
/// 127.0.0.1, nor the address the client forged in its own header; a
/// client that is not a trusted proxy cannot name another.
#[test]
fn behind_nginx_the_client_is_the_one_nginx_names_and_only_nginx_may_name_one() {
    let (d, addr) = http_serve(
        &sh("echo $REMOTE_ADDR $HTTPS; echo $HTTP_X_FORWARDED_FOR"),
        "forwarded_from = [\"127.0.0.1/32\"]\ndeny = [\"127.0.0.9/32\"]",
    );
    let nginx = Nginx::before(addr);
    let from = |ip: &str, target: SocketAddr| {
        curl(
            &url(target, "/"),
            &["--interface", ip, "-H", "X-Forwarded-For: 203.0.113.66"],
        )
    };
    let got = from("127.0.0.7", nginx.addr);
    assert_eq!((got.code, got.status()), (0, 200), "{}", got.stderr);
    assert_eq!(got.text(), "127.0.0.7\n203.0.113.66, 127.0.0.7\n");
    let r = d.wait_record_where(|r| r.reason == "output-ended");
    assert!(r.peer.starts_with("127.0.0.7:"), "{r}");

    // The rules apply to the named client: 403 through nginx.
    let denied = from("127.0.0.9", nginx.addr);
    assert_eq!(denied.status(), 403, "{}", denied.head);
    d.wait_log(&["refused 127.0.0.9:0: not in allow or in deny"]);

    // Straight to the daemon from 127.0.0.7, which is not in
    // forwarded_from: its header is only a variable.
    let direct = from("127.0.0.7", addr);
    assert_eq!(direct.text(), "127.0.0.7\n203.0.113.66\n");
}

/// A WebSocket through nginx (`proxy_pass` with the upgrade's headers):
/// the session works and its record names the client behind nginx.
#[test]
fn a_websocket_behind_nginx_is_recorded_with_the_client_nginx_names() {
    let (passed, addr) = pass_tcp("test");
    let d = Daemon::start(
        &one_service(
            &sh("echo $REMOTE_ADDR; read l; echo got:$l"),
            "protocol = \"websocket\"\nforwarded_from = [\"127.0.0.1/32\"]",
        ),
        vec![passed],
    );
    let nginx = Nginx::before(addr);
    let out = python_ws(
        &format!("ws://{}/", nginx.addr),
        r#"async with websockets.connect(url, local_addr=("127.0.0.7", 0)) as ws:
    first = await ws.recv()
    await ws.send("x")
    print(json.dumps([first, await ws.recv()]))"#,
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v, serde_json::json!(["127.0.0.7", "got:x"]));
    // The client's close may come before the end of output reaches it.
    let r = d.wait_record(1);
    assert!(
        ["output-ended", "client-closed"].contains(&r.reason.as_str()),
        "{r}"
    );
    assert!(r.peer.starts_with("127.0.0.7:"), "{r}");
    assert_eq!(r.messages_received, Some(1), "{r}");
}

// --- Logins ---

/// Files of logins as the tools people use write them: `htpasswd -B`
/// (bcrypt) and `openssl passwd -6` (SHA-512-crypt), and a token file.
struct Logins {
    dir: tempfile::TempDir,
}

const TOKEN: &str = "tok-0123456789abcdef0123";

impl Logins {
    fn new() -> Logins {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("htpasswd");
        let ok = Command::new("htpasswd")
            .args(["-c", "-b", "-B", "-C", "5"])
            .arg(&file)
            .args(["alice", "secret"])
            .output()
            .expect("htpasswd (Debian's apache2-utils package)");
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
        let sha = Command::new("openssl")
            .args(["passwd", "-6", "-salt", "saltsalt", "hunter2"])
            .output()
            .unwrap();
        let line = format!("bob:{}", String::from_utf8(sha.stdout).unwrap());
        let mut htpasswd = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap();
        htpasswd.write_all(line.as_bytes()).unwrap();
        std::fs::write(
            dir.path().join("tokens"),
            format!("# the dashboard\n{TOKEN}\n"),
        )
        .unwrap();
        Logins { dir }
    }

    fn config(&self) -> String {
        let path = |name: &str| self.dir.path().join(name).display().to_string();
        format!(
            "htpasswd = \"{}\"\nbearer_tokens = \"{}\"",
            path("htpasswd"),
            path("tokens")
        )
    }
}

#[test]
fn logins_right_wrong_and_missing_with_curl() {
    let logins = Logins::new();
    let (d, addr) = http_serve(
        &sh("echo user=$REMOTE_USER auth=$AUTH_TYPE"),
        &logins.config(),
    );
    let target = url(addr, "/");
    let alice = curl(&target, &["-u", "alice:secret"]);
    assert_eq!(
        (alice.status(), alice.text().as_str()),
        (200, "user=alice auth=Basic\n"),
        "{}",
        alice.head
    );
    let r = d.wait_record_where(|r| r.reason == "output-ended");
    assert_eq!(r.user, "alice", "{r}");
    let bob = curl(&target, &["-u", "bob:hunter2"]);
    assert_eq!(
        bob.text(),
        "user=bob auth=Basic\n",
        "SHA-512-crypt: {}",
        bob.head
    );
    let bearer = curl(&target, &["-H", &format!("Authorization: Bearer {TOKEN}")]);
    assert_eq!(bearer.text(), "user= auth=Bearer\n", "{}", bearer.head);

    for (what, args) in [
        ("a wrong password", &["-u", "alice:guess"][..]),
        ("an unknown user", &["-u", "mallory:secret"][..]),
        ("no login", &[][..]),
        (
            "a wrong token",
            &["-H", "Authorization: Bearer tok-not-one-of-them-000"][..],
        ),
    ] {
        let got = curl(&target, args);
        assert_eq!(got.status(), 401, "{what}: {}", got.head);
        let challenge = got.header("WWW-Authenticate").unwrap_or_default();
        assert!(
            challenge.starts_with("Basic realm=\"test\"") && challenge.contains("Bearer"),
            "{challenge}"
        );
    }
    // The refusals are one episode in the log, not a line each.
    let first = d.wait_log(&["refused", "reason=\"login\""]);
    assert!(
        first.contains("a wrong password for user \"alice\""),
        "{first}"
    );
    assert_eq!(
        d.log_lines(&["refused 127.0.0.1", "reason=\"login\""])
            .len(),
        1
    );
}

#[test]
fn a_flood_of_wrong_logins_is_slowed_by_rate_per_source() {
    let logins = Logins::new();
    let extra = format!("{}\nrate_per_source = 2", logins.config());
    let (d, addr) = http_serve(&sh("echo in"), &extra);
    // The bucket holds 2 tokens and gains 2 a second: the connection took
    // one and the wrong login the other, so a second try within half a
    // second is refused at admission (429, before its request is read),
    // where without the login's token it would be let in. A pair that a
    // loaded machine spreads wider proves nothing either way: tried again
    // once the bucket is full.
    let statuses = (0..5)
        .find_map(|_| {
            let first = Instant::now();
            let one = curl(&url(addr, "/"), &["-u", "alice:guess"]).status();
            let two = curl(&url(addr, "/"), &["-u", "alice:guess"]).status();
            if two == 429 || first.elapsed() < Duration::from_millis(450) {
                return Some([one, two]);
            }
            std::thread::sleep(Duration::from_millis(1100));
            None
        })
        .expect("no two tries within half a second in five rounds");
    assert_eq!(statuses, [401, 429]);
    d.wait_log(&["reason=\"rate-per-source\""]);
}

#[test]
fn a_flood_of_logins_gets_503_past_what_the_cpus_can_check() {
    // bcrypt at cost 13 takes about half a second of CPU a check.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("htpasswd");
    let made = Command::new("htpasswd")
        .args(["-c", "-b", "-B", "-C", "13"])
        .arg(&file)
        .args(["alice", "secret"])
        .output()
        .unwrap();
    assert!(made.status.success());
    let extra = format!("htpasswd = \"{}\"", file.display());
    let (d, addr) = http_serve(&sh("echo in"), &extra);
    // More at once than a machine of 16 CPUs checks in a second.
    let flood: Vec<_> = (0..48)
        .map(|_| {
            Command::new("curl")
                .args([
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %header{retry-after}",
                ])
                .args(["-u", "alice:guess", &url(addr, "/")])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let answers: Vec<String> = flood
        .into_iter()
        .map(|c| String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap())
        .collect();
    let busy = answers.iter().filter(|a| *a == "503 1").count();
    let wrong = answers.iter().filter(|a| a.starts_with("401")).count();
    assert!(busy > 0, "{answers:?}");
    assert_eq!(busy + wrong, answers.len(), "{answers:?}");
    d.wait_log(&[
        "more logins than CPUs to check them",
        "reason=\"login-busy\"",
    ]);
    // The flood over, the right password gets in.
    let got = curl(&url(addr, "/"), &["-u", "alice:secret"]);
    assert_eq!((got.status(), got.text().as_str()), (200, "in\n"));
}

#[test]
fn a_browser_s_websocket_logs_in_with_a_token_in_the_query() {
    let logins = Logins::new();
    let (passed, addr) = pass_tcp("test");
    let config = one_service(
        &sh("echo hello $AUTH_TYPE"),
        &format!("protocol = \"websocket\"\n{}", logins.config()),
    );
    let d = Daemon::start(&config, vec![passed]);
    let out = python_ws(
        &format!("ws://{addr}/?access_token={TOKEN}"),
        r#"async with websockets.connect(url) as ws:
    print(json.dumps(await ws.recv()))"#,
    );
    assert_eq!(out.trim(), "\"hello Bearer\"");
    let refused = python_ws(
        &format!("ws://{addr}/"),
        r#"try:
    async with websockets.connect(url) as ws:
        print("connected")
except websockets.exceptions.InvalidStatusCode as e:
    print(e.status_code)"#,
    );
    assert_eq!(refused.trim(), "401");
    d.wait_log(&["refused", "no login"]);
}

#[test]
fn a_weak_hash_in_htpasswd_is_a_config_error_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, "carol:$apr1$Qm7sFiZ6$3nsOEkMnV3pFtaLLTRvbH/\n").unwrap();
    let extra = format!("protocol = \"http\"\nhtpasswd = \"{}\"", htpasswd.display());
    let (code, err, _) = check(&extra);
    assert_eq!(code, Some(78));
    assert!(
        err.contains("htpasswd: line 1 (user \"carol\"): an MD5 hash, which is refused: re-hash"),
        "{err}"
    );
}

/// `systemctl reload` re-reads the login files: a password changed in
/// htpasswd takes effect for the next client, and a file broken by the
/// change is refused with its line while the old logins go on.
#[test]
fn a_reload_re_reads_the_login_files() {
    let logins = Logins::new();
    let (passed, addr) = pass_tcp("test");
    let config = one_service(
        &sh("echo in"),
        &format!("protocol = \"http\"\n{}", logins.config()),
    );
    let mut d = Daemon::start(&config, vec![passed]);
    let target = url(addr, "/");
    assert_eq!(curl(&target, &["-u", "alice:secret"]).status(), 200);
    let file = logins.dir.path().join("htpasswd");
    let changed = Command::new("htpasswd")
        .args(["-b", "-B", "-C", "5"])
        .arg(&file)
        .args(["alice", "new-secret"])
        .output()
        .unwrap();
    assert!(changed.status.success());
    d.signal(nix::sys::signal::Signal::SIGHUP);
    d.wait_note("RELOADING=1");
    d.wait_note("READY=1");
    assert_eq!(curl(&target, &["-u", "alice:secret"]).status(), 401);
    assert_eq!(curl(&target, &["-u", "alice:new-secret"]).status(), 200);

    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("carol:plaintext\n");
    std::fs::write(&file, text).unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    d.wait_note("RELOADING=1");
    let ready = d.wait_note("READY=1");
    assert!(ready.contains("reload failed"), "{ready}");
    d.wait_log(&["htpasswd: line 3 (user \"carol\"): plain text"]);
    assert_eq!(
        curl(&target, &["-u", "alice:new-secret"]).status(),
        200,
        "the old logins go on"
    );
}

// --- A CGI header block ---

#[test]
fn a_cgi_header_block_sets_the_status_the_type_and_headers() {
    let script = r"printf 'Status: 404 Not Found\\r\\nContent-Type: application/json\\r\\nX-Job: 7\\r\\nContent-Length: 99\\r\\n\\r\\n{}'";
    let (d, addr) = http_serve(&sh(script), "cgi_headers = true");
    let got = curl(&url(addr, "/"), &[]);
    assert_eq!((got.code, got.status()), (0, 404), "{}", got.stderr);
    assert_eq!(
        got.header("Content-Type").as_deref(),
        Some("application/json")
    );
    assert_eq!(got.header("X-Job").as_deref(), Some("7"));
    assert_eq!(
        got.header("Content-Length"),
        None,
        "the daemon owns the framing"
    );
    assert_eq!(got.text(), "{}");
    let r = d.wait_record_where(|r| r.reason == "output-ended");
    assert_eq!(r.bytes, 2, "the body, not the block: {r}");

    let (_d, addr) = http_serve(
        &sh(r"printf 'Location: /elsewhere\\n\\n'"),
        "cgi_headers = true",
    );
    let got = curl(&url(addr, "/"), &[]);
    assert_eq!(got.status(), 302);
    assert_eq!(got.header("Location").as_deref(), Some("/elsewhere"));
}

#[test]
fn a_bad_or_unfinished_cgi_header_block_is_502() {
    for (script, why) in [
        (
            r"printf 'not a header\\n\\nbody'; sleep 30",
            "without a colon",
        ),
        (
            r"printf 'Status: 200 OK\\nX: y'",
            "ended within its CGI header block",
        ),
    ] {
        let (d, addr) = http_serve(&sh(script), "cgi_headers = true");
        let got = curl(&url(addr, "/"), &[]);
        assert_eq!(got.status(), 502, "{script}: {}", got.head);
        assert!(got.text().contains(why), "{}", got.text());
        d.wait_records(1);
    }
}

// --- Every guarantee of a connection ---

/// A client refused at admission, before its request is read, still gets an
/// HTTP answer: 403 when denied, 429 at max_per_source or a rate (with
/// Retry-After for a rate, and busy_message as what it says).
#[test]
fn admission_refusals_are_http_answers() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let script = format!("echo held; cat {}", fifo.display());
    let extra = "max_per_source = 1\nbusy_message = \"come back later\"\ndeny = [\"127.0.0.9\"]";
    let (_d, addr) = http_serve(&sh(&script), extra);
    // One client holds the source's one place.
    let (mut held, _out, line) = streaming(&url(addr, "/"));
    assert_eq!(line, "held\n");
    let busy = curl(&url(addr, "/"), &[]);
    assert_eq!(busy.status(), 429, "{}", busy.head);
    assert_eq!(busy.text(), "429 Too Many Requests: come back later\n");
    let denied = curl(&url(addr, "/"), &["--interface", "127.0.0.9"]);
    assert_eq!(denied.status(), 403, "{}", denied.head);
    std::fs::write(&fifo, "").unwrap();
    assert!(held.wait().unwrap().success());

    let (_d, addr) = http_serve(&sh("echo hi"), "rate_per_source = 1");
    assert_eq!(curl(&url(addr, "/"), &[]).status(), 200);
    let fast = curl(&url(addr, "/"), &[]);
    assert_eq!(fast.status(), 429, "{}", fast.head);
    assert_eq!(fast.header("Retry-After").as_deref(), Some("1"));
}

/// HTTPS: an HTTP service with a certificate, to curl; the command sees
/// HTTPS=on, and the body streams through the TLS layer (or the kernel's).
#[test]
fn an_http_service_over_tls_serves_curl() {
    let pki = Pki::new();
    let extra = format!("{}max_body_size = 10000", pki.tls_lines());
    let (_d, addr) = http_serve(&sh("echo https=$HTTPS; cat"), &extra);
    let url = format!("https://localhost:{}/", addr.port());
    let resolve = format!("localhost:{}:127.0.0.1", addr.port());
    let ca = pki.file("ca.pem");
    let got = curl(
        &url,
        &[
            "--cacert",
            &ca,
            "--resolve",
            &resolve,
            "--data-binary",
            "over tls",
        ],
    );
    assert_eq!((got.code, got.status()), (0, 200), "{}", got.stderr);
    assert_eq!(got.text(), "https=on\nover tls");
}

/// A shared command's HTTP clients: each is one more viewer, with its own
/// response; the command goes on for the others when one leaves.
#[test]
fn a_shared_command_serves_http_clients_as_viewers() {
    let (d, addr) = http_serve(
        &sh("i=0; while [ $i -lt 3 ]; do echo tick $i; i=$((i+1)); sleep 0.2; done"),
        "shared = true\nlinger = \"0s\"",
    );
    let a = Command::new("curl")
        .args([
            "-sS",
            "-N",
            "-H",
            "Accept: text/event-stream",
            &url(addr, "/"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&a.stdout);
    assert!(
        text.starts_with("data: tick 0\n\n") && text.contains("event: end\n"),
        "{text}"
    );
    let r = d.wait_record_where(|r| r.reason == "output-ended");
    assert!(r.instance.is_some(), "a viewer of the shared command: {r}");
}
