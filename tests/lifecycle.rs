//! The daemon's life under systemd: READY, STATUS, WATCHDOG, reload on SIGHUP,
//! drain on SIGTERM.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

#[test]
fn sigterm_lets_running_connections_finish_then_exits_0() {
    // The command finishes when the client says so, once the stop is under way.
    let (mut d, addr) = serve(&sh("echo start; read x; echo end"), "stdin = \"client\"");
    let mut conn = connect(addr);
    assert_eq!(read_line(&mut conn), "start\n");

    d.signal(Signal::SIGTERM);
    let stopping = d.wait_note("STOPPING=1");
    assert!(
        stopping.contains("STATUS=stopping: 1 connections finishing"),
        "{stopping}"
    );
    conn.write_all(b"go\n").unwrap();
    let mut rest = String::new();
    conn.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "end\n", "the running stream was cut");
    assert_eq!(d.wait_exit().code(), Some(0));
    let records = d.records();
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0].reason, "output-ended", "{}", records[0]);
}

#[test]
fn after_shutdown_timeout_running_commands_are_ended() {
    let (passed, addr) = pass_tcp("stuck");
    let config = format!(
        "shutdown_timeout = \"300ms\"\n{}",
        one_service(&sh("echo up; exec sleep 1000"), "")
    );
    let mut d = Daemon::start(&config, vec![passed]);
    let mut conn = connect(addr);
    let mut up = [0u8; 3];
    conn.read_exact(&mut up).unwrap();
    let command = d.children()[0];

    let asked = Instant::now();
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit().code(), Some(0));
    // shutdown_timeout 300 ms, then SIGTERM ends `sleep` at once.
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "took {:?}",
        asked.elapsed()
    );
    assert!(!alive(command));
    // Nothing after "up": the stream ends, and is not cut mid-way.
    assert_eq!(read_all(conn), b"");
    let record = d.wait_record(1);
    assert_eq!(
        (record.reason.as_str(), record.exit.as_str()),
        ("shutdown", "SIGTERM"),
        "{record}"
    );
}

#[test]
fn sighup_reloads_a_good_file_and_keeps_the_old_one_on_a_bad_file() {
    // A stream that is running across the reload goes on with its command,
    // which finishes when the client says so, after the reload.
    let (mut d, addr) = serve(&sh("echo A; read x; echo A-done"), "stdin = \"client\"");
    let mut running = connect(addr);
    assert_eq!(read_line(&mut running), "A\n");

    std::fs::write(&d.config_path, one_service(r#"["echo", "B"]"#, "")).unwrap();
    d.signal(Signal::SIGHUP);
    let reloading = d.wait_note("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    d.wait_note("READY=1");
    assert_eq!(fetch_text(addr), "B\n");
    running.write_all(b"go\n").unwrap();
    let mut rest = String::new();
    running.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "A-done\n");

    // A broken file: the daemon says where, and B goes on being served.
    std::fs::write(&d.config_path, one_service(r#"["echo", "C"]"#, "stdin = 3")).unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_note("RELOADING=1");
    let ready = d.wait_note("READY=1");
    assert!(
        ready.contains("reload failed, previous config in use"),
        "{ready}"
    );
    let line = d.wait_log(&["reload failed"]);
    assert!(line.contains(&format!("{}:5:9: service \"test\": stdin: invalid type: integer `3`, expected one of \"null\" \"client\"", d.config_path.display())), "{line}");
    assert_eq!(fetch_text(addr), "B\n");

    // Fixed again: the failure leaves STATUS.
    std::fs::write(&d.config_path, one_service(r#"["echo", "D"]"#, "")).unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_note("RELOADING=1");
    let ready = d.wait_note("READY=1");
    assert!(!ready.contains("reload failed"), "{ready}");
    assert_eq!(fetch_text(addr), "D\n");
}

#[test]
fn status_reports_live_figures() {
    let (mut d, addr) = serve(r#"["echo", "1234567"]"#, "");
    let ready = d.notes.last().unwrap().clone();
    assert!(
        ready.contains("STATUS=0 active, 0 served, 0 B sent"),
        "{ready}"
    );
    assert_eq!(fetch_text(addr), "1234567\n");
    d.wait_note("STATUS=0 active, 1 served, 8 B sent");
}

/// The WATCHDOG=1 notes among `notes`: when each was received.
fn pings(notes: &[(Instant, String)]) -> Vec<Instant> {
    notes
        .iter()
        .filter(|(_, n)| n.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(at, _)| *at)
        .collect()
}

/// systemd kills the daemon when `WatchdogSec=` passes without WATCHDOG=1;
/// the daemon pings at half of that. Over five intervals, from READY=1 on,
/// no two pings the test receives are further apart than half the interval
/// and a quarter for scheduling, which leaves a quarter before the kill.
/// Pinging at the full interval, at a pace of its own, or not at all would
/// fail this.
#[test]
fn the_watchdog_is_pinged_at_half_its_interval() {
    let interval = Duration::from_millis(1200);
    let most = interval / 2 + interval / 4;
    let (passed, _addr) = pass_tcp("dog");
    let opts = Options::watchdog(interval);
    let mut d = Daemon::spawn(&one_service(r#"["true"]"#, ""), vec![passed], opts);
    let (ready, _) = d.wait_note_timed("READY=1");
    let end = ready + interval * 5;
    let notes = d.notes_until(end);
    let mut marks = vec![ready];
    marks.extend(pings(&notes));
    marks.push(end);
    let gaps: Vec<u128> = marks
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    eprintln!("watchdog: {} pings, gaps (ms) {gaps:?}", marks.len() - 2);
    let widest = marks.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        widest <= most,
        "a gap of {widest:?} between pings (at most {most:?} for WATCHDOG_USEC {interval:?}); \
         gaps in ms from READY=1: {gaps:?}"
    );
}

/// The pings come from the event loop, so a stalled loop starves systemd's
/// watchdog and the daemon is restarted. The test holds the event loop's
/// threads stopped (the main thread, which runs the top of the loop, and
/// the runtime's workers) and leaves the others running: no ping may come
/// while they are held, and pings come again once they are released. A
/// daemon that pinged from a thread of its own would go on pinging.
///
/// The runtime starts its workers when it is made, before any task runs,
/// so with `TOKIO_WORKER_THREADS=2` they are the first two threads with the
/// runtime's name; a thread started later (the runtime's blocking pool, or
/// one a task starts without a name, which inherits it) is not held.
#[test]
fn the_watchdog_is_fed_from_the_event_loop() {
    const WORKERS: usize = 2;
    let interval = Duration::from_millis(200);
    let (passed, addr) = pass_tcp("dog");
    let opts = Options {
        env: vec![("TOKIO_WORKER_THREADS".into(), WORKERS.to_string())],
        ..Options::watchdog(interval)
    };
    let mut d = Daemon::spawn(&one_service(r#"["echo", "alive"]"#, ""), vec![passed], opts);
    d.wait_note("READY=1");
    d.wait_note("WATCHDOG=1");

    let pid = d.pid();
    // tokio's default name for its threads (tokio-runtime-w in older
    // versions), which each worker gives itself once it runs: on a loaded
    // machine a worker may not have yet.
    let named = |all: &[Task]| -> Vec<Task> {
        all.iter()
            .filter(|t| ["tokio-rt-worker", "tokio-runtime-w"].contains(&t.comm.as_str()))
            .take(WORKERS)
            .cloned()
            .collect()
    };
    let (all, workers) = poll(PATIENCE, || {
        let all = threads(pid);
        let workers = named(&all);
        (workers.len() == WORKERS).then_some((all, workers))
    })
    .unwrap_or_else(|| panic!("the runtime's workers in {:?}", threads(pid)));
    let main = all.iter().find(|t| t.tid == pid).unwrap().clone();
    let event_loop: Vec<Task> = std::iter::once(main).chain(workers).collect();
    let others: Vec<&Task> = all.iter().filter(|t| !event_loop.contains(t)).collect();
    eprintln!("watchdog: holding {event_loop:?}; running on: {others:?}");

    let held = HeldThreads::hold(pid, &event_loop);
    // Pings sent before the loop stopped may still be on their way.
    d.notes_so_far();
    let window = interval * 15 / 2;
    let during = d.notes_until(Instant::now() + window);
    assert!(held.all_stopped(), "a held thread ran: {:?}", threads(pid));
    let fed = pings(&during);
    assert!(
        fed.is_empty(),
        "{} WATCHDOG=1 in {window:?} while the event loop was stopped (every \
         {:?} from the loop): they come from elsewhere. Held {:?}, running {others:?}; \
         notes: {during:?}",
        fed.len(),
        interval / 2,
        held.threads()
    );

    held.release();
    d.wait_note("WATCHDOG=1");
    assert_eq!(fetch_text(addr), "alive\n");
}

/// `WATCHDOG_PID` names the process systemd watches: when it is another
/// (here the test's own), the watchdog is not the daemon's and it pings
/// nothing. Only time shows an absence: ten would-be intervals pass, then
/// everything the daemon sent is looked at.
#[test]
fn a_watchdog_meant_for_another_process_is_left_alone() {
    let (passed, _addr) = pass_tcp("dog");
    let other = std::process::id().to_string();
    let opts = Options::env(&[("WATCHDOG_USEC", "100000"), ("WATCHDOG_PID", &other)]);
    let mut d = Daemon::spawn(&one_service(r#"["true"]"#, ""), vec![passed], opts);
    d.wait_note("READY=1");
    d.notes_until(Instant::now() + Duration::from_secs(1));
    d.notes_so_far();
    assert!(
        !d.notes.iter().any(|n| n.contains("WATCHDOG=1")),
        "pinged a watchdog meant for pid {other}: {:?}",
        d.notes
    );
}

#[test]
fn reload_request_returns_once_the_file_is_applied() {
    // What ExecReload= runs: `splice-relay --reload $MAINPID`, with the
    // unit's RUNTIME_DIRECTORY. The next connection must get the new command.
    let (passed, addr) = pass_tcp("handshake");
    let runtime = tempfile::tempdir().unwrap();
    let dir = runtime.path().display().to_string();
    let opts = Options::env(&[("RUNTIME_DIRECTORY", &dir)]);
    let mut d = Daemon::spawn(&one_service(r#"["echo", "one"]"#, ""), vec![passed], opts);
    d.wait_note("READY=1");
    let request = |pid: i32| {
        std::process::Command::new(BIN)
            .args(["--reload", &pid.to_string()])
            .env("RUNTIME_DIRECTORY", &dir)
            .output()
            .unwrap()
    };
    for word in ["two", "three", "four"] {
        std::fs::write(
            &d.config_path,
            one_service(&format!(r#"["echo", "{word}"]"#), ""),
        )
        .unwrap();
        let out = request(d.pid());
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            fetch_text(addr),
            format!("{word}\n"),
            "served before the reload was applied"
        );
    }
    std::fs::write(
        &d.config_path,
        one_service(r#"["echo", "five"]"#, "stdin = 3"),
    )
    .unwrap();
    let out = request(d.pid());
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .starts_with("splice-relay: reload refused; the previous configuration stays in use: "),
        "{stderr}"
    );
    assert!(
        stderr.contains(":5:9: service \"test\": stdin: invalid type"),
        "{stderr}"
    );
    assert_eq!(fetch_text(addr), "four\n");
}
