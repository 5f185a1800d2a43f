//! A command that floods its stderr (`yes` into it): the daemon's log grows
//! by a bounded amount and says what it dropped, another service beside it
//! answers at once all the while, the flood's `timeout` and the daemon's
//! SIGTERM keep their promises; and a daemon whose own stderr is a pipe
//! nobody reads still serves every client.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::*;

/// The flood: 21-byte lines on stderr as fast as `yes` writes them.
const FLOOD: &str = r#"["/bin/sh", "-c", "yes 'spam spam spam spam' >&2; true"]"#;

/// Probes of the other service while the flood runs.
const PROBES: usize = 20;

/// The longest a probe may wait for its answer. An idle daemon answers in
/// a few milliseconds; this leaves room for a loaded 2-core machine (the
/// flood itself keeps one core busy), and is far below what a starved event
/// loop makes a client wait (seconds, or no answer at all).
const PROBE_BOUND: Duration = Duration::from_millis(500);

/// A config with the service "flood" (`flood_extra` added) and "pong",
/// which answers `pong`.
fn flood_and_pong(top: &str, flood_extra: &str) -> (String, Vec<Passed>, SocketAddr, SocketAddr) {
    let (flood, flood_addr) = pass_tcp("flood");
    let (pong, pong_addr) = pass_tcp("pong");
    let config = format!(
        "{top}\n[[service]]\nname = \"flood\"\ncommand = {FLOOD}\nkill_grace = \"300ms\"\n\
         {flood_extra}\n\n[[service]]\nname = \"pong\"\ncommand = [\"echo\", \"pong\"]\n"
    );
    (config, vec![flood, pong], flood_addr, pong_addr)
}

/// One probe of "pong": connect, read to end-of-file; how long it took, or
/// what went wrong (nothing within 5 s is an answer too late to wait for).
fn probe(addr: SocketAddr) -> Result<Duration, String> {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .map_err(|e| format!("after {:?}: {e}", started.elapsed()))?;
    if out != b"pong\n" {
        return Err(format!("got {:?}", String::from_utf8_lossy(&out)));
    }
    Ok(started.elapsed())
}

/// `PROBES` probes, one every 40 ms; each must answer within `PROBE_BOUND`.
/// Returns the latencies, sorted.
fn probe_all(addr: SocketAddr, what: &str) -> Vec<Duration> {
    let mut took = Vec::with_capacity(PROBES);
    for i in 0..PROBES {
        match probe(addr) {
            Ok(t) => took.push(t),
            Err(e) => panic!("{what}: probe {i} of {PROBES} unanswered: {e}; so far {took:?}"),
        }
        // Spread over the flood; the pace, not a wait for something.
        std::thread::sleep(Duration::from_millis(40));
    }
    took.sort();
    eprintln!(
        "{what}: {PROBES} probes answered in {:?} (median), {:?} (worst)",
        took[PROBES / 2],
        took[PROBES - 1]
    );
    let late: Vec<_> = took.iter().filter(|t| **t > PROBE_BOUND).collect();
    assert!(
        late.is_empty(),
        "{what}: {} of {PROBES} probes took longer than {PROBE_BOUND:?}: {took:?}",
        late.len()
    );
    took
}

/// Waits until the flood (connection 1) has `n` stderr lines in the log.
fn wait_flood_lines(d: &Daemon, n: usize) {
    let mut seen = 0;
    d.wait_line_from(0, |l| {
        seen += usize::from(l.contains("stream=\"stderr\"") && l.contains("conn=1 "));
        seen >= n
    });
}

/// Asserts that the flood's last line before its record reports the lines
/// dropped since the previous report: none goes unreported at the end.
fn assert_reported_at_the_end(d: &Daemon) {
    let lines = d.log_lines(&["conn=1 "]);
    let [.., last, record] = &lines[..] else {
        panic!("{lines:#?}")
    };
    assert!(Record::is_record(record), "{record}");
    assert!(last.contains("stderr lines dropped"), "{last}");
}

/// Bytes of the log's lines from line `from` on.
fn log_bytes_from(d: &Daemon, from: usize) -> usize {
    let lines = d.log_lines(&[]);
    lines[from.min(lines.len())..]
        .iter()
        .map(|l| l.len() + 1)
        .sum()
}

/// The flood with `timeout = "2s"` beside "pong": 20 probes of "pong" during
/// the flood each answer within `PROBE_BOUND`; the flood's record says
/// `timeout` within 2 s plus a margin; the log grows by a few tens of KB
/// (the stderr bounds: 100 lines a second after a burst of 200) instead of
/// hundreds of MB, and says how many lines it dropped, in a line of its own
/// once a second and once more at the end.
#[test]
fn a_stderr_flood_is_bounded_and_starves_no_other_client() {
    let (config, sockets, flood, pong) = flood_and_pong("", "timeout = \"2s\"");
    let d = Daemon::start(&config, sockets);
    let start_of_log = d.log_len();

    let started = Instant::now();
    let mut client = connect(flood);
    // The flood has begun once its first line is logged.
    d.wait_log(&["spam spam", "stream=\"stderr\"", "conn=1 "]);
    probe_all(pong, "during the flood");

    // The timeout ends the flood: the client gets end-of-file (no output).
    let mut out = Vec::new();
    let eof = client.read_to_end(&mut out);
    let ended_after = started.elapsed();
    assert!(
        eof.is_ok() && out.is_empty(),
        "{eof:?}, {} bytes",
        out.len()
    );
    let record = d.wait_record_where(|r| r.service == "flood");
    eprintln!("flood: client's end-of-file after {ended_after:?}; {record}");
    assert_eq!(record.reason, "timeout", "{record}");
    let margin = Duration::from_millis(1500);
    assert!(
        record.duration_ms < (Duration::from_secs(2) + margin).as_millis() as u64,
        "the 2 s timeout ended the flood only after {} ms: {record}",
        record.duration_ms
    );
    assert!(
        ended_after < Duration::from_secs(2) + margin,
        "end-of-file after {ended_after:?}"
    );

    // What was dropped is said once per episode, with the connection.
    let dropped = d.wait_log(&["stderr lines dropped", "conn=1 ", "service=\"flood\""]);
    assert!(!dropped.contains("stream="), "{dropped}");
    let reports = d.log_lines(&["stderr lines dropped", "conn=1 "]);
    let logged = d.log_lines(&["stream=\"stderr\"", "conn=1 "]).len();
    let bytes = log_bytes_from(&d, start_of_log);
    eprintln!(
        "flood: {logged} stderr lines logged, {} drop reports, log grew {bytes} bytes; {}",
        reports.len(),
        reports.last().unwrap()
    );
    // 200 at once, then 100 a second, for 2 s (and a little more while
    // the command is ended).
    assert!(
        (200..=600).contains(&logged),
        "{logged} stderr lines logged"
    );
    // Once a second at most while the flood lasts, and once at its end.
    assert!(reports.len() <= 5, "{reports:#?}");
    assert!(bytes < 200_000, "the log grew {bytes} bytes");
    assert_reported_at_the_end(&d);
    d.wait_records(PROBES + 1);
}

/// SIGTERM during a flood with no timeout: the daemon stops within
/// `shutdown_timeout` (1 s) plus a margin, the flood's record says
/// `shutdown`, what was dropped since the last report is reported before
/// it, and the daemon exits 0.
#[test]
fn sigterm_stops_the_daemon_during_a_stderr_flood() {
    let (config, sockets, flood, _) = flood_and_pong("shutdown_timeout = \"1s\"", "");
    let mut d = Daemon::start(&config, sockets);
    let client = connect(flood);
    // Past the burst the bounds allow: lines are being dropped.
    wait_flood_lines(&d, 201);

    let asked = Instant::now();
    d.signal(Signal::SIGTERM);
    let code = d.wait_exit().code();
    let took = asked.elapsed();
    eprintln!("SIGTERM during a flood: exit {code:?} after {took:?}");
    assert_eq!(code, Some(0));
    assert!(
        took < Duration::from_secs(1) + Duration::from_millis(2500),
        "exit {took:?} after SIGTERM (shutdown_timeout 1 s)"
    );
    let record = d.wait_record(1);
    assert_eq!(record.reason, "shutdown", "{record}");
    assert_reported_at_the_end(&d);
    d.wait_log(&["stopped", "served="]);
    drop(client);
}

/// The daemon's own stderr is a pipe nobody reads (a log sink that has
/// stopped) while a command floods its stderr: "pong" answers each of 20
/// probes within `PROBE_BOUND`, the flood still ends at its timeout, and once
/// the pipe is read again the records of every connection are there.
#[test]
fn an_unread_log_blocks_no_client() {
    let (config, sockets, flood, pong) = flood_and_pong("", "timeout = \"2s\"");
    let opts = Options {
        log_unread: true,
        ..Options::default()
    };
    let mut d = Daemon::spawn(&config, sockets, opts);
    d.wait_note("READY=1");
    let started = Instant::now();
    let mut client = connect(flood);
    probe_all(pong, "log unread");
    let mut out = Vec::new();
    let eof = client.read_to_end(&mut out);
    let ended_after = started.elapsed();
    eprintln!("log unread: the flood's end-of-file after {ended_after:?}");
    assert!(
        eof.is_ok() && out.is_empty(),
        "{eof:?}, {} bytes",
        out.len()
    );
    assert!(
        ended_after < Duration::from_millis(3500),
        "the 2 s timeout ended the flood only after {ended_after:?}"
    );

    d.read_log_now();
    let records = d.wait_records(PROBES + 1);
    let flood_record = records.iter().find(|r| r.service == "flood").unwrap();
    assert_eq!(flood_record.reason, "timeout", "{flood_record}");
    assert_eq!(
        records
            .iter()
            .filter(|r| r.reason == "output-ended")
            .count(),
        PROBES
    );
}
