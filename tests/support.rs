//! The tests' own support, checked on its own: the record parser refuses
//! what it does not know, and each /proc observable the other tests wait on
//! tells the state it is meant to tell from the one beside it.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A record as the daemon writes it (src/record.rs).
const LINE: &str = "2026-11-30T11:19:08.111821Z ERROR connection ended: spawn-failed \
    (failed to spawn /tmp/x: No such file or directory), exit none, 0 bytes sent in 4 ms \
    conn=2 service=\"bad\" peer=127.0.0.1:44898 pid=0 bytes=0 bytes_received=7 \
    duration_ms=4 reason=\"spawn-failed\" cpu_usec=8624 messages_sent=3 \
    tls=\"TLSv1.3 TLS_AES_128_GCM_SHA256 userspace\"";

#[test]
fn a_record_parses_into_typed_fields() {
    let r = Record::parse(LINE).unwrap();
    assert_eq!(r.level, "ERROR");
    assert_eq!(
        r.message,
        "spawn-failed (failed to spawn /tmp/x: No such file or directory), exit none, \
         0 bytes sent in 4 ms"
    );
    assert_eq!(
        (r.conn, r.service.as_str(), r.peer.as_str(), r.pid),
        (2, "bad", "127.0.0.1:44898", 0)
    );
    assert_eq!((r.bytes, r.bytes_received, r.duration_ms), (0, 7, 4));
    assert_eq!(
        (r.exit.as_str(), r.reason.as_str()),
        ("none", "spawn-failed")
    );
    assert_eq!(r.peer_port(), 44898);
    assert_eq!(
        (r.cpu_usec, r.memory_peak, r.tasks_peak, r.oom_kills),
        (Some(8624), None, None, None)
    );
    assert_eq!((r.messages_sent, r.messages_received), (Some(3), None));
    assert_eq!(r.tls, "TLSv1.3 TLS_AES_128_GCM_SHA256 userspace");
    assert_eq!(Record::from_line(LINE), Some(r));
}

#[test]
fn a_malformed_record_is_refused_with_the_reason() {
    let cases = [
        ("pid=0", "pid=x", "pid=\"x\""),
        (" bytes=0", " bytes=-1", "bytes=\"-1\""),
        (
            "4 reason",
            "4 exit=\"none\" reason",
            "exit=none: an unknown value is left out",
        ),
        (
            "service=\"bad\"",
            "service=bad",
            "service: expected a quoted value",
        ),
        (" pid=0", "", "expected pid="),
        ("duration_ms=4 reason", "reason", "expected duration_ms="),
        ("userspace\"", "userspace\" extra=1", "unexpected text"),
        ("userspace\"", "userspace", "tls: expected a quoted value"),
        ("cpu_usec=8624", "cpu_usec=lots", "cpu_usec=\"lots\""),
        (
            "cpu_usec=8624",
            "cpu_usec=\"8624\"",
            "cpu_usec=\"\\\"8624\\\"\"",
        ),
        (" conn=2", " conn=", "conn=\"\""),
    ];
    for (from, to, error) in cases {
        let line = LINE.replacen(from, to, 1);
        assert_ne!(line, LINE, "{from}");
        let e = Record::parse(&line).expect_err(&line);
        assert!(e.contains(error), "{to}: {e:?} does not say {error:?}");
    }
}

#[test]
#[should_panic(expected = "in the record")]
fn a_malformed_record_fails_the_test_that_reads_it() {
    Record::from_line(&LINE.replace("bytes=0", "bytes=lots"));
}

#[test]
fn other_lines_are_not_records() {
    let stderr = "2026-11-30T11:19:08.107204Z  INFO connection ended: x conn=1 \
                  service=\"bad\" pid=5103 stream=\"stderr\"";
    let listening = "2026-11-30T11:19:08.096423Z  INFO listening service=\"bad\" \
                     listener=fd 3 \"bad\" 127.0.0.1:35467";
    let early = "splice-relay: C:3:11: service \"a\": command: must not be empty";
    for line in [stderr, listening, early] {
        assert!(!Record::is_record(line), "{line}");
        assert_eq!(Record::from_line(line), None);
    }
    assert_eq!(stderr_text(stderr), "connection ended: x");
    assert_eq!(log_field(listening, "service"), Some("bad"));
    assert_eq!(split_line(listening).map(|(level, _)| level), Some("INFO"));
}

#[test]
fn stat_counts_fields_after_the_last_parenthesis() {
    let text = "42 (a) b (c) d) S 7 42 42 0 -1 4194560 1 0 0 0 11 22 0 0 20 0 1 0";
    let s = Stat::parse(text).unwrap();
    assert_eq!(
        (s.pid, s.state, s.ppid, s.pgrp, s.utime, s.stime),
        (42, 'S', 7, 42, 11, 22)
    );
    let me = stat(std::process::id() as i32).unwrap();
    assert_eq!(me.pid, std::process::id() as i32);
    assert!(alive(me.pid));
    assert!(!alive(i32::MAX));
}

/// The dd test's signal: a writer blocked on its full stdout pipe, not one
/// that sleeps for another reason, nor one whose pipe has room.
#[test]
fn a_writer_blocked_on_a_full_pipe_is_told_from_a_sleeper() {
    let spawn = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let writer = spawn(
        "dd",
        &["if=/dev/zero", "bs=64k", "count=1000", "status=none"],
    );
    let mut sleeper = spawn("sh", &["-c", "echo x; exec sleep 30"]);
    let mut line = [0u8; 2];
    sleeper
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .unwrap();
    let (dd, sh) = (writer.id() as i32, sleeper.id() as i32);
    let blocked = poll(PATIENCE, || blocked_on_full_stdout(dd).then_some(()));
    assert!(blocked.is_some(), "{:?} {:?}", stat(dd), pipe_fill(dd, 1));
    poll(PATIENCE, || (stat(sh)?.state == 'S').then_some(())).unwrap();
    assert!(!blocked_on_full_stdout(sh), "{:?}", pipe_fill(sh, 1));
    assert_eq!(pipe_fill(sh, 1).map(|(queued, _)| queued), Some(0));
    for mut child in [writer, sleeper] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// The PROXY test's signal: bytes the peer has not read yet, then none.
#[test]
fn tcp_queues_show_what_the_peer_has_not_read() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    let (c, s) = (client.local_addr().unwrap(), server.local_addr().unwrap());
    client.write_all(b"0123456789").unwrap();
    let queued = poll(PATIENCE, || {
        (tcp_queues(c, s)?.0 == 0 && tcp_queues(s, c)?.1 == 10).then_some(())
    });
    assert!(
        queued.is_some(),
        "{:?} {:?}",
        tcp_queues(c, s),
        tcp_queues(s, c)
    );
    let mut got = [0u8; 10];
    server.read_exact(&mut got).unwrap();
    assert_eq!(tcp_queues(s, c).map(|q| q.1), Some(0));
}

#[test]
fn fan_out_returns_results_in_job_order() {
    let got = fan_out(4, 100, |i| {
        std::thread::sleep(Duration::from_micros((100 - i as u64) * 10));
        i * 2
    });
    assert_eq!(got, (0..100).map(|i| i * 2).collect::<Vec<_>>());
}

#[test]
#[should_panic(expected = "job 7 failed")]
fn fan_out_fails_with_a_job_s_own_message() {
    fan_out(3, 10, |i| assert_ne!(i, 7, "job 7 failed"));
}
