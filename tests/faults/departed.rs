//! Clients that leave while their command is quiet: the daemon notices
//! without waiting for the command to write (TCP keepalive probes after the
//! client's end), so their places and commands come back; a client that
//! only half-closed and still reads is not mistaken for one that left. And
//! clients that leave before their command starts: counted in an episode,
//! not recorded one by one.

use std::io::{BufRead, BufReader, Read};
use std::net::{Shutdown, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::left_before_count;

/// Clients that connect to `addr`, read the first line, then close with a
/// FIN timeout of one second (TCP_LINGER2), so their kernel forgets them
/// soon after: Linux's default is 60 s, which the probes wait out the same way.
fn leave(addr: SocketAddr, clients: usize) {
    let script = format!(
        "import socket\n\
         socks = [socket.create_connection(('127.0.0.1', {port})) for _ in range({clients})]\n\
         for s in socks:\n    \
             f = s.makefile('rb')\n    \
             assert f.readline() == b'ready\\n'\n    \
             s.setsockopt(socket.IPPROTO_TCP, socket.TCP_LINGER2, 1)\n    \
             f.close()\n    \
             s.close()\n",
        port = addr.port()
    );
    let out = Command::new(PYTHON)
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn clients_that_leave_a_quiet_command_give_their_places_back() {
    let quiet = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(quiet.path(), "ready\n").unwrap();
    let (tail, tail_addr) = pass_tcp("tail");
    let (half, half_addr) = pass_tcp("half");
    let config = format!(
        "[[service]]\nname = \"tail\"\ncommand = [\"tail\", \"-f\", \"{}\"]\n\
         max_connections = 4\nkill_grace = \"300ms\"\n\
         [[service]]\nname = \"half\"\ncommand = {}\n",
        quiet.path().display(),
        sh("echo ready; sleep 12; echo late")
    );
    let d = Daemon::start(&config, vec![tail, half]);

    // A client that half-closes and reads on, past two probes: still served.
    let reader = std::thread::spawn(move || {
        let conn = connect(half_addr);
        let mut lines = BufReader::new(&conn);
        let mut first = String::new();
        lines.read_line(&mut first).unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        let mut rest = String::new();
        lines.read_to_string(&mut rest).unwrap();
        (first, rest)
    });

    // Every place of the quiet service taken, by clients that then leave.
    leave(tail_addr, 4);
    let left = Instant::now();
    let mut next = connect(tail_addr);
    next.set_read_timeout(Some(Duration::from_secs(25)))
        .unwrap();
    let mut line = [0u8; 6];
    let got = next.read_exact(&mut line);
    let waited = left.elapsed();
    assert!(
        got.is_ok() && &line == b"ready\n",
        "a new client waited {waited:?} for a place held by clients that left: {got:?}"
    );
    let gone = d.wait_records_where(4, |r| r.service == "tail");
    for r in &gone {
        assert_eq!(r.reason, "client-gone", "{r}");
    }
    eprintln!("a place came back {waited:?} after its client left");

    let (first, rest) = reader.join().unwrap();
    assert_eq!((first.as_str(), rest.as_str()), ("ready\n", "late\n"));
    let r = d.wait_record_where(|r| r.service == "half");
    r.assert_ended("output-ended", "0");
}

/// Clients that leave between their TLS handshake and their command (they
/// wait for the place a first client holds, and leave with a reset; the
/// banner meant for them finds them gone) are counted in one episode of
/// departures: no record each, one line when they start leaving and one
/// with their count once they stop. The first client and a probe after
/// them, which got their commands, have a record each.
#[test]
fn clients_that_leave_before_their_command_are_counted_not_recorded() {
    const LEAVERS: usize = 5;
    let pki = Pki::new();
    let extra = format!(
        "{}banner = \"hello\\n\"\nmax_connections = 1",
        pki.tls_lines()
    );
    let (d, addr) = serve(&sh("echo ready; exec sleep 60"), &extra);
    let script = format!(
        r#"import struct
ctx = ssl.create_default_context(cafile=ca)
def tls():
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    return ctx.wrap_socket(raw, server_hostname="localhost")
def upto(s, end):
    data = b""
    while not data.endswith(end):
        chunk = s.recv(100)
        if not chunk:
            break
        data += chunk
    return data
def reset(s):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
first = tls()
assert upto(first, b"ready\n") == b"hello\nready\n"
leavers = [tls() for _ in range({LEAVERS})]
# Their handshakes are done on the daemon's side too: they wait for the place.
time.sleep(1)
for s in leavers:
    reset(s)
# The daemon sees them leave, then the place frees.
time.sleep(1)
reset(first)
probe = tls()
print(upto(probe, b"ready\n").decode(), end="")
reset(probe)
"#
    );
    let out = python_tls(addr, &pki, &script);
    assert_eq!(out, "hello\nready\n", "the probe is served");

    let ended = d.wait_log(&["client(s) left before their command started"]);
    let counted = left_before_count(&ended);
    assert_eq!(counted, LEAVERS, "{ended}");
    let firsts = d.log_lines(&["left before its command started"]);
    assert_eq!(firsts.len(), 1, "{firsts:?}");
    let records = d.wait_records(2);
    for r in &records {
        assert_eq!((r.reason.as_str(), r.pid > 0), ("client-gone", true), "{r}");
    }
    let all = d.records();
    assert_eq!(
        all.len(),
        2,
        "a record for a client that left unserved: {all:?}"
    );
}
