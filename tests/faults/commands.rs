//! Commands that misbehave: a grandchild that keeps stdout, input ignored,
//! stdout closed early, output on stderr only, a program gone after the
//! config was loaded. Each ends with the record it should have, and a
//! well-behaved service beside it is served all the while.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::common::*;

/// A daemon with the service "bad" (`command`, `extra`) and a well-behaved
/// service "good" that prints `ok`.
fn bad_and_good(command: &str, extra: &str) -> (Daemon, SocketAddr, SocketAddr) {
    let (bad, bad_addr) = pass_tcp("bad");
    let (good, good_addr) = pass_tcp("good");
    let config = format!(
        "[[service]]\nname = \"bad\"\ncommand = {command}\n{extra}\n\n\
         [[service]]\nname = \"good\"\ncommand = [\"echo\", \"ok\"]\n"
    );
    let d = Daemon::start(&config, vec![bad, good]);
    (d, bad_addr, good_addr)
}

/// Copies a file with cp(1): a descriptor open for writing in this
/// (multi-threaded) process could leak into a child forked meanwhile and make
/// the copy "Text file busy" when the daemon executes it.
fn cp(from: &str, to: &std::path::Path) {
    let status = std::process::Command::new("cp")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

/// A leader that exits while a grandchild still holds its stdout: the
/// documented rule (src/connection.rs: "once the command has exited,
/// whatever is left of its process group is killed") means the client gets
/// end-of-file soon after the leader exits, not when the grandchild does.
#[test]
fn a_grandchild_holding_stdout_does_not_keep_the_client_waiting() {
    let (d, bad, good) = bad_and_good(
        r#"["sh", "-c", "sleep 20 & echo $!"]"#,
        "kill_grace = \"300ms\"",
    );
    let started = Instant::now();
    let mut s = TcpStream::connect(bad).unwrap();
    // Far above kill_grace, far below the grandchild's 20 s.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    let r = s.read_to_end(&mut out);
    let waited = started.elapsed();
    eprintln!("grandchild: client waited {waited:?} for end-of-file ({r:?})");
    let text = String::from_utf8_lossy(&out).into_owned();
    let grandchild: i32 = text.trim().parse().unwrap();
    assert!(
        r.is_ok(),
        "no end-of-file after {waited:?}: the leader exited at once, but grandchild \
         {grandchild} (alive: {}) still holds stdout and the connection waits for it",
        alive(grandchild)
    );
    drop(s);
    let record = d.wait_record(1);
    record.assert_ended("output-ended", "0");
    assert!(gone_soon(grandchild), "grandchild {grandchild} survived");
    assert_eq!(fetch_text(good), "ok\n");
}

/// A command that exits without reading its stdin while the client sends
/// 10 MiB (`stdin = "client"`): the client gets the whole output and
/// end-of-file, all 10 MiB are accepted (and counted), and the record says
/// output-ended, exit 0.
#[test]
fn a_command_that_ignores_10_mib_of_input_still_ends_cleanly() {
    const INPUT: usize = 10 << 20;
    let (d, bad, good) = bad_and_good(
        r#"["echo", "bye"]"#,
        "stdin = \"client\"\nkill_grace = \"10s\"",
    );
    let conn = connect(bad);
    let mut writer = conn.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let block = vec![b'x'; 65536];
        for _ in 0..INPUT / block.len() {
            writer.write_all(&block)?;
        }
        writer.shutdown(Shutdown::Write)
    });
    let mut out = Vec::new();
    (&conn).read_to_end(&mut out).unwrap();
    assert_eq!(out, b"bye\n");
    sender
        .join()
        .unwrap()
        .expect("the daemon refused part of the input");
    drop(conn);
    let record = d.wait_record(1);
    eprintln!("ignored input: {record}");
    record.assert_ended("output-ended", "0");
    assert_eq!(
        (record.bytes, record.bytes_received),
        (4, INPUT as u64),
        "{record}"
    );
    assert_eq!(fetch_text(good), "ok\n");
    d.wait_records(2);
    assert!(d.children().is_empty());
}

/// A command that closes its stdout and goes on running: the client gets
/// what was written and end-of-file at once; the command gets kill_grace to
/// exit, then SIGTERM ends it; the record says output-ended, exit SIGTERM.
#[test]
fn a_command_that_closes_stdout_and_lingers_is_ended_after_kill_grace() {
    let (d, bad, good) = bad_and_good(
        r#"["sh", "-c", "echo partial; exec >&-; sleep 20 & echo $! >&2; wait"]"#,
        "kill_grace = \"300ms\"",
    );
    let started = Instant::now();
    let mut s = connect(bad);
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let eof_after = started.elapsed();
    assert_eq!(out, "partial\n");
    drop(s);
    let line = d.wait_log(&["stream=\"stderr\"", "conn=1 "]);
    let sleeper: i32 = stderr_text(&line)
        .parse()
        .unwrap_or_else(|_| panic!("no pid in {line}"));
    let record = d.wait_record(1);
    eprintln!("closed stdout: end-of-file after {eof_after:?}; {record}");
    record.assert_ended("output-ended", "SIGTERM");
    assert!(
        record.duration_ms >= 300,
        "ended before kill_grace: {record}"
    );
    assert!(gone_soon(sleeper), "the group's sleep {sleeper} survived");
    assert_eq!(fetch_text(good), "ok\n");
    d.wait_records(2);
    assert!(d.children().is_empty());
}

/// A command that writes only to stderr: the client gets end-of-file with
/// 0 bytes, each stderr line is logged with the connection, and the record
/// says output-ended, 0 bytes, exit 0.
#[test]
fn a_command_that_writes_only_to_stderr_gives_an_empty_stream() {
    let (d, bad, good) = bad_and_good(r#"["sh", "-c", "echo one >&2; echo two >&2"]"#, "");
    assert_eq!(fetch(bad), b"");
    let record = d.wait_record(1);
    record.assert_ended("output-ended", "0");
    assert_eq!(record.bytes, 0, "{record}");
    for word in ["one", "two"] {
        let line = d.wait_log(&[word, "stream=\"stderr\"", "conn=1 ", "service=\"bad\""]);
        assert!(line.contains(" INFO "), "{line}");
    }
    assert_eq!(fetch_text(good), "ok\n");
}

/// A program removed, or made non-executable, after the daemon loaded its
/// config: that connection is closed with a spawn-failed record naming the
/// program and the error; the daemon serves the next client, and the same
/// service again once the file is back.
#[test]
fn a_program_deleted_or_made_unexecutable_after_load_is_a_spawn_failure() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("echo-copy");
    cp("/bin/echo", &program);
    let (d, bad, good) = bad_and_good(&format!(r#"["{}", "hi"]"#, program.display()), "");
    assert_eq!(fetch_text(bad), "hi\n");

    let cases: [(&str, &dyn Fn(), &str); 2] = [
        (
            "deleted",
            &|| std::fs::remove_file(&program).unwrap(),
            "No such file or directory",
        ),
        (
            "chmod -x",
            &|| std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o644)).unwrap(),
            "Permission denied",
        ),
    ];
    let mut conn = 2;
    for (what, break_it, error) in cases {
        break_it();
        assert_eq!(
            fetch(bad),
            b"",
            "{what}: the client is closed without output"
        );
        let record = d.wait_record(conn);
        eprintln!("{what}: {record}");
        record.assert_ended("spawn-failed", "none");
        assert_eq!(record.level, "ERROR", "{record}");
        assert!(
            record
                .message
                .contains(&format!("failed to spawn {}: {error}", program.display())),
            "{what}: {record}"
        );
        assert_eq!(record.pid, 0, "{record}");
        assert_eq!(
            fetch_text(good),
            "ok\n",
            "{what}: the daemon stopped serving"
        );
        // Put the program back: the same service works again.
        match std::fs::remove_file(&program) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{e}"),
            _ => cp("/bin/echo", &program),
        }
        assert_eq!(fetch_text(bad), "hi\n", "{what}: no recovery");
        conn += 3;
    }
    d.wait_records(7);
    assert!(d.children().is_empty());
}
