//! Clients that leave while their command is quiet: the daemon notices
//! without waiting for the command to write (TCP keepalive probes after the
//! client's end), so their places and commands come back; a client that
//! only half-closed and still reads is not mistaken for one that left.

use std::io::{BufRead, BufReader, Read};
use std::net::{Shutdown, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

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
