//! The one end policy (`src/end.rs`): the same cause ends a connection the
//! same way on every transport and protocol. One daemon per cause serves
//! the same command three ways at once: raw TCP, TLS (encrypted in the
//! daemon, or by the kernel where it has kTLS) and WebSocket, each with a
//! real client (a socket, Python's ssl, Python's websockets). For each it
//! checks the record (reason, how the command exited, when) and what the
//! client saw: the rest of the output and an orderly end (end-of-file, a
//! close_notify, close 1000), or a cut (no close_notify, 1001 or 1008).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

/// `kill_grace` of every service here: long enough that "at once" and
/// "after kill_grace" cannot be mistaken for each other.
const GRACE_MS: u64 = 3000;

/// What the client does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Client {
    /// Reads until the daemon ends the connection.
    ReadsAll,
    /// Reads one line (one message), then leaves without a word.
    Leaves,
}

/// How the client saw the connection end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// An orderly end after the whole output: end-of-file, a close_notify,
    /// close 1000.
    Complete,
    /// The daemon cut it: no close_notify, or close 1001/1008. (A raw
    /// client cannot tell a cut from a complete end: both are end-of-file.)
    Cut,
    /// The client left first.
    Left,
}

/// One cause, and how every protocol must end after it.
struct Case {
    name: &'static str,
    command: String,
    extra: &'static str,
    client: Client,
    /// The record's reason and the command's exit.
    reason: &'static str,
    exit: &'static str,
    /// The command exits by itself: the record comes at least this late.
    at_least_ms: u64,
    /// The record comes before this (the command was not given kill_grace).
    before_ms: u64,
    seen: Seen,
}

fn cases() -> Vec<Case> {
    let tick = sh("while :; do echo tick; sleep 0.05; done");
    vec![
        Case {
            name: "the output ends",
            command: sh("echo one; echo two; exec >&-; sleep 0.5"),
            extra: "",
            client: Client::ReadsAll,
            reason: "output-ended",
            exit: "0",
            at_least_ms: 500,
            before_ms: 500 + GRACE_MS / 2,
            seen: Seen::Complete,
        },
        Case {
            name: "max_bytes",
            command: tick.clone(),
            extra: "max_bytes = 20\n",
            client: Client::ReadsAll,
            reason: "max-bytes",
            exit: "SIGTERM",
            at_least_ms: 0,
            before_ms: GRACE_MS / 2,
            seen: Seen::Complete,
        },
        Case {
            name: "timeout",
            command: sh("echo one; sleep 30"),
            extra: "timeout = \"1s\"\n",
            client: Client::ReadsAll,
            reason: "timeout",
            exit: "SIGTERM",
            at_least_ms: 1000,
            before_ms: 1000 + GRACE_MS / 2,
            seen: Seen::Cut,
        },
        Case {
            name: "idle_timeout",
            command: sh("echo one; sleep 30"),
            extra: "idle_timeout = \"1s\"\n",
            client: Client::ReadsAll,
            reason: "idle-timeout",
            exit: "SIGTERM",
            at_least_ms: 1000,
            before_ms: 1000 + GRACE_MS / 2,
            seen: Seen::Cut,
        },
        Case {
            name: "the client leaves",
            command: tick,
            extra: "",
            client: Client::Leaves,
            reason: "client-gone",
            exit: "SIGTERM",
            at_least_ms: 0,
            before_ms: GRACE_MS / 2,
            seen: Seen::Left,
        },
    ]
}

const PROTOCOLS: [&str; 3] = ["raw", "tls", "websocket"];

/// A daemon serving `command` three ways, one socket each.
fn three_ways(pki: &Pki, command: &str, extra: &str, top: &str) -> (Daemon, [SocketAddr; 3]) {
    let mut config = top.to_owned();
    let mut passed = Vec::new();
    let mut addrs = Vec::new();
    for name in PROTOCOLS {
        let (p, addr) = pass_tcp(name);
        passed.push(p);
        addrs.push(addr);
        let how = match name {
            "tls" => format!(
                "tls_certificate = \"{}\"\ntls_key = \"{}\"\n",
                pki.file("server.pem"),
                pki.file("server-key.pem")
            ),
            "websocket" => "protocol = \"websocket\"\nstdin = \"null\"\n".to_owned(),
            _ => String::new(),
        };
        config.push_str(&format!(
            "[[service]]\nname = \"{name}\"\ncommand = {command}\nkill_grace = \"{GRACE_MS}ms\"\n{extra}{how}\n"
        ));
    }
    (Daemon::start(&config, passed), addrs.try_into().unwrap())
}

/// Runs the client of `protocol` against `addr`; returns what it saw.
fn client(protocol: &str, addr: SocketAddr, pki: &Pki, how: Client) -> Seen {
    match protocol {
        "raw" => raw_client(addr, how),
        "tls" => tls_client(addr, pki, how),
        _ => ws_client(addr, how),
    }
}

fn raw_client(addr: SocketAddr, how: Client) -> Seen {
    let stream = connect(addr);
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    if how == Client::Leaves {
        return Seen::Left;
    }
    let (_, error) = read_until_end(&mut reader);
    // A raw client cannot tell a cut from a complete end; a reset it can.
    match error {
        None => Seen::Complete,
        Some(_) => Seen::Cut,
    }
}

fn tls_client(addr: SocketAddr, pki: &Pki, how: Client) -> Seen {
    let leaves = how == Client::Leaves;
    let out = python_tls(
        addr,
        pki,
        &format!(
            r#"ctx = ssl.create_default_context(cafile=ca)
# Debian's Python ignores an end without close_notify by default; here it
# is the very thing to see.
ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost", suppress_ragged_eofs=False)
s.recv(1)
if {leaves}:
    s.close()
    print("left")
    sys.exit(0)
try:
    while s.recv(65536):
        pass
    print("complete")
except (ssl.SSLEOFError, ConnectionResetError):
    print("cut")
except ssl.SSLError as e:
    print("cut" if "UNEXPECTED_EOF" in str(e) else repr(e))
"#,
            leaves = if leaves { "True" } else { "False" }
        ),
    );
    seen(out.trim())
}

fn ws_client(addr: SocketAddr, how: Client) -> Seen {
    let leaves = how == Client::Leaves;
    let out = python_ws(
        &format!("ws://{addr}/"),
        &format!(
            r#"ws = await websockets.connect(url)
await ws.recv()
if {leaves}:
    ws.transport.abort()
    print("left")
    return
try:
    async for message in ws:
        pass
except websockets.ConnectionClosed:
    pass
print("complete" if ws.close_code == 1000 else "cut" if ws.close_code in (1001, 1008) else f"code {{ws.close_code}}")"#,
            leaves = if leaves { "True" } else { "False" }
        ),
    );
    seen(out.trim())
}

fn seen(said: &str) -> Seen {
    match said {
        "complete" => Seen::Complete,
        "cut" => Seen::Cut,
        "left" => Seen::Left,
        other => panic!("the client said {other:?}"),
    }
}

#[test]
fn the_same_cause_ends_the_same_way_on_every_transport_and_protocol() {
    let pki = Pki::new();
    let mut failures = Vec::new();
    for case in cases() {
        let (d, addrs) = three_ways(&pki, &case.command, case.extra, "");
        let (pki, how) = (&pki, case.client);
        let seen: Vec<Seen> = std::thread::scope(|s| {
            let runs: Vec<_> = PROTOCOLS
                .iter()
                .zip(addrs)
                .map(|(p, addr)| s.spawn(move || client(p, addr, pki, how)))
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        for (protocol, seen) in PROTOCOLS.iter().zip(seen) {
            let r = d.wait_record_where(|r| r.service == *protocol);
            let mut wrong = Vec::new();
            if (r.reason.as_str(), r.exit.as_str()) != (case.reason, case.exit) {
                wrong.push(format!("ended {} with exit {}", r.reason, r.exit));
            }
            if r.duration_ms < case.at_least_ms || r.duration_ms >= case.before_ms {
                wrong.push(format!(
                    "its record came after {} ms, not in [{}, {}) ms",
                    r.duration_ms, case.at_least_ms, case.before_ms
                ));
            }
            // A raw client sees end-of-file for a cut as well.
            let expected = match (*protocol, case.seen) {
                ("raw", Seen::Cut) => seen,
                _ => case.seen,
            };
            if seen != expected {
                wrong.push(format!("the client saw {seen:?}, not {:?}", case.seen));
            }
            if !wrong.is_empty() {
                failures.push(format!(
                    "{} on {protocol}: {}\n  {r}",
                    case.name,
                    wrong.join("; ")
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The stop: every connection is cut at `shutdown_timeout` the same way,
/// its command signalled at once (not given kill_grace).
#[test]
fn the_stop_ends_every_protocol_the_same_way() {
    let pki = Pki::new();
    let ledger = tempfile::NamedTempFile::new().unwrap();
    let command = sh(&format!(
        "echo started >> {}; echo one; sleep 30",
        ledger.path().display()
    ));
    let top = "shutdown_timeout = \"200ms\"\n";
    let (mut d, addrs) = three_ways(&pki, &command, "", top);
    let pki = &pki;
    let seen: Vec<Seen> = std::thread::scope(|s| {
        let runs: Vec<_> = PROTOCOLS
            .iter()
            .zip(addrs)
            .map(|(p, addr)| s.spawn(move || client(p, addr, pki, Client::ReadsAll)))
            .collect();
        let started = poll(PATIENCE, || {
            let n = std::fs::read_to_string(ledger.path())
                .unwrap()
                .lines()
                .count();
            (n == PROTOCOLS.len()).then_some(())
        });
        assert!(started.is_some(), "three commands did not start");
        let stop = Instant::now();
        d.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(d.wait_exit().success());
        let took = stop.elapsed();
        assert!(
            took < Duration::from_millis(200 + GRACE_MS / 2),
            "the stop took {took:?}: the commands were given kill_grace"
        );
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (protocol, seen) in PROTOCOLS.iter().zip(seen) {
        let r = d.wait_record_where(|r| r.service == *protocol);
        r.assert_ended("shutdown", "SIGTERM");
        if *protocol != "raw" {
            assert_eq!(seen, Seen::Cut, "{protocol}: {r}");
        }
    }
}
