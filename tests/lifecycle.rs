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

#[test]
fn the_watchdog_is_fed_from_the_event_loop() {
    let (passed, _addr) = pass_tcp("dog");
    let opts = Options::env(&[("WATCHDOG_USEC", "200000")]);
    let mut d = Daemon::spawn(&one_service(r#"["true"]"#, ""), vec![passed], opts);
    d.wait_note("READY=1");
    // At half of 200 ms: three pings take about 300 ms.
    let started = Instant::now();
    for _ in 0..3 {
        d.wait_note("WATCHDOG=1");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
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
