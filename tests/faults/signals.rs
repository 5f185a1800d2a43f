//! Signals during a flood: SIGHUP reloads that never give a client a mixed
//! or cut output, and a SIGTERM that finishes every connection it took.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;

use nix::sys::signal::Signal;

use crate::common::*;
use crate::{seed, XorShift};

/// One client of a flood.
struct Outcome {
    /// Its local port (0 if it did not connect).
    port: u16,
    connected: bool,
    got: Vec<u8>,
    /// What ended the connect or the read, if not end-of-file.
    error: Option<String>,
}

/// Runs `attempts` fetches from `threads` threads, in the background.
fn flood(addr: SocketAddr, attempts: usize, threads: usize) -> JoinHandle<Vec<Outcome>> {
    std::thread::spawn(move || {
        fan_out(threads, attempts, move |_| match TcpStream::connect(addr) {
            Err(e) => Outcome {
                port: 0,
                connected: false,
                got: Vec::new(),
                error: Some(e.to_string()),
            },
            Ok(mut s) => {
                s.set_read_timeout(Some(PATIENCE)).unwrap();
                // A byte the daemon drops (stdin is null). It matters when
                // the daemon stops: a client the listener never took learns
                // it from the reset this byte draws, instead of waiting
                // forever on a handshake the server side forgot. The write
                // itself may meet that reset, which the read reports.
                let _ = s.write_all(b"x");
                let (got, error) = read_until_end(&mut s);
                Outcome {
                    port: s.local_addr().unwrap().port(),
                    connected: true,
                    got,
                    error: error.map(|e| e.to_string()),
                }
            }
        })
    })
}

/// SIGHUP five times during 1,000 connections from 16 threads, the file
/// switching between two commands (each `cat` of its own 64 KiB file): every
/// client gets exactly one of the two outputs, never a mix or a cut one;
/// after each READY=1 a new client gets the new output; one record each.
#[test]
fn reloads_during_a_flood_give_each_client_one_whole_output() {
    let mut rng = XorShift::new(seed());
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<(std::path::PathBuf, Vec<u8>)> = ["a", "b"]
        .iter()
        .map(|n| {
            let p = dir.path().join(n);
            let content = rng.bytes(65536 + 3);
            std::fs::write(&p, &content).unwrap();
            (p, content)
        })
        .collect();
    let config_for = |i: usize| one_service(&format!(r#"["cat", "{}"]"#, files[i].0.display()), "");
    let (passed, addr) = pass_tcp("hup");
    let mut d = Daemon::start(&config_for(0), vec![passed]);

    let clients = flood(addr, 1000, 16);
    let mut probes = 0;
    for (k, which) in [1, 0, 1, 0, 1].into_iter().enumerate() {
        d.wait_records(150 * (k + 1));
        // Replaced in one rename, so the daemon never reads half a file.
        let tmp = dir.path().join("next.toml");
        std::fs::write(&tmp, config_for(which)).unwrap();
        std::fs::rename(&tmp, &d.config_path).unwrap();
        d.signal(Signal::SIGHUP);
        d.wait_note("RELOADING=1");
        let ready = d.wait_note("READY=1");
        assert!(!ready.contains("reload failed"), "{ready}");
        assert!(
            fetch(addr) == files[which].1,
            "reload {k}: not in use after READY=1"
        );
        probes += 1;
    }
    let outcomes = clients.join().unwrap();
    let (mut a, mut b) = (0, 0);
    for o in &outcomes {
        assert!(o.connected, "a connect failed: {:?}", o.error);
        assert!(
            o.error.is_none(),
            "client {}: {:?} after {} bytes",
            o.port,
            o.error,
            o.got.len()
        );
        if o.got == files[0].1 {
            a += 1;
        } else if o.got == files[1].1 {
            b += 1;
        } else {
            panic!(
                "client {} got {} bytes that are neither output",
                o.port,
                o.got.len()
            );
        }
    }
    let total = outcomes.len() + probes;
    let records = d.wait_records(total);
    let reloads = d.log_lines(&["configuration reloaded"]).len();
    eprintln!(
        "reload flood: {} clients: {a} got the first output, {b} the second; {reloads} reloads; \
         {} records",
        outcomes.len(),
        records.len()
    );
    assert_eq!(outcomes.len(), 1000);
    assert_eq!(reloads, 5);
    assert!(a > 0 && b > 0);
    assert_eq!(records.len(), total);
    for r in &records {
        assert_eq!(r.reason, "output-ended", "{r}");
    }
    assert!(d.children().is_empty());
}

/// SIGTERM during 1,000 connections from 16 threads: every client the daemon
/// took (it has a record, or the client got a byte) got the whole output and
/// has exactly one record; the others were refused or reset without a byte;
/// the daemon exits 0 and leaves no process behind.
#[test]
fn sigterm_during_a_flood_finishes_every_accepted_connection() {
    let mut rng = XorShift::new(seed());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload");
    let payload = rng.bytes(65536 + 3);
    std::fs::write(&file, &payload).unwrap();
    let (passed, addr) = pass_tcp("term");
    let mut d = Daemon::start(
        &one_service(&format!(r#"["cat", "{}"]"#, file.display()), ""),
        vec![passed],
    );
    let clients = flood(addr, 1000, 16);
    d.wait_records(300);
    d.signal(Signal::SIGTERM);
    d.wait_note("STOPPING=1");
    let code = d.wait_exit().code();
    let outcomes = clients.join().unwrap();
    d.wait_log(&["stopped", "served="]);

    let recs = d.records();
    let mut recorded: HashMap<u16, usize> = HashMap::new();
    for r in &recs {
        r.assert_ended("output-ended", "0");
        *recorded.entry(r.peer_port()).or_default() += 1;
    }
    let (mut complete, mut refused, mut reset_empty) = (0, 0, 0);
    let mut complete_ports: HashMap<u16, usize> = HashMap::new();
    for Outcome {
        port,
        connected,
        got,
        error,
    } in &outcomes
    {
        if !connected {
            refused += 1;
        } else if got.is_empty() {
            assert!(
                !recorded.contains_key(port),
                "client {port} has a record but got nothing ({error:?})"
            );
            reset_empty += 1;
        } else {
            assert!(
                *got == payload && error.is_none(),
                "client {port} was taken but got {} of {} bytes ({error:?})",
                got.len(),
                payload.len()
            );
            complete += 1;
            *complete_ports.entry(*port).or_default() += 1;
        }
    }
    eprintln!(
        "stop flood: {} attempts: {complete} complete, {refused} refused, {reset_empty} connected \
         but not taken; {} records; exit {code:?}",
        outcomes.len(),
        recs.len()
    );
    assert_eq!(code, Some(0));
    assert_eq!(
        complete_ports, recorded,
        "records and complete clients differ"
    );
    assert_eq!(complete, recs.len());
    assert!(complete >= 300);
    for r in &recs {
        assert!(group_members(r.pid).is_empty(), "{r}: its group is alive");
    }
}
