//! `protocol = "websocket"`: what real clients (Python's websockets, node's
//! ws, curl) get, every close path with its code and record, and the protocol
//! edge cases only a hand-written client can send.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::*;

/// A WebSocket service running `command`, with `extra` config lines.
fn ws_serve(command: &str, extra: &str) -> (Daemon, SocketAddr) {
    serve(command, &format!("protocol = \"websocket\"\n{extra}"))
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("ws://{addr}{path}")
}

/// The record of the connection whose client port is `port`.
fn record_of(d: &Daemon, port: u16) -> Record {
    d.wait_record_where(|r| r.peer_port() == port)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

/// The record of the only connection so far that a client closed.
fn record_with(d: &Daemon, reason: &str) -> Record {
    d.wait_record_where(|r| r.reason == reason)
}

// --- Real clients ---

#[test]
fn text_lines_go_both_ways_with_python_websockets() {
    let (d, addr) = ws_serve(
        &sh("echo hello; echo world; while read l; do echo got:$l; done"),
        "",
    );
    let out = python_ws(
        &url(addr, "/"),
        r#"async with websockets.connect(url) as ws:
    got = [await ws.recv(), await ws.recv()]
    await ws.send("a")
    got.append(await ws.recv())
    await ws.send("b\nc")
    got += [await ws.recv(), await ws.recv()]
print(json.dumps({"got": got, "code": ws.close_code}))"#,
    );
    let v = json(&out);
    assert_eq!(
        v["got"],
        serde_json::json!(["hello", "world", "got:a", "got:b", "got:c"]),
        "a message with a newline is two lines"
    );
    assert_eq!(
        v["code"], 1000,
        "the client's close is answered with its code"
    );
    let r = record_with(&d, "client-closed");
    assert!(r.message.contains("close code 1000"), "{r}");
    assert_eq!(
        (r.messages_sent, r.messages_received),
        (Some(5), Some(2)),
        "{r}"
    );
    assert_eq!((r.bytes, r.bytes_received), (25, 4), "payloads: {r}");
}

#[test]
fn the_end_of_output_closes_with_1000_after_the_last_line() {
    let (d, addr) = ws_serve(&sh(r"printf 'one\\ntwo\\r\\n\\nlast'"), "");
    let out = python_ws(
        &url(addr, "/"),
        r#"async with websockets.connect(url) as ws:
    got = [m async for m in ws]
print(json.dumps({"got": got, "code": ws.close_code}))"#,
    );
    let v = json(&out);
    assert_eq!(v["got"], serde_json::json!(["one", "two", "", "last"]));
    assert_eq!(v["code"], 1000);
    let r = record_with(&d, "output-ended");
    r.assert_ended("output-ended", "0");
    assert_eq!((r.messages_sent, r.messages_received), (Some(4), Some(0)));
}

/// Binary output reaches node's ws whole and in order, in messages no
/// larger than `max_message_size`: spliced from a pipe (the default) and
/// copied from a socket pair.
#[test]
fn binary_output_arrives_whole_with_node_ws() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    let want = random_file(&file, 9_000_000);
    for transfer in ["splice", "socketpair"] {
        let (d, addr) = ws_serve(
            &format!(r#"["cat", "{}"]"#, file.display()),
            &format!("messages = \"binary\"\ntransfer = \"{transfer}\"\nmax_message_size = 300000"),
        );
        let out = node_ws(
            &url(addr, "/"),
            r#"const WebSocket = require('ws'); const crypto = require('crypto');
const ws = new WebSocket(process.argv[1]); const h = crypto.createHash('sha256');
let n = 0, msgs = 0, largest = 0;
ws.on('message', (d, binary) => { if (!binary) throw new Error('a text message');
  h.update(d); n += d.length; msgs++; largest = Math.max(largest, d.length); });
ws.on('close', (code) => console.log(JSON.stringify({n, msgs, largest, code, sha: h.digest('hex')})));"#,
        );
        let v = json(&out);
        assert_eq!(v["sha"], want.as_str(), "{transfer}: {v}");
        assert_eq!(
            (v["n"].as_u64(), v["code"].as_u64()),
            (Some(9_000_000), Some(1000))
        );
        assert!(v["largest"].as_u64().unwrap() <= 300_000, "{transfer}: {v}");
        let r = record_with(&d, "output-ended");
        assert_eq!(r.bytes, 9_000_000, "{r}");
        assert_eq!(r.messages_sent, v["msgs"].as_u64(), "{r}");
    }
}

/// Binary messages reach the command's stdin as they are, nothing added.
#[test]
fn binary_messages_reach_stdin_unchanged() {
    let (d, addr) = ws_serve(r#"["cat"]"#, "messages = \"binary\"");
    let out = node_ws(
        &url(addr, "/"),
        r#"const WebSocket = require('ws');
const parts = [Buffer.from([0, 10, 255, 13, 10]), Buffer.from('line\n'), Buffer.alloc(70000, 7)];
const sent = Buffer.concat(parts); const got = [];
const ws = new WebSocket(process.argv[1]);
ws.on('open', () => parts.forEach((p) => ws.send(p)));
ws.on('message', (d) => { got.push(d); if (Buffer.concat(got).length >= sent.length) ws.close(1000); });
ws.on('close', (code) => console.log(JSON.stringify({same: Buffer.concat(got).equals(sent), code})));"#,
    );
    let v = json(&out);
    assert_eq!(
        (v["same"].as_bool(), v["code"].as_u64()),
        (Some(true), Some(1000)),
        "{v}"
    );
    let r = record_with(&d, "client-closed");
    assert_eq!(
        (r.messages_received, r.bytes_received),
        (Some(3), 70010),
        "{r}"
    );
}

#[test]
fn the_command_gets_the_requests_cgi_variables() {
    let (d, addr) = ws_serve(
        r#"["env"]"#,
        "paths = [\"/chat\"]\nenv = { HTTP_X_OPERATOR = \"set\" }",
    );
    let out = python_ws(
        &url(addr, "/chat/room?x=1&y=2"),
        r#"headers = {"X-Custom": "a\tb", "X-Operator": "client", "Remote-Addr": "192.0.2.1"}
async with websockets.connect(url, extra_headers=headers) as ws:
    got = [m async for m in ws]
print(json.dumps(got))"#,
    );
    let lines: Vec<String> = serde_json::from_str(out.trim()).unwrap();
    let get = |k: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in {lines:?}"))
            .to_owned()
    };
    assert_eq!(get("REQUEST_METHOD"), "GET");
    assert_eq!(get("REQUEST_URI"), "/chat/room?x=1&y=2");
    assert_eq!(get("SCRIPT_NAME"), "/chat");
    assert_eq!(get("PATH_INFO"), "/room");
    assert_eq!(get("QUERY_STRING"), "x=1&y=2");
    assert_eq!(get("SERVER_NAME"), "127.0.0.1");
    assert_eq!(get("SERVER_PORT"), addr.port().to_string());
    assert_eq!(get("SERVER_PROTOCOL"), "HTTP/1.1");
    assert_eq!(
        get("HTTP_X_CUSTOM"),
        "a b",
        "control characters become spaces"
    );
    assert_eq!(
        get("HTTP_X_OPERATOR"),
        "set",
        "the service's env wins over a header"
    );
    assert_eq!(get("REMOTE_ADDR"), "127.0.0.1", "the peer's variables win");
    assert_eq!(get("HTTP_REMOTE_ADDR"), "192.0.2.1");
    assert!(get("HTTP_USER_AGENT").contains("websockets"));
    record_with(&d, "output-ended");
}

// --- The handshake ---

/// Every request that is not a valid upgrade gets its HTTP answer, no
/// command runs, no record is written, and the refusals are logged in an
/// episode; a valid one from an allowed origin is upgraded.
#[test]
fn bad_upgrades_get_their_http_answer_and_no_command() {
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("ran");
    let (d, addr) = ws_serve(
        &sh(&format!("touch {}; echo hi", mark.display())),
        "paths = [\"/chat\"]\nallowed_origins = [\"https://app.example\"]\nhandshake_timeout = \"1s\"",
    );
    let upgrade = |extra: &str| upgrade_request("/chat", extra);
    let cases: Vec<(&str, String, u16)> = vec![
        ("POST", upgrade("").replacen("GET", "POST", 1), 405),
        (
            "version 8",
            upgrade("").replace("Version: 13", "Version: 8"),
            426,
        ),
        (
            "no key",
            upgrade("").replace("Sec-WebSocket-Key", "X-Key"),
            400,
        ),
        ("HTTP/1.0", upgrade("").replace("HTTP/1.1", "HTTP/1.0"), 400),
        ("another path", upgrade_request("/other", ""), 404),
        (
            "a path that only starts alike",
            upgrade_request("/chatty", ""),
            404,
        ),
        (
            "another site",
            upgrade("Origin: http://evil.example\r\n"),
            403,
        ),
        (
            "a listed site, wrong scheme",
            upgrade("Origin: http://app.example\r\n"),
            403,
        ),
        (
            "headers over 8 KiB",
            upgrade(&format!("X-Big: {}\r\n", "b".repeat(9000))),
            431,
        ),
        ("70 headers", upgrade(&"X-N: 1\r\n".repeat(70)), 431),
        (
            "not HTTP",
            "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03\r\n\r\n".into(),
            400,
        ),
    ];
    for (what, request, want) in &cases {
        let (status, head) = http(addr, request.as_bytes());
        assert_eq!(status, *want, "{what}: {head}");
        assert!(head.contains("Connection: close"), "{what}: {head}");
    }
    // A plain GET, from a real client: 426, with the header that says what to use.
    let curl = Command::new("curl")
        .args(["-s", "-i", &format!("http://{addr}/chat")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&curl.stdout);
    assert!(
        text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
        "{text}"
    );
    assert!(text.contains("\r\nUpgrade: websocket\r\n"), "{text}");

    // One byte a second never completes a request: 408 at handshake_timeout.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(PATIENCE)).unwrap();
    let started = std::time::Instant::now();
    let request = upgrade("");
    let mut answer = Vec::new();
    for byte in request.as_bytes() {
        if slow.write_all(&[*byte]).is_err() || !nothing_yet(&slow) {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    std::io::Read::read_to_end(&mut slow, &mut answer).ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // A client that leaves before its request is complete.
    let mut gone = TcpStream::connect(addr).unwrap();
    gone.write_all(b"GET /chat HTTP/1.1\r\n").unwrap();
    drop(gone);

    let ended = d.wait_log(&["refusals ended", "reason=\"handshake\""]);
    let refused = log_field(&ended, "refused")
        .unwrap()
        .parse::<usize>()
        .unwrap();
    assert_eq!(refused, cases.len() + 3, "{ended}");
    // The episode's first refusal is logged with what it was answered (which
    // one is first is the daemon's tasks' race).
    let first = d.wait_log(&["refused", "reason=\"handshake\"", "WARN"]);
    assert!(first.contains(": answered 4"), "{first}");
    assert!(!mark.exists(), "a refused client ran the command");
    assert!(d.records().is_empty(), "{:?}", d.records());

    // Allowed: a listed origin, and the service's own (Host and Origin agree).
    let (status, _) = http(addr, upgrade("Origin: https://app.example\r\n").as_bytes());
    assert_eq!(status, 101);
    let out = python_ws(
        &url(addr, "/chat"),
        &format!(
            "async with websockets.connect(url, origin='http://{addr}') as ws:\n    print(await ws.recv())"
        ),
    );
    assert_eq!(out.trim(), "hi");
    assert!(mark.exists());
}

/// Admission comes first: a denied client gets no handshake, only the HTTP
/// answer that says so (403), sent before its request is read.
#[test]
fn admission_rules_apply_before_the_handshake() {
    let (d, addr) = ws_serve(&sh("echo hi"), "deny = [\"127.0.0.1\"]");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let _ = s.write_all(upgrade_request("/", "").as_bytes());
    let (got, _) = read_until_end(&mut s);
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text:?}");
    assert!(!text.contains("101"), "{text:?}");
    d.wait_log(&["refused", "reason=\"denied\""]);
}

// --- The frames no real client sends ---

/// A text service that echoes each line, with messages of at most 1000 bytes.
fn echo() -> (Daemon, SocketAddr) {
    ws_serve(
        &sh("while read l; do echo got:$l; done"),
        "max_message_size = 1000",
    )
}

#[test]
fn fragments_and_control_frames_between_them_make_one_message() {
    let (d, addr) = echo();
    let mut c = Frames::connect(addr, "/");
    c.send(false, TEXT, b"frag");
    c.send(true, PING, b"p1");
    c.send(false, CONTINUATION, b"men");
    c.send(true, CONTINUATION, b"ted");
    let pong = c.read().unwrap();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (PONG, &b"p1"[..]));
    assert_eq!(c.text(), "got:fragmented");
    c.send(true, BINARY, b"bin");
    assert_eq!(
        c.text(),
        "got:bin",
        "a binary message is a line too, in text mode"
    );
    c.send(true, CLOSE, &[0x03, 0xe8, b'b', b'y', b'e']);
    assert_eq!(c.close_code(), Some(1000));
    assert!(c.ended());
    let r = record_of(&d, c.stream.local_addr().unwrap().port());
    assert_eq!(r.reason, "client-closed", "{r}");
    assert_eq!(
        (r.messages_received, r.messages_sent),
        (Some(2), Some(2)),
        "{r}"
    );
}

/// Each invalid frame closes with its code; the record says why.
#[test]
fn invalid_frames_close_with_the_code_that_fits() {
    let (d, addr) = echo();
    let mask = Some([1, 2, 3, 4]);
    let cases: Vec<(&str, Vec<Vec<u8>>, u16, &str)> = vec![
        (
            "unmasked",
            vec![encode(true, TEXT, b"x", None, 0)],
            1002,
            "protocol-error",
        ),
        (
            "reserved bit",
            vec![encode(true, TEXT, b"x", mask, 0b100)],
            1002,
            "protocol-error",
        ),
        (
            "reserved data opcode",
            vec![encode(true, 0x3, b"x", mask, 0)],
            1002,
            "protocol-error",
        ),
        (
            "reserved control opcode",
            vec![encode(true, 0xb, b"", mask, 0)],
            1002,
            "protocol-error",
        ),
        (
            "continuation first",
            vec![encode(true, CONTINUATION, b"x", mask, 0)],
            1002,
            "protocol-error",
        ),
        (
            "a new message inside a fragmented one",
            vec![
                encode(false, TEXT, b"a", mask, 0),
                encode(true, TEXT, b"b", mask, 0),
            ],
            1002,
            "protocol-error",
        ),
        (
            "fragmented ping",
            vec![encode(false, PING, b"x", mask, 0)],
            1002,
            "protocol-error",
        ),
        (
            "ping over 125 bytes",
            vec![encode(true, PING, &[0; 126], mask, 0)],
            1002,
            "protocol-error",
        ),
        (
            "frame over max_message_size",
            vec![encode(true, BINARY, &[0; 1001], mask, 0)],
            1009,
            "message-too-big",
        ),
        (
            "fragments over max_message_size",
            vec![
                encode(false, BINARY, &[0; 600], mask, 0),
                encode(true, CONTINUATION, &[0; 600], mask, 0),
            ],
            1009,
            "message-too-big",
        ),
        (
            "invalid UTF-8",
            vec![encode(true, TEXT, b"\xff\xfe", mask, 0)],
            1007,
            "invalid-utf8",
        ),
        (
            "UTF-8 cut across fragments",
            vec![
                encode(false, TEXT, b"\xe2\x82", mask, 0),
                encode(true, CONTINUATION, b"(", mask, 0),
            ],
            1007,
            "invalid-utf8",
        ),
    ];
    for (what, frames, code, reason) in cases {
        let mut c = Frames::connect(addr, "/");
        for f in frames {
            c.send_raw(f);
        }
        assert_eq!(c.close_code(), Some(code), "{what}");
        assert!(
            c.ended(),
            "{what}: the connection is closed after the close frame"
        );
        let r = record_of(&d, c.stream.local_addr().unwrap().port());
        assert_eq!(r.reason, reason, "{what}: {r}");
        assert_eq!(r.messages_received, Some(0), "{what}: {r}");
    }
}

/// RFC 6455 5.2: the most significant bit of a 64-bit payload length must
/// be 0. A header with it set breaks the protocol (1002); one without it is
/// only too big (1009).
#[test]
fn a_length_with_its_top_bit_set_is_a_protocol_error() {
    let (d, addr) = echo();
    for (length, code, reason) in [
        ((1u64 << 63) | 5, 1002, "protocol-error"),
        (1u64 << 62, 1009, "message-too-big"),
    ] {
        let mut c = Frames::connect(addr, "/");
        let mut header = vec![0x80 | BINARY, 0x80 | 127];
        header.extend_from_slice(&length.to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        c.send_raw(header);
        assert_eq!(c.close_code(), Some(code), "length {length:#x}");
        assert!(c.ended(), "length {length:#x}");
        let r = record_of(&d, c.stream.local_addr().unwrap().port());
        assert_eq!(r.reason, reason, "length {length:#x}: {r}");
        if code == 1002 {
            assert!(r.message.contains("most significant bit"), "{r}");
        }
    }
}

#[test]
fn a_close_without_a_frame_or_with_a_bad_code_ends_the_session() {
    let (d, addr) = echo();
    // A close code no endpoint may send (RFC 6455 7.4) fails the
    // connection: it is answered with 1002, and the record names the code
    // the client sent. A valid code, 1002 itself included, is the client's
    // close, answered with its code.
    for (payload, answer, reason, detail) in [
        (
            &999u16.to_be_bytes()[..],
            1002,
            "protocol-error",
            "close code 999",
        ),
        (
            &1005u16.to_be_bytes()[..],
            1002,
            "protocol-error",
            "close code 1005",
        ),
        (
            &5000u16.to_be_bytes()[..],
            1002,
            "protocol-error",
            "close code 5000",
        ),
        (
            b"\x03\xeaProtocol violation",
            1002,
            "client-closed",
            "close code 1002",
        ),
        (
            &4000u16.to_be_bytes()[..],
            4000,
            "client-closed",
            "close code 4000",
        ),
    ] {
        let mut c = Frames::connect(addr, "/");
        c.send(true, CLOSE, payload);
        assert_eq!(c.close_code(), Some(answer), "{detail}");
        assert!(c.ended(), "{detail}");
        let r = record_of(&d, c.stream.local_addr().unwrap().port());
        assert_eq!(r.reason, reason, "{r}");
        assert!(r.message.contains(detail), "{r}");
    }
    // A client that just closes its socket.
    let c = Frames::connect(addr, "/");
    let port = c.stream.local_addr().unwrap().port();
    drop(c);
    let r = record_of(&d, port);
    assert_eq!(r.reason, "client-gone", "{r}");
    assert!(r.message.contains("without a close frame"), "{r}");
}

// --- Liveness ---

/// Pings come every ping_interval and an answered one keeps the session;
/// a client that stops answering is gone, and its command ended.
#[test]
fn pings_keep_a_live_client_and_find_a_dead_one() {
    // Long enough for a loaded machine to answer each ping in time.
    let (d, addr) = ws_serve(&sh("exec sleep 60"), "ping_interval = \"500ms\"");
    let mut live = Frames::connect(addr, "/");
    for n in 1u64..=3 {
        let ping = live.read().unwrap();
        assert_eq!(
            (ping.opcode, &ping.payload),
            (PING, &n.to_be_bytes().to_vec())
        );
        live.send(true, PONG, &ping.payload);
    }
    live.send(true, CLOSE, &[0x03, 0xe8]);
    assert_eq!(live.close_code(), Some(1000));
    let r = record_of(&d, live.stream.local_addr().unwrap().port());
    assert_eq!(r.reason, "client-closed", "{r}");

    let mut dead = Frames::connect(addr, "/");
    let ping = dead.read().unwrap();
    assert_eq!(ping.opcode, PING);
    // Not answered: the next ping finds it gone; nothing more is sent to it.
    assert!(dead.ended());
    let r = record_of(&d, dead.stream.local_addr().unwrap().port());
    r.assert_ended("ping-timeout", "SIGTERM");
}

/// A client that floods pings and reads nothing holds the daemon's memory
/// by no more than a few buffers, is found dead by the pings it never gets
/// to answer, and another client is served meanwhile.
#[test]
fn a_ping_flood_that_never_reads_is_bounded_and_ended() {
    let (d, addr) = ws_serve(
        &sh("echo hello; while read l; do echo got:$l; done"),
        "ping_interval = \"500ms\"",
    );
    let rss_before = rss_kib(d.pid());
    let flood = Frames::connect(addr, "/");
    let port = flood.stream.local_addr().unwrap().port();
    let mut stream = flood.stream.try_clone().unwrap();
    let flooder = std::thread::spawn(move || {
        let ping = encode(true, PING, b"flood", Some([9, 9, 9, 9]), 0);
        let burst: Vec<u8> = ping
            .iter()
            .copied()
            .cycle()
            .take(ping.len() * 10_000)
            .collect();
        let mut sent = 0usize;
        while stream.write_all(&burst).is_ok() {
            sent += 10_000;
            if sent >= 2_000_000 {
                break;
            }
        }
        sent
    });
    let out = python_ws(
        &url(addr, "/"),
        "async with websockets.connect(url) as ws:\n    first = await ws.recv()\n    await ws.send('x')\n    print(first, await ws.recv())",
    );
    assert_eq!(
        out.trim(),
        "hello got:x",
        "another client is served meanwhile"
    );
    let r = record_of(&d, port);
    assert_eq!(r.reason, "ping-timeout", "{r}");
    let sent = flooder.join().unwrap();
    assert!(
        sent < 2_000_000,
        "the daemon stopped reading the flood (sent {sent} pings)"
    );
    let grown = rss_kib(d.pid()).saturating_sub(rss_before);
    assert!(grown < 20_000, "the daemon grew by {grown} KiB");
}

/// A client that never reads an endless output: the daemon stops reading
/// the command's output (it blocks on its pipe), holds no more than its
/// buffers, and the unanswered pings end it.
#[test]
fn a_client_that_never_reads_is_ended_by_its_pings() {
    let (d, addr) = ws_serve(
        r#"["yes", "a line of output"]"#,
        "ping_interval = \"300ms\"",
    );
    let rss_before = rss_kib(d.pid());
    let c = Frames::connect(addr, "/");
    let r = record_of(&d, c.stream.local_addr().unwrap().port());
    assert_eq!(r.reason, "ping-timeout", "{r}");
    let grown = rss_kib(d.pid()).saturating_sub(rss_before);
    assert!(grown < 20_000, "the daemon grew by {grown} KiB");
    drop(c);
}

// --- Limits, the stop, reload ---

/// Each limit closes with its code and reason, as the client sees it.
#[test]
fn limits_close_with_their_code() {
    let waiting = r#"try:
    while True:
        got.append(await ws.recv())
except websockets.ConnectionClosed:
    pass
print(json.dumps({"got": got, "code": ws.close_code, "reason": ws.close_reason}))"#;
    let cases = [
        // Long enough for the handshake, the spawn and the first line on
        // a loaded machine.
        ("timeout = \"1s\"", "timeout", 1008, "timeout"),
        (
            "idle_timeout = \"1s\"",
            "idle-timeout",
            1008,
            "idle_timeout",
        ),
    ];
    for (limit, reason, code, said) in cases {
        let (d, addr) = ws_serve(&sh("echo hi; exec sleep 60"), limit);
        let out = python_ws(
            &url(addr, "/"),
            &format!("got = []\nws = await websockets.connect(url)\n{waiting}"),
        );
        let v = json(&out);
        assert_eq!(v["got"], serde_json::json!(["hi"]), "{limit}");
        assert_eq!(
            (v["code"].as_u64(), v["reason"].as_str()),
            (Some(code), Some(said)),
            "{limit}"
        );
        record_with(&d, reason).assert_ended(reason, "SIGTERM");
    }
    // max_bytes counts payload: the client gets that much, then 1000.
    let (d, addr) = ws_serve(
        &sh(r"printf 'hello\\nworld\\n'; exec sleep 60"),
        "max_bytes = 7",
    );
    let out = python_ws(
        &url(addr, "/"),
        &format!("got = []\nws = await websockets.connect(url)\n{waiting}"),
    );
    let v = json(&out);
    assert_eq!(v["got"], serde_json::json!(["hello", "wo"]));
    assert_eq!(
        (v["code"].as_u64(), v["reason"].as_str()),
        (Some(1000), Some("max_bytes reached"))
    );
    let r = record_with(&d, "max-bytes");
    assert_eq!((r.bytes, r.messages_sent), (7, Some(2)), "{r}");
}

/// Messages either way are activity: a client that keeps talking outlives
/// idle_timeout; one that stops does not.
#[test]
fn messages_count_as_activity_for_idle_timeout() {
    let (d, addr) = ws_serve(
        &sh("while read l; do echo got:$l; done"),
        "idle_timeout = \"1s\"",
    );
    let out = python_ws(
        &url(addr, "/"),
        r#"ws = await websockets.connect(url)
loop = asyncio.get_running_loop()
start = loop.time()
for i in range(16):
    await ws.send(str(i))
    assert await ws.recv() == "got:" + str(i)
    await asyncio.sleep(0.1)
lived = loop.time() - start
try:
    await ws.recv()
except websockets.ConnectionClosed:
    pass
print(json.dumps({"lived": lived, "code": ws.close_code}))"#,
    );
    let v = json(&out);
    assert!(v["lived"].as_f64().unwrap() > 1.5, "{v}");
    assert_eq!(v["code"], 1008);
    record_with(&d, "idle-timeout");
}

/// The stop: sessions get shutdown_timeout, then close 1001.
#[test]
fn the_stop_closes_sessions_with_1001() {
    let (passed, addr) = pass_tcp("test");
    let config = format!(
        "shutdown_timeout = \"200ms\"\n{}",
        one_service(&sh("echo hi; exec sleep 60"), "protocol = \"websocket\"")
    );
    let mut d = Daemon::start(&config, vec![passed]);
    let mut c = Frames::connect(addr, "/");
    assert_eq!(c.text(), "hi");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    let close = c.next().unwrap();
    assert_eq!(close.close_code(), Some(1001));
    assert_eq!(&close.payload[2..], b"the server is stopping");
    c.send(true, CLOSE, &close.payload[..2]);
    assert!(c.ended());
    record_with(&d, "shutdown");
    assert!(d.wait_exit().success());
}

/// A reload applies to new sessions; a session already open goes on as it was.
#[test]
fn a_reload_applies_to_new_sessions_only() {
    let (mut d, addr) = ws_serve(&sh("echo old; while read l; do echo old:$l; done"), "");
    let mut before = Frames::connect(addr, "/");
    assert_eq!(before.text(), "old");
    let config = one_service(
        &sh("echo new; while read l; do echo new:$l; done"),
        "protocol = \"websocket\"",
    );
    std::fs::write(&d.config_path, config).unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    d.wait_note("READY=1");
    let mut after = Frames::connect(addr, "/");
    assert_eq!(after.text(), "new");
    before.send(true, TEXT, b"still");
    assert_eq!(before.text(), "old:still");
    for mut c in [before, after] {
        c.send(true, CLOSE, &[0x03, 0xe8]);
        assert_eq!(c.close_code(), Some(1000));
    }
    d.wait_records_where(2, |r| r.reason == "client-closed");
}

/// The command could not start after the upgrade: close 1011 and the reason.
#[test]
fn a_command_that_cannot_start_closes_with_1011() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("gone");
    std::fs::create_dir(&gone).unwrap();
    let (d, addr) = ws_serve(
        &sh("echo hi"),
        &format!("working_directory = \"{}\"", gone.display()),
    );
    std::fs::remove_dir(&gone).unwrap();
    let mut c = Frames::connect(addr, "/");
    let close = c.read().unwrap();
    assert_eq!(close.close_code(), Some(1011));
    assert!(String::from_utf8_lossy(&close.payload[2..]).contains("could not be started"));
    let r = record_with(&d, "spawn-failed");
    assert_eq!(r.exit, "none", "{r}");
}

// --- The page ---

#[test]
fn console_page_is_served_to_a_plain_get() {
    let (d, addr) = ws_serve(&sh("echo hi"), "console = true");
    let out = Command::new("curl")
        .args(["-s", "-i", &format!("http://{addr}/any/path")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.contains("Content-Type: text/html; charset=utf-8\r\n"),
        "{text}"
    );
    assert!(
        text.contains("<title>splice-relay console</title>"),
        "{text}"
    );
    assert!(!text.contains("src=\"http"), "no external assets");
    let r = record_with(&d, "page");
    assert_eq!((r.pid, r.exit.as_str()), (0, "none"), "no command: {r}");
    // Without console, the same GET is told to upgrade.
    let (d2, addr2) = ws_serve(&sh("echo hi"), "");
    let (status, _) = http(
        addr2,
        format!("GET / HTTP/1.1\r\nHost: {addr2}\r\n\r\n").as_bytes(),
    );
    assert_eq!(status, 426);
    drop(d2);
}

/// The page in a real browser (headless Chromium, driven over the DevTools
/// protocol): the command's lines appear, a typed line reaches the command,
/// and the end shows. The screenshot is kept in target/test-artifacts.
#[test]
fn the_console_page_works_in_chromium() {
    let (d, addr) = ws_serve(
        &sh("echo ready; while read l; do echo you said: $l; done"),
        "console = true",
    );
    let (v, shot) = console_in_chromium(&format!("http://{addr}/"), "console.png", &[]);
    assert_eq!(
        v["out"],
        serde_json::json!(["ready", "you said: hello from the browser"]),
        "{v}"
    );
    assert!(
        v["closed"].as_str().unwrap().starts_with("closed, 1000"),
        "{v}"
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5_000,
        "{} bytes",
        png.len()
    );
    d.wait_record_where(|r| r.reason == "page");
    let r = record_with(&d, "client-closed");
    assert_eq!(
        (r.messages_sent, r.messages_received),
        (Some(2), Some(1)),
        "{r}"
    );
}
