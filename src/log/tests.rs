//! The queue and the journal's datagrams, on their own.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use super::journal::*;
use super::queue::*;
use super::*;

fn record(n: usize) -> Vec<u8> {
    vec![b'x'; n]
}

/// A command's stderr lines are refused once the queue holds
/// `STDERR_SHARE`; records still fit up to `CAPACITY`; both are counted.
#[test]
fn stderr_lines_are_dropped_first() {
    let mut q = Queue::default();
    let mut stderr_queued = 0;
    while q.offer(Class::CommandStderr, record(1000)).is_some() {
        stderr_queued += 1;
    }
    assert_eq!(stderr_queued, STDERR_SHARE / 1000);
    assert_eq!(q.lost.stderr_lines, 1);
    let mut others = 0;
    while q.offer(Class::Other, record(1000)).is_some() {
        others += 1;
    }
    assert_eq!(stderr_queued + others, CAPACITY / 1000);
    assert_eq!((q.lost.stderr_lines, q.lost.others), (1, 1));
    assert!(q.offer(Class::CommandStderr, record(10)).is_none());
    // Reported once there is room again, then not within REPORT_EVERY.
    let now = Instant::now();
    assert_eq!(q.report_due(None, now), None, "still full");
    while q.bytes >= STDERR_SHARE {
        let written: usize = q.next_batch().iter().map(Vec::len).sum();
        q.bytes -= written;
    }
    let lost = q.report_due(None, now).unwrap();
    assert_eq!((lost.stderr_lines, lost.others), (2, 1));
    q.offer(Class::Other, record(CAPACITY + 1));
    assert_eq!(q.report_due(Some(now), now), None, "too soon");
    assert!(q.report_due(Some(now), now + REPORT_EVERY).is_some());
}

#[test]
fn a_batch_is_one_record_at_least_and_keeps_the_order() {
    let mut q = Queue::default();
    for n in [BATCH * 2, 10, 20, BATCH - 20, 5] {
        q.offer(Class::Other, record(n));
    }
    let sizes = |b: Vec<Vec<u8>>| b.iter().map(Vec::len).collect::<Vec<_>>();
    assert_eq!(sizes(q.next_batch()), [BATCH * 2]);
    assert_eq!(sizes(q.next_batch()), [10, 20]);
    assert_eq!(sizes(q.next_batch()), [BATCH - 20, 5]);
    assert!(q.next_batch().is_empty());
}

/// A sink whose pipe nobody reads takes every record at once: those
/// over its capacity are counted as lost, none blocks the caller.
#[test]
fn an_unread_pipe_blocks_no_one() {
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    let sink = Sink::start(Output::Stream(Box::new(std::fs::File::from(write_end))));
    let started = Instant::now();
    for _ in 0..20_000 {
        sink.push(Class::Other, record(400));
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "{took:?}");
    let q = sink.lock();
    assert!(q.lost.others > 0, "8 MB fit in a pipe and a 4 MiB queue?");
    assert!(q.bytes <= CAPACITY);
    drop(q);
    drop(read_end);
}

/// What the journal receives: the native protocol's fields.
#[test]
fn journal_datagrams_carry_the_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let journald = UnixDatagram::bind(&path).unwrap();
    let sink = Sink::start(Output::journal(&path).unwrap());
    let mut buf = vec![0u8; 65536];
    // The empty datagram that tells the socket is there.
    assert_eq!(journald.recv(&mut buf).unwrap(), 0);
    let subscriber = tracing_subscriber::registry().with(Journal::new(Arc::clone(&sink)));
    tracing::subscriber::with_default(subscriber, || {
        tracing::info!(
            conn = 7,
            service = "a\nb",
            pid = 12,
            stream = "stderr",
            "hello"
        );
    });
    let n = journald.recv(&mut buf).unwrap();
    let fields = parse(&buf[..n]);
    let get = |k: &str| {
        fields
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {k} in {fields:?}"))
    };
    assert_eq!(get("MESSAGE"), "hello");
    assert_eq!(get("PRIORITY"), "5");
    assert_eq!(get("SYSLOG_IDENTIFIER"), "splice-relay");
    assert_eq!(get("CONN"), "7");
    assert_eq!(get("SERVICE"), "a\nb");
    assert_eq!(get("PID"), "12");
    assert_eq!(get("STREAM"), "stderr");
    assert_eq!(get("TARGET"), module_path!());
    assert!(
        get("CODE_FILE").ends_with("log/tests.rs"),
        "{}",
        get("CODE_FILE")
    );
    get("CODE_LINE").parse::<u32>().unwrap();
}

/// Parses length-prefixed fields.
fn parse(mut d: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !d.is_empty() {
        let nl = d.iter().position(|&b| b == b'\n').unwrap();
        let name = String::from_utf8(d[..nl].to_vec()).unwrap();
        let len = u64::from_le_bytes(d[nl + 1..nl + 9].try_into().unwrap()) as usize;
        let value = String::from_utf8(d[nl + 9..nl + 9 + len].to_vec()).unwrap();
        assert_eq!(d[nl + 9 + len], b'\n');
        out.push((name, value));
        d = &d[nl + 10 + len..];
    }
    out
}
