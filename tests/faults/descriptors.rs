//! Out of descriptors: with RLIMIT_NOFILE low, connections that cannot get
//! their descriptors fail with a record, accept failures pause the listener
//! without spinning, and everything recovers once descriptors come back.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

/// The lowest descriptor number `pid` does not use: the next one it gets
/// (the least of a few looks, as in [`Daemon::steady_fd_count`]).
fn lowest_free_fd(pid: i32) -> i32 {
    (0..5)
        .map(|i| {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(10));
            }
            let used: Vec<i32> = fd_targets(pid).into_iter().map(|(n, _)| n).collect();
            (0..).find(|n| !used.contains(n)).unwrap()
        })
        .min()
        .unwrap()
}

/// Sets RLIMIT_NOFILE's soft and hard limits of a running process.
fn set_nofile_to(pid: i32, soft: i32, hard: i32) {
    let out = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={soft}:{hard}"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// A daemon started with RLIMIT_NOFILE 64 (soft and hard) and more
/// concurrent connections than that allows:
/// - the connection whose command cannot get its descriptors waits (the
///   daemon says so once) until a running connection ends, then is served;
///   none is closed for it;
/// - the only connection, when even it cannot get them (the limit set just
///   above the next free fd), has nothing to wait for: a spawn-failed record;
/// - with the table full (the limit lowered to the next free fd), accept
///   fails: logged once, retried without spinning (CPU under 20% of the
///   episode), while the connections it has are served on;
/// - when they end, waiting clients are taken and a new client is served;
///   descriptors and pipes are back to the baseline, no child is left.
#[test]
fn running_out_of_descriptors_makes_clients_wait_not_fail() {
    let (passed, addr) = pass_tcp("fds");
    let config = one_service(
        r#"["sh", "-c", "echo up; exec cat"]"#,
        "stdin = \"client\"\nmax_connections = 200",
    );
    let mut d = Daemon::spawn(
        &config,
        vec![passed],
        Options {
            nofile: Some(64),
            ..Options::default()
        },
    );
    d.wait_note("READY=1");
    let pid = d.pid();
    let nofile = limits(pid, "Max open files");
    assert_eq!(nofile, ("64".into(), "64".into()));

    /// Connects and reads the greeting: Some(stream) if served, None if
    /// the daemon closed the connection without output.
    fn greeted(addr: SocketAddr) -> Option<TcpStream> {
        let mut s = connect(addr);
        match read_line(&mut s).as_str() {
            "up\n" => Some(s),
            "" => None,
            other => panic!("unexpected {other:?}"),
        }
    }
    /// Connects; Ok(stream) once greeted, Err(stream) once the daemon says
    /// connections wait for descriptors and this one has no greeting.
    fn greeted_or_waiting(d: &Daemon, addr: SocketAddr) -> Result<TcpStream, TcpStream> {
        let s = connect(addr);
        let deadline = Instant::now() + PATIENCE;
        loop {
            assert!(Instant::now() < deadline, "neither greeted nor waiting");
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut b = [0u8; 3];
            match s.peek(&mut b) {
                Ok(3) => {
                    let mut s = s;
                    s.set_read_timeout(Some(PATIENCE)).unwrap();
                    assert_eq!(read_line(&mut s), "up\n");
                    return Ok(s);
                }
                Ok(0) => panic!("closed without a greeting"),
                _ => {}
            }
            if !d.log_lines(&["out of descriptors"]).is_empty() && nothing_yet(&s) {
                s.set_read_timeout(Some(PATIENCE)).unwrap();
                return Err(s);
            }
        }
    }
    fn ping(s: &TcpStream, i: usize) {
        let mut w = s;
        writeln!(w, "ping {i}").unwrap();
        let mut line = String::new();
        let mut r = BufReader::new(s);
        r.read_line(&mut line).unwrap();
        assert_eq!(line, format!("ping {i}\n"));
    }
    fn finish(s: TcpStream) {
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        (&s).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }

    // Warm-up and baseline.
    finish(greeted(addr).unwrap());
    d.wait_records(1);
    let baseline = d.fd_baseline();
    let mut conns = 1;

    // A. Connections until one's command cannot get its descriptors: it
    // waits, and is served once another connection ends.
    let mut held = Vec::new();
    let mut waiting = loop {
        assert!(held.len() < 64, "64 connections fit in 64 descriptors?");
        conns += 1;
        match greeted_or_waiting(&d, addr) {
            Ok(s) => held.push(s),
            Err(s) => break s,
        }
    };
    let said = d.log_lines(&["out of descriptors"]);
    eprintln!(
        "fds: baseline {baseline:?}, {} connections held with the limit at 64 ({} fds); then: {said:?}",
        held.len(),
        d.fd_count()
    );
    assert_eq!(said.len(), 1, "{said:?}");
    for (i, s) in held.iter().enumerate() {
        ping(s, i);
    }
    assert!(nothing_yet(&waiting), "served without descriptors");
    finish(held.pop().unwrap());
    assert_eq!(
        read_line(&mut waiting),
        "up\n",
        "not served once descriptors came back"
    );
    d.wait_log(&["descriptors are back: 1 connection(s) waited"]);
    held.push(waiting);
    assert!(
        d.records().iter().all(|r| r.reason != "spawn-failed"),
        "{:?}",
        d.records()
    );

    // B. The only connection: nothing will give descriptors back, so it
    // fails with a record rather than wait.
    let held_now = held.len();
    for s in held.drain(..) {
        finish(s);
    }
    d.wait_records(conns as usize);
    d.wait_note("STATUS=0 active");
    let free = lowest_free_fd(pid);
    set_nofile_to(pid, free + 2, 64);
    conns += 1;
    assert!(greeted(addr).is_none(), "served without room for its pipes");
    let pipe_failed = d.wait_record(conns);
    eprintln!(
        "fds: {held_now} connections ended; limit {} (next free fd {free} + 2): {pipe_failed}",
        free + 2
    );
    assert_eq!(pipe_failed.reason, "spawn-failed", "{pipe_failed}");
    assert!(
        pipe_failed.message.contains("Too many open files"),
        "{pipe_failed}"
    );
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon died");

    // Connections to hold through C.
    set_nofile_to(pid, 64, 64);
    let mut held = Vec::new();
    for _ in 0..3 {
        conns += 1;
        held.push(greeted(addr).expect("served with descriptors back"));
    }

    // C. No descriptor at all: accept itself fails.
    let free = lowest_free_fd(pid);
    set_nofile_to(pid, free, 64);
    let waiting: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // accept(2) takes a descriptor before it looks for a client, so the
    // episode may already have begun in B, when the loop came back to accept
    // while the failed connection still held its socket: one line either way.
    let failure = d.wait_log(&["accept failed; pausing"]);
    let (t0, cpu0) = (Instant::now(), cpu_ticks(pid));
    // The connections it has are still served while accept fails.
    for (i, s) in held.iter().enumerate() {
        ping(s, 100 + i);
    }
    // The episode is measured over a fixed window: there is no event to
    // wait for, only the absence of spinning to see.
    std::thread::sleep(Duration::from_secs(2));
    let (wall, cpu) = (t0.elapsed(), cpu_ticks(pid) - cpu0);
    let cpu_share = cpu as f64 / clock_ticks_per_second() as f64 / wall.as_secs_f64();
    let failures = d.log_lines(&["accept failed; pausing"]);
    eprintln!(
        "fds: limit {free} (the next free fd): {failure}\n\
         fds: over {wall:?} of exhaustion the daemon used {cpu} ticks ({:.1}% of a core); \
         accept failures logged: {}",
        cpu_share * 100.0,
        failures.len()
    );
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failure.contains("Too many open files"), "{failure}");
    assert!(
        cpu_share < 0.20,
        "spinning: {:.1}% of a core",
        cpu_share * 100.0
    );
    for s in &waiting {
        assert!(
            nothing_yet(s),
            "a waiting client was served without descriptors"
        );
    }

    // D. The limit is back and the held connections end; the waiting
    // clients are taken, and every one is served.
    set_nofile_to(pid, 64, 64);
    for s in held {
        finish(s);
    }
    let (mut served_late, mut closed_late) = (0, 0);
    for mut s in waiting {
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let line = read_line(&mut s);
        if line == "up\n" {
            served_late += 1;
            finish(s);
        } else {
            closed_late += 1;
        }
    }
    assert_eq!(closed_late, 0, "a waiting client was closed, not served");
    let fresh = greeted(addr).expect("not served after the descriptors came back");
    finish(fresh);
    let total = conns as usize + 3 + 1;
    d.wait_records(total);
    eprintln!(
        "fds: after the held connections ended: {served_late} of 3 waiting clients served, \
         {closed_late} closed; a new client served; accept failures logged in all {}; \
         fds and pipes {baseline:?} -> ({}, {})",
        d.log_lines(&["accept failed; pausing"]).len(),
        d.fd_count(),
        pipe_fd_count(pid)
    );
    d.assert_fds_back(baseline);
    assert!(d.children().is_empty());
    assert!(d.child.try_wait().unwrap().is_none(), "the daemon died");
}
