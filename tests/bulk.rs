//! A bulk stream moves to a thread of its own while another stream is bulk
//! too, and back to the event loop when it slows; every protection of a
//! relayed connection holds while it is there: the bytes in order and
//! counted, `max_bytes` exact, `timeout`, `idle_timeout`, a stalled client,
//! stop, reload, and input from the client with its half-close.
//!
//! Each test runs its stream beside another bulk stream (the service
//! "side", zeros to a client that reads them as fast as it can). Whether
//! the streams are on threads is seen from outside, as a user would: the
//! daemon's threads named `bulk` in /proc.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

const MIB: usize = 1 << 20;

/// A daemon serving `command` (with `extra`) as "test", and "side" beside
/// it; `global` lines go first. Returns the daemon, the address of "test",
/// and a bulk reader of "side", already streaming.
fn serve_beside_a_bulk_stream(
    command: &str,
    extra: &str,
    global: &str,
) -> (Daemon, SocketAddr, Side) {
    start_beside(&format!("{global}\n{}", one_service(command, extra)))
}

/// The daemon on `config` (its service "test"), with "side" added.
fn start_beside(config: &str) -> (Daemon, SocketAddr, Side) {
    let (test, addr) = pass_tcp("test");
    let (side, side_addr) = pass_tcp("side");
    let config = format!(
        "{config}\n[[service]]\nname = \"side\"\ncommand = [\"cat\", \"/dev/zero\"]\nkill_grace = \"300ms\"\n"
    );
    let d = Daemon::start(&config, vec![test, side]);
    (d, addr, Side::start(side_addr))
}

/// A client of "side" reading as fast as it can, until dropped.
struct Side {
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<u64>>,
}

impl Side {
    fn start(addr: SocketAddr) -> Side {
        let stop = Arc::new(AtomicBool::new(false));
        let mut conn = connect(addr);
        let mut first = [0u8; 1];
        conn.read_exact(&mut first).unwrap();
        let stopping = Arc::clone(&stop);
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; MIB];
            let mut total = 1;
            while !stopping.load(Ordering::Relaxed) {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n as u64,
                }
            }
            total
        });
        Side {
            stop,
            reader: Some(reader),
        }
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// How many of the daemon's threads are bulk threads now.
fn bulk_threads(pid: i32) -> usize {
    threads(pid).iter().filter(|t| t.comm == "bulk").count()
}

/// Waits until the daemon has no bulk thread; false if one is still there
/// after a few seconds.
fn no_bulk_thread_soon(pid: i32) -> bool {
    poll(Duration::from_secs(5), || {
        (bulk_threads(pid) == 0).then_some(())
    })
    .is_some()
}

/// Reads `n` bytes from `conn` (failing the test at an early end),
/// counting the daemon's bulk threads at each MiB after the first 8: the
/// bytes, and the most threads seen at once.
fn read_counting_threads(conn: &mut TcpStream, n: usize, pid: i32) -> (Vec<u8>, usize) {
    let mut got = vec![0u8; n];
    let (mut at, mut seen) = (0, 0);
    while at < n {
        let k = conn.read(&mut got[at..]).unwrap();
        assert!(k > 0, "the stream ended after {at} of {n} bytes");
        if at >= 8 * MIB && (at + k) / MIB > at / MIB {
            seen = seen.max(bulk_threads(pid));
        }
        at += k;
    }
    (got, seen)
}

/// Reads from `conn` until it ends: how many bytes, in how long.
fn drain(conn: &mut TcpStream) -> (u64, Duration) {
    let started = Instant::now();
    let mut buf = vec![0u8; MIB];
    let mut total = 0;
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return (total, started.elapsed()),
            Ok(n) => total += n as u64,
        }
    }
}

/// A file of random bytes, and what it holds.
fn random(dir: &Path, bytes: usize) -> (String, Vec<u8>) {
    let path = dir.join("data");
    random_file(&path, bytes as u64);
    let data = std::fs::read(&path).unwrap();
    (path.to_str().unwrap().to_owned(), data)
}

/// The record of the "test" service's connection.
fn test_record(d: &Daemon) -> Record {
    d.wait_record_where(|r| r.service == "test")
}

fn test_records(d: &Daemon) -> Vec<Record> {
    d.records()
        .into_iter()
        .filter(|r| r.service == "test")
        .collect()
}

#[test]
fn a_bulk_stream_moves_to_a_thread_and_back_when_it_slows() {
    let dir = tempfile::tempdir().unwrap();
    let (file, data) = random(dir.path(), 64 * MIB);
    // 64 MiB at full speed, a pause, then a line: the line comes through
    // the event loop, after the thread has handed the stream back.
    let script = format!("dd if={file} bs=1M status=none; sleep 2; echo tail");
    let (d, addr, side) = serve_beside_a_bulk_stream(&sh(&script), "", "");
    let mut conn = connect(addr);
    let (got, seen) = read_counting_threads(&mut conn, data.len(), d.pid());
    assert!(got == data, "the bytes differ from the file's");
    assert_eq!(seen, 2, "both bulk streams on threads");
    // The side's stream ends; this one pauses, and hands its thread back.
    drop(side);
    assert!(
        no_bulk_thread_soon(d.pid()),
        "the thread stays while the command sleeps"
    );
    assert!(test_records(&d).is_empty(), "{:?}", d.records());
    assert_eq!(read_all(conn), b"tail\n");
    let record = test_record(&d);
    assert_eq!(record.reason, "output-ended", "{record}");
    assert_eq!(record.bytes, (data.len() + 5) as u64, "{record}");
}

#[test]
fn a_bulk_stream_that_turns_to_lines_comes_back_to_the_event_loop() {
    // 32 MiB, then at once a line every 5 ms, from one process (no pause
    // for a second one to start): never 50 ms without output, on a machine
    // that is not overloaded, so it is the trickles that send the stream
    // back.
    let command = r#"["python3", "-u", "-c", "import sys, time\nfor _ in range(32): sys.stdout.buffer.write(bytes(1048576))\nwhile 1: print(1); time.sleep(0.005)"]"#;
    let (d, addr, side) = serve_beside_a_bulk_stream(command, "", "");
    let mut conn = connect(addr);
    let (_, seen) = read_counting_threads(&mut conn, 32 * MIB, d.pid());
    assert_eq!(seen, 2, "both bulk streams on threads");
    drop(side);
    // Back on the event loop within a few dozen lines (the client keeps
    // the connection open meanwhile: its end would end the thread too).
    let mut lines = 0;
    while bulk_threads(d.pid()) > 0 {
        assert!(lines < 400, "still on a thread after {lines} lines");
        assert_eq!(read_line(&mut conn), "1\n");
        lines += 1;
    }
    assert_eq!(read_line(&mut conn), "1\n");
}

#[test]
fn a_stalled_stream_is_not_counted_as_bulk() {
    // A client that took some bulk and then stopped reading: its stream
    // has given its buffer back and is no longer bulk, so a stream alone
    // beside it stays on the event loop.
    let (d, addr) = serve(r#"["cat", "/dev/zero"]"#, "");
    let mut stalled = connect(addr);
    let mut buf = vec![0u8; 8 * MIB];
    stalled.read_exact(&mut buf).unwrap();
    // Long past the 50 ms after which a full client's buffer is freed.
    std::thread::sleep(Duration::from_millis(300));
    let mut alone = connect(addr);
    let (got, seen) = read_counting_threads(&mut alone, 32 * MIB, d.pid());
    assert_eq!(got.len(), 32 * MIB);
    assert_eq!(seen, 0, "a bulk thread beside a stalled stream");
    drop(stalled);
}

#[test]
fn one_bulk_stream_alone_stays_on_the_event_loop() {
    let (d, addr) = serve(r#"["cat", "/dev/zero"]"#, "max_bytes = 50331648");
    let mut conn = connect(addr);
    let (got, seen) = read_counting_threads(&mut conn, 48 * MIB, d.pid());
    assert_eq!(got.len(), 48 * MIB);
    assert_eq!(seen, 0, "a bulk thread for one stream");
    assert_eq!(d.wait_record(1).reason, "max-bytes");
}

#[test]
fn max_bytes_is_exact_on_a_bulk_thread() {
    let max = 48 * MIB + 7;
    let (d, addr, side) =
        serve_beside_a_bulk_stream(r#"["cat", "/dev/zero"]"#, &format!("max_bytes = {max}"), "");
    let mut conn = connect(addr);
    let (got, seen) = read_counting_threads(&mut conn, max, d.pid());
    assert!(got.iter().all(|&b| b == 0));
    assert_eq!(seen, 2, "both bulk streams on threads");
    assert_eq!(read_all(conn), b"", "more than max_bytes");
    let record = test_record(&d);
    assert_eq!(record.reason, "max-bytes", "{record}");
    assert_eq!(record.bytes, max as u64, "{record}");
    drop(side);
    assert!(no_bulk_thread_soon(d.pid()));
}

#[test]
fn timeout_stops_a_bulk_stream_at_once_though_its_command_lingers() {
    // The command ignores SIGTERM, so it runs on for kill_grace after the
    // timeout and the connection closes only then; but nothing more is
    // sent once the timeout has come.
    let command = sh("trap '' TERM; exec cat /dev/zero");
    let (d, addr, side) = start_beside(&format!(
        "[[service]]\nname = \"test\"\ncommand = {command}\ntimeout = \"1s\"\nkill_grace = \"2s\"\n"
    ));
    let mut conn = connect(addr);
    let (first, seen) = read_counting_threads(&mut conn, 32 * MIB, d.pid());
    assert_eq!(seen, 2, "both bulk streams on threads");
    let (mut more, mut last) = (0u64, Instant::now());
    let mut buf = vec![0u8; MIB];
    let closed = loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break Instant::now(),
            Ok(n) => (more, last) = (more + n as u64, Instant::now()),
        }
    };
    assert!(
        closed - last >= Duration::from_millis(1500),
        "bytes came until {:?} before the close",
        closed - last
    );
    let record = test_record(&d);
    assert_eq!(record.reason, "timeout", "{record}");
    assert_eq!(record.exit, "SIGKILL", "{record}");
    assert_eq!(record.bytes, first.len() as u64 + more, "{record}");
    drop(side);
    assert!(
        no_bulk_thread_soon(d.pid()),
        "the thread outlived its stream"
    );
}

#[test]
fn threads_and_counts_are_given_back_stream_after_stream() {
    // More pairs of bulk streams, one pair after another, than there may
    // be bulk threads at once (four a CPU): each pair gets two; then a
    // stream alone stays on the event loop, as in a fresh daemon.
    let (d, addr, side) =
        serve_beside_a_bulk_stream(r#"["cat", "/dev/zero"]"#, "max_bytes = 33554432", "");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for pair in 0..(cpus * 4).clamp(4, 256) + 2 {
        let (_, seen) = read_counting_threads(&mut connect(addr), 32 * MIB, d.pid());
        assert_eq!(seen, 2, "pair {pair}: not both bulk streams on threads");
    }
    drop(side);
    assert!(no_bulk_thread_soon(d.pid()));
    // A stream alone ends on the event loop, and is counted out: the next
    // one is alone too.
    for alone in 0..2 {
        let (_, seen) = read_counting_threads(&mut connect(addr), 32 * MIB, d.pid());
        assert_eq!(seen, 0, "stream {alone} alone: a bulk thread");
    }
}

#[test]
fn idle_timeout_spares_a_bulk_stream_and_ends_it_once_its_client_stops_reading() {
    let (d, addr, side) =
        serve_beside_a_bulk_stream(r#"["cat", "/dev/zero"]"#, r#"idle_timeout = "1s""#, "");
    let mut conn = connect(addr);
    // Bulk for longer than two idle periods: on a thread, still counted.
    let mut buf = vec![0u8; MIB];
    let started = Instant::now();
    let mut seen = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        assert!(conn.read(&mut buf).unwrap() > 0);
        seen = seen.max(bulk_threads(d.pid()));
    }
    assert_eq!(seen, 2, "both bulk streams on threads");
    assert!(
        test_records(&d).is_empty(),
        "a busy stream ended: {:?}",
        d.records()
    );
    // Now the client stops reading: the stream stalls, goes back to the
    // event loop, and ends once nothing has moved for idle_timeout.
    let record = test_record(&d);
    assert_eq!(record.reason, "idle-timeout", "{record}");
    assert!(record.duration_ms >= 3300, "{record}");
    drop(side);
    assert!(no_bulk_thread_soon(d.pid()));
}

#[test]
fn a_stalled_client_leaves_the_output_in_the_pair_and_frees_the_thread() {
    let dir = tempfile::tempdir().unwrap();
    let (file, data) = random(dir.path(), 96 * MIB);
    let script = format!("dd if={file} bs=1M status=none");
    let (d, addr, side) = serve_beside_a_bulk_stream(&sh(&script), "", "");
    let mut conn = connect(addr);
    let (head, seen) = read_counting_threads(&mut conn, 32 * MIB, d.pid());
    assert_eq!(seen, 2, "both bulk streams on threads");
    // The client stops reading: the thread hands the stream back, and the
    // rest waits in the command's socket pair and the kernel's buffers,
    // not in the daemon (its bulk buffer is freed).
    drop(side);
    assert!(
        no_bulk_thread_soon(d.pid()),
        "a stalled stream holds its thread"
    );
    let rss = rss_kib(d.pid());
    std::thread::sleep(Duration::from_millis(300));
    let grown = rss_kib(d.pid()).saturating_sub(rss);
    assert!(
        grown < 1024,
        "the daemon grew by {grown} KiB while its client stalled"
    );
    // It reads again: everything arrives, in order.
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).unwrap();
    assert!(
        [head, rest].concat() == data,
        "the bytes differ from the file's"
    );
    let record = test_record(&d);
    assert_eq!(record.bytes, data.len() as u64, "{record}");
}

#[test]
fn input_from_the_client_moves_in_bulk_and_its_half_close_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_, data) = random(dir.path(), 64 * MIB);
    // The command counts the client's bytes until its end-of-file: the
    // client's half-close.
    let (d, addr, side) = serve_beside_a_bulk_stream(r#"["wc", "-c"]"#, "stdin = \"client\"", "");
    let mut conn = connect(addr);
    let mut seen = 0;
    for (i, piece) in data.chunks(MIB).enumerate() {
        conn.write_all(piece).unwrap();
        if i >= 8 {
            seen = seen.max(bulk_threads(d.pid()));
        }
    }
    assert_eq!(seen, 2, "the input and the side stream on threads");
    conn.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(conn), format!("{}\n", data.len()).into_bytes());
    let record = test_record(&d);
    assert_eq!(record.reason, "output-ended", "{record}");
    assert_eq!(record.bytes_received, data.len() as u64, "{record}");
    drop(side);
    assert!(no_bulk_thread_soon(d.pid()));
}

#[test]
fn reload_keeps_and_stop_ends_a_stream_on_a_thread() {
    let (mut d, addr, side) =
        serve_beside_a_bulk_stream(r#"["cat", "/dev/zero"]"#, "", "shutdown_timeout = \"1s\"");
    let mut conn = connect(addr);
    let (_, seen) = read_counting_threads(&mut conn, 32 * MIB, d.pid());
    assert_eq!(seen, 2, "both bulk streams on threads");
    // A reload leaves the streams where they are.
    d.signal(Signal::SIGHUP);
    d.wait_note("RELOADING=1");
    d.wait_note("READY=1");
    let (after, seen) = read_counting_threads(&mut conn, 32 * MIB, d.pid());
    assert_eq!(after.len(), 32 * MIB);
    assert_eq!(seen, 2, "both bulk streams on threads after the reload");
    assert!(d.records().is_empty(), "{:?}", d.records());
    // A stop lets them run for shutdown_timeout, then ends them, and the
    // daemon exits: the threads do not hold it up.
    let asked = Instant::now();
    d.signal(Signal::SIGTERM);
    let reader = std::thread::spawn(move || drain(&mut conn));
    assert_eq!(d.wait_exit().code(), Some(0));
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "took {:?}",
        asked.elapsed()
    );
    let (_, ran) = reader.join().unwrap();
    assert!(ran >= Duration::from_millis(900), "cut after {ran:?}");
    drop(side);
    let record = test_record(&d);
    assert_eq!(record.reason, "shutdown", "{record}");
}
