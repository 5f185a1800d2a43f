//! What a client gets: every byte in order, promptly, with the right
//! environment; and what the daemon keeps: no process, fd or zombie left over.
//!
//! The long tier (`cargo test --release --test relay -- --ignored`) sends a
//! gibibyte down the splice and socket-pair paths.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

/// sha256 of what `sh -c script` prints, computed without the daemon.
fn expected_sha256(script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{script} | sha256sum"))
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Streams everything from `conn` through sha256sum; returns (bytes, hash).
fn received_sha256(mut conn: impl Read) -> (u64, String) {
    let mut hasher = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let n = std::io::copy(&mut conn, hasher.stdin.as_mut().unwrap()).unwrap();
    drop(hasher.stdin.take());
    let out = hasher.wait_with_output().unwrap();
    (
        n,
        String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned(),
    )
}

fn checksum_over(transfer: &str, script: &str, min_bytes: u64) {
    let (d, addr) = serve(&sh(script), &format!("transfer = \"{transfer}\""));
    let (bytes, got) = received_sha256(connect(addr));
    assert!(bytes >= min_bytes, "only {bytes} bytes");
    assert_eq!(
        got,
        expected_sha256(script),
        "{transfer}: {bytes} bytes arrived but differ"
    );
    let record = d.wait_record(1);
    assert_eq!(record.reason, "output-ended", "{record}");
    assert_eq!(record.bytes, bytes, "{record}");
    assert_eq!(record.exit, "0", "{record}");
}

// seq's output never repeats, so a lost, doubled or reordered block
// changes the checksum. 20 million lines are about 150 MB; 120 million, in
// the long tier (`-- --ignored`), about 1.09 GB.

#[test]
fn bytes_arrive_intact_through_splice() {
    checksum_over("splice", "seq 1 20000000", 150_000_000);
}

#[test]
#[ignore = "long tier: a gibibyte"]
fn a_gibibyte_arrives_intact_through_splice() {
    checksum_over("splice", "seq 1 120000000", 1 << 30);
}

/// The splice loop never blocks a worker: a command that has written
/// exactly what one splice asks and then stays quiet leaves the event loop
/// free (the next splice finds the pipe empty and must say EAGAIN, from
/// SPLICE_F_NONBLOCK or the descriptors' O_NONBLOCK). With one worker
/// thread, a blocked splice would leave every other connection unserved
/// until that command wrote again.
#[test]
fn a_quiet_command_never_holds_up_the_event_loop() {
    let (quiet, quiet_addr) = pass_tcp("quiet");
    let (other, other_addr) = pass_tcp("other");
    let config = format!(
        "[[service]]\nname = \"quiet\"\ncommand = {}\ntransfer = \"splice\"\npipe_size = 4096\n\
         [[service]]\nname = \"other\"\ncommand = {}\n",
        sh("head -c 4096 /dev/zero; exec sleep 60"),
        sh("echo hello")
    );
    let _d = Daemon::spawn(
        &config,
        vec![quiet, other],
        Options::env(&[("TOKIO_WORKER_THREADS", "1")]),
    );
    // One splice moves the 4096 bytes, asked for and got: the pipe is empty.
    let mut first = connect(quiet_addr);
    let mut block = [0u8; 4096];
    first.read_exact(&mut block).unwrap();
    let second = connect(other_addr);
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    let read = BufReader::new(second).read_line(&mut answer);
    assert!(
        read.is_ok() && answer == "hello\n",
        "the other service did not answer while a quiet command held the splice loop: {read:?} {answer:?}"
    );
}

/// `pipe_size` is the size of the command's stdout pipe, as the command
/// itself sees it (F_GETPIPE_SZ), on both paths that give it a pipe.
#[test]
fn the_commands_stdout_pipe_has_pipe_size() {
    for transfer in ["splice", "copy"] {
        let (_d, addr) = serve(
            &sh("python3 -c 'import fcntl; print(fcntl.fcntl(1, 1032))'"),
            &format!("transfer = \"{transfer}\"\npipe_size = 262144"),
        );
        assert_eq!(fetch_text(addr), "262144\n", "{transfer}");
    }
}

/// A splice that ends at the end of the output is an end, not a reason to
/// fall back to copying: no warning at a normal end.
#[test]
fn a_normal_end_of_a_splice_logs_no_fallback() {
    let (d, addr) = serve(&sh("seq 1 1000"), "transfer = \"splice\"");
    for conn in 1..=3 {
        assert_eq!(fetch(addr).len(), expected_len("seq 1 1000"));
        d.wait_record(conn).assert_ended("output-ended", "0");
    }
    let fallbacks = d.log_lines(&["copying through a buffer"]);
    assert!(fallbacks.is_empty(), "{fallbacks:?}");
}

/// How many bytes `sh -c script` prints, computed without the daemon.
fn expected_len(script: &str) -> usize {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap()
        .stdout
        .len()
}

#[test]
fn bytes_arrive_intact_through_the_socket_pair() {
    checksum_over("socketpair", "seq 1 20000000", 150_000_000);
}

#[test]
#[ignore = "long tier: a gibibyte"]
fn a_gibibyte_arrives_intact_through_the_socket_pair() {
    checksum_over("socketpair", "seq 1 120000000", 1 << 30);
}

#[test]
fn bytes_arrive_intact_through_the_copy_path() {
    checksum_over("copy", "seq 1 20000000", 150_000_000);
}

/// The default transfer gives the command a socket, as inetd does: stdin
/// and stdout one socket with `stdin = "client"`, stdout alone otherwise.
#[test]
fn the_default_transfer_gives_the_command_a_socket() {
    let probe = "for f in 0 1; do if [ -S /proc/self/fd/$f ]; then echo $f socket; else echo $f other; fi; done; \
                 readlink /proc/$$/fd/0 /proc/$$/fd/1 | sort -u | wc -l";
    let (_d, addr) = serve(&sh(probe), "stdin = \"client\"");
    let conn = connect(addr);
    conn.shutdown(Shutdown::Write).unwrap();
    assert_eq!(
        read_all(conn),
        b"0 socket\n1 socket\n1\n",
        "one socket for both"
    );
    let (_d, addr) = serve(&sh(probe), "");
    assert_eq!(
        fetch_text(addr),
        "0 other\n1 socket\n2\n",
        "stdin is /dev/null"
    );
}

/// Each direction's end is passed on through the socket pair: the client's
/// half-close is the command's end-of-file (tr, above); the command's
/// shutdown of its output is the client's end-of-file, and its input ends
/// then too, as a closed pipe's would: it reads end-of-file and exits.
#[test]
fn the_commands_half_close_ends_its_output_and_input() {
    // TOML escapes: \\n is a newline in Python's strings.
    let script = "import socket, sys; s = socket.socket(fileno=1); s.sendall(b'ready\\\\n'); \
                  s.shutdown(socket.SHUT_WR); got = sys.stdin.buffer.read(); \
                  sys.stderr.write('then read %d bytes\\\\n' % len(got))";
    let (d, addr) = serve(
        &format!("[\"python3\", \"-c\", \"{script}\"]"),
        "stdin = \"client\"",
    );
    let mut conn = connect(addr);
    let mut out = Vec::new();
    conn.read_to_end(&mut out).unwrap();
    assert_eq!(out, b"ready\n");
    d.wait_log(&["then read 0 bytes", "stream=\"stderr\""]);
    drop(conn);
    let record = d.wait_record(1);
    assert_eq!(
        (record.reason.as_str(), record.exit.as_str()),
        ("output-ended", "0"),
        "it exited on its own, within kill_grace: {record}"
    );
}

#[test]
fn a_command_writing_100_mib_with_plain_writes_never_sees_eagain() {
    // dd reports a short or failed write(2) on stderr; the command's end of
    // its stdout (a pipe, or the default socket pair) must stay blocking
    // whatever the daemon does with its end.
    for (transfer, blocked_writing) in [
        ("splice", blocked_on_full_stdout as fn(i32) -> bool),
        ("socketpair", blocked_on_full_socket),
    ] {
        let (d, addr) = serve(
            r#"["dd", "if=/dev/zero", "bs=1M", "count=100", "status=none"]"#,
            &format!("transfer = \"{transfer}\""),
        );
        let mut conn = connect(addr);
        let mut first = vec![0u8; 1024];
        conn.read_exact(&mut first).unwrap();
        // The client reads no more until dd has filled its stdout and waits
        // in write(2), where a nonblocking write end would have failed instead.
        let dd = d.children()[0];
        let blocked = poll(PATIENCE, || blocked_writing(dd).then_some(()));
        assert!(
            blocked.is_some(),
            "{transfer}: dd never blocked on a full stdout: {:?}, wchan {:?}, pipe {:?}; log:\n{}",
            stat(dd),
            std::fs::read_to_string(format!("/proc/{dd}/wchan")),
            pipe_fill(dd, 1),
            d.log_text()
        );
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).unwrap();
        assert_eq!(first.len() + rest.len(), 100 << 20, "{transfer}");
        let record = d.wait_record(1);
        assert_eq!(record.exit, "0", "{transfer}: {record}");
        assert!(
            d.log_lines(&["stream=\"stderr\""]).is_empty(),
            "{transfer}: dd complained: {}",
            d.log_text()
        );
    }
}

#[test]
fn a_burst_then_lines_gives_the_bulk_buffer_back_at_the_first_line() {
    // 8 MiB in large writes, a pause, then a line now and then: the bulk
    // buffer made for the burst is kept through the pause and freed at the
    // first line, not held through the next 16.
    let script = "dd if=/dev/zero bs=1M count=8 status=none; sleep 0.5; echo x; exec sleep 60";
    let (d, addr) = serve(&sh(script), "");
    let mut conn = connect(addr);
    let mut burst = vec![0u8; 8 << 20];
    conn.read_exact(&mut burst).unwrap();
    let held = rss_kib(d.pid());
    assert_eq!(read_line(&mut conn), "x\n");
    let freed = poll(Duration::from_secs(2), || {
        let freed = held.saturating_sub(rss_kib(d.pid()));
        (freed >= 192).then_some(freed)
    });
    assert!(
        freed.is_some(),
        "the daemon kept its bulk buffer: {held} KiB, then {} KiB",
        rss_kib(d.pid())
    );
}

#[test]
fn a_producer_of_small_writes_does_not_make_the_bulk_buffer_again_and_again() {
    // head -c writes 8 KiB at a time: read faster than it writes, its
    // stream brings a short read now and then amid bulk. A buffer freed at
    // each and made again would fault its pages in again each time
    // (about 2,000 faults for 64 MiB); kept, it faults them in once.
    let (d, addr) = serve(r#"["head", "-c", "67108864", "/dev/zero"]"#, "");
    let before = stat(d.pid()).unwrap().minflt;
    let (bytes, _) = received_sha256(connect(addr));
    assert_eq!(bytes, 64 << 20);
    let faults = stat(d.pid()).unwrap().minflt - before;
    // About 200 here; freed at each short read, about 2,000.
    assert!(
        faults < 1000,
        "{faults} page faults in the daemon for 64 MiB"
    );
}

#[test]
fn a_slow_producers_lines_arrive_promptly() {
    // Each line carries the producer's clock when it was printed; the client
    // compares with its own clock when the line arrives.
    let (d, addr) = serve(
        &sh("for i in $(seq 1 30); do date +%s%N; sleep 0.05; done"),
        "",
    );
    let conn = connect(addr);
    let mut delays = Vec::new();
    for line in BufReader::new(conn).lines() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let sent: u128 = line.unwrap().trim().parse().unwrap();
        delays.push(Duration::from_nanos((now.saturating_sub(sent)) as u64));
    }
    assert_eq!(delays.len(), 30);
    delays.sort();
    let median = delays[delays.len() / 2];
    // Corking or Nagle would hold each line for tens of milliseconds.
    assert!(
        median < Duration::from_millis(10),
        "median line delay {median:?}; all: {delays:?}"
    );
    // The worst line only guards against a stall: one scheduler hiccup on a
    // loaded machine must not fail the test.
    assert!(
        delays[delays.len() - 1] < Duration::from_secs(1),
        "worst line delay {delays:?}"
    );
    drop(d);
}

#[test]
fn the_command_gets_peer_variables_and_a_scrubbed_environment() {
    let (passed, addr) = pass_tcp("env");
    let config = one_service(r#"["env"]"#, "env = { GREETING = \"hello world\" }");
    let opts = Options::env(&[
        ("WATCHDOG_USEC", "600000000"),
        ("WATCHDOG_PID", "1"),
        ("KEEP_ME", "yes"),
    ]);
    let mut d = Daemon::spawn(&config, vec![passed], opts);
    d.wait_note("READY=1");
    let conn = connect(addr);
    let local = conn.local_addr().unwrap();
    let mut out = String::new();
    BufReader::new(conn).read_to_string(&mut out).unwrap();
    let vars: Vec<&str> = out.lines().collect();
    for want in [
        "PROTO=TCP".to_owned(),
        "REMOTE_ADDR=127.0.0.1".to_owned(),
        format!("REMOTE_PORT={}", local.port()),
        "TCPREMOTEIP=127.0.0.1".to_owned(),
        format!("TCPREMOTEPORT={}", local.port()),
        "TCPLOCALIP=127.0.0.1".to_owned(),
        format!("TCPLOCALPORT={}", addr.port()),
        "GREETING=hello world".to_owned(),
        "KEEP_ME=yes".to_owned(),
    ] {
        assert!(vars.contains(&want.as_str()), "missing {want} in:\n{out}");
    }
    for gone in [
        "NOTIFY_SOCKET=",
        "LISTEN_PID=",
        "LISTEN_FDS=",
        "LISTEN_FDNAMES=",
        "WATCHDOG_USEC=",
        "WATCHDOG_PID=",
    ] {
        assert!(
            !vars.iter().any(|v| v.starts_with(gone)),
            "{gone} leaked into:\n{out}"
        );
    }
}

#[test]
fn stdin_from_the_client_with_half_close() {
    for transfer in ["socketpair", "splice", "copy"] {
        stdin_with_half_close(transfer);
    }
}

fn stdin_with_half_close(transfer: &str) {
    let (d, addr) = serve(
        r#"["tr", "a-z", "A-Z"]"#,
        &format!("stdin = \"client\"\ntransfer = \"{transfer}\""),
    );
    let mut conn = connect(addr);
    let reader = {
        let mut c = conn.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            c.read_to_end(&mut out).unwrap();
            out
        })
    };
    // 4 MiB, more than any buffer on the way, so both directions must flow.
    let chunk = b"the quick brown fox jumps over the lazy dog\n";
    let mut sent = 0;
    while sent < 4 << 20 {
        conn.write_all(chunk).unwrap();
        sent += chunk.len();
    }
    conn.shutdown(Shutdown::Write).unwrap();
    let out = reader.join().unwrap();
    assert_eq!(out.len(), sent);
    assert!(out
        .chunks(chunk.len())
        .all(|c| c == b"THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG\n"));
    let record = d.wait_record(1);
    assert_eq!(record.bytes_received, sent as u64, "{transfer}: {record}");
    assert_eq!(record.reason, "output-ended", "{transfer}: {record}");
}

#[test]
fn stderr_lines_are_logged_with_the_connection() {
    let (d, addr) = serve(&sh("echo out; echo oops >&2; echo again >&2"), "");
    assert_eq!(fetch_text(addr), "out\n");
    let line = d.wait_log(&["oops", "stream=\"stderr\""]);
    assert!(
        line.contains("conn=1") && line.contains("service=\"test\""),
        "{line}"
    );
    d.wait_log(&["again", "stream=\"stderr\"", "conn=1"]);
}

#[test]
fn a_client_that_leaves_ends_the_whole_process_group() {
    // A grandchild that ignores nothing, and a leader that ignores SIGTERM,
    // so only the SIGKILL after kill_grace ends it.
    let (d, addr) = serve(
        &sh("trap '' TERM; sleep 1000 & echo $!; while :; do echo tick; sleep 0.01; done"),
        "",
    );
    let conn = connect(addr);
    let mut lines = BufReader::new(conn);
    let mut first = String::new();
    lines.read_line(&mut first).unwrap();
    let grandchild: i32 = first.trim().parse().unwrap();
    let leader = d.children()[0];
    assert!(alive(grandchild) && alive(leader));
    let left = Instant::now();
    drop(lines);

    let record = d.wait_record(1);
    assert_eq!(record.reason, "client-gone", "{record}");
    // kill_grace is 300 ms; the leader ignored SIGTERM, so SIGKILL ended it.
    assert_eq!(record.exit, "SIGKILL", "{record}");
    assert!(
        left.elapsed() < Duration::from_millis(300 + 1000),
        "took {:?}",
        left.elapsed()
    );
    assert!(gone_soon(grandchild), "grandchild {grandchild} survived");
    assert!(!alive(leader));
    assert!(d.children().is_empty(), "zombies: {:?}", d.children());
}

#[test]
fn a_thousand_connections_leave_no_fd_process_or_zombie() {
    let (d, addr) = serve(r#"["echo", "hello"]"#, "");
    assert_eq!(fetch_text(addr), "hello\n");
    d.wait_record(1);
    let before = d.fd_count();
    for i in 0..1000 {
        let mut s = TcpStream::connect(addr).unwrap();
        if i % 2 == 0 {
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            assert_eq!(out, "hello\n");
        } // odd ones leave at once, without reading
    }
    // Every record, not only the last connection's: they may end out of order.
    d.wait_records(1001);
    // A connection's record is written after its last descriptor closed.
    assert_eq!(
        d.fd_count(),
        before,
        "fds before {before}, after {}",
        d.fd_count()
    );
    assert!(d.children().is_empty(), "left over: {:?}", d.children());
}

/// Runs `clients` concurrent clients against a command that logs its own start
/// and end to a file; returns the most commands ever running at once.
/// `global` goes at the top of the config, `service` into the service table.
fn most_at_once(global: &str, service: &str, clients: usize) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let (passed, addr) = pass_tcp("limited");
    let script = format!(
        "echo + >> {0}; sleep 0.02; echo - >> {0}; echo ok",
        ledger.display()
    );
    let config = format!("{global}\n{}", one_service(&sh(&script), service));
    let d = Daemon::start(&config, vec![passed]);
    for out in fan_out(clients, clients, move |_| fetch_text(addr)) {
        assert_eq!(out, "ok\n", "a client was not served");
    }
    // Every command has exited (and written its '-') once all have records.
    d.wait_records(clients);
    // The slot is taken before the command starts ('+') and freed after it
    // exits ('-'), so the running count in the ledger bounds the truth.
    let (most, now, starts) = ledger_peak(&ledger, "+");
    assert_eq!((now, starts), (0, clients));
    let pauses = d
        .log_lines(&["not accepting until a connection ends"])
        .len();
    assert!(pauses >= 1, "the limit was never reached");
    assert!(
        pauses < clients / 2,
        "logged {pauses} times: per client, not per episode"
    );
    most as usize
}

#[test]
fn max_connections_per_service_holds_under_200_clients() {
    let most = most_at_once("", "max_connections = 8", 200);
    assert!(
        most <= 8,
        "{most} commands ran at once with max_connections = 8"
    );
    assert!(
        most >= 2,
        "the test did not run clients concurrently ({most})"
    );
}

#[test]
fn the_global_limit_holds_too() {
    let most = most_at_once("max_connections = 5", "", 100);
    assert!(
        most <= 5,
        "{most} commands ran at once with the global max_connections = 5"
    );
    assert!(
        most >= 2,
        "the test did not run clients concurrently ({most})"
    );
}

#[test]
fn output_survives_a_client_that_keeps_sending() {
    // The command ignores its input; the client sends all the while. Closing
    // with unread input would reset the connection and cut the output short.
    let (d, addr) = serve(r#"["head", "-c", "4000000", "/dev/zero"]"#, "");
    for _ in 0..5 {
        let conn = TcpStream::connect(addr).unwrap();
        let mut writer = conn.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let junk = [b'x'; 65536];
            while writer.write_all(&junk).is_ok() {}
        });
        let mut got = Vec::new();
        (&conn)
            .read_to_end(&mut got)
            .expect("the output was cut by a reset");
        assert_eq!(got.len(), 4_000_000);
        conn.shutdown(Shutdown::Both).unwrap();
        sender.join().unwrap();
    }
    d.wait_records(5);
}

#[test]
fn an_urgent_byte_does_not_stall_the_input() {
    use nix::sys::socket::{send, MsgFlags};
    use std::os::fd::AsRawFd;
    // splice(2) stops at the urgent mark: that connection goes on by
    // copying. The copying transfers step over it anyway.
    for transfer in ["splice", "socketpair", "copy"] {
        let (d, addr) = serve(
            r#"["tr", "a-z", "A-Z"]"#,
            &format!("stdin = \"client\"\ntransfer = \"{transfer}\""),
        );
        let mut conn = connect(addr);
        conn.write_all(b"abc").unwrap();
        send(conn.as_raw_fd(), b"!", MsgFlags::MSG_OOB).unwrap();
        conn.write_all(b"def\n").unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).unwrap();
        // The urgent byte is out of band: not part of the stream.
        assert_eq!(out, "ABCDEF\n", "{transfer}");
        if transfer == "splice" {
            d.wait_log(&["copying through a buffer"]);
        }
        d.wait_record(1);
    }
}

/// An urgent byte from a client that goes on sending and reading: at the
/// mark splice(2) says EAGAIN while both ends are ready, round after round;
/// a few such rounds make the connection go on by copying, instead of
/// spinning or stalling.
#[test]
fn an_urgent_byte_mid_conversation_does_not_stall_a_splice() {
    use nix::sys::socket::{send, MsgFlags};
    use std::os::fd::AsRawFd;
    let (d, addr) = serve(r#"["cat"]"#, "stdin = \"client\"\ntransfer = \"splice\"");
    let mut conn = connect(addr);
    conn.write_all(b"abc").unwrap();
    send(conn.as_raw_fd(), b"!", MsgFlags::MSG_OOB).unwrap();
    conn.write_all(b"def\n").unwrap();
    let mut echoed = [0u8; 7];
    conn.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"abcdef\n");
    d.wait_log(&["copying through a buffer"]);
    conn.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(conn), b"");
    d.wait_record(1).assert_ended("output-ended", "0");
}

#[test]
fn an_idle_listener_holds_no_place_a_busy_one_needs() {
    // One service, one place, two sockets: clients of either are served.
    let (a, addr_a) = pass_tcp("v4");
    let (b, addr_b) = pass_tcp("other");
    let _d = Daemon::start(
        &one_service(r#"["echo", "hi"]"#, "max_connections = 1"),
        vec![a, b],
    );
    for _ in 0..3 {
        assert_eq!(fetch_text(addr_b), "hi\n");
        assert_eq!(fetch_text(addr_a), "hi\n");
    }
}

#[test]
fn a_command_that_cannot_start_is_recorded_and_the_daemon_serves_on() {
    // The working directory passes the config check, then disappears.
    let dir = tempfile::tempdir().unwrap();
    let wd = dir.path().join("wd");
    std::fs::create_dir(&wd).unwrap();
    let (d, addr) = serve(
        r#"["echo", "fine"]"#,
        &format!("working_directory = \"{}\"", wd.display()),
    );
    std::fs::remove_dir(&wd).unwrap();
    assert_eq!(fetch_text(addr), "", "the client is closed without output");
    let record = d.wait_record(1);
    assert_eq!(record.reason, "spawn-failed", "{record}");
    assert!(
        record.message.contains(&format!(
            "cannot change to working_directory {}: No such file or directory",
            wd.display()
        )),
        "{record}"
    );
    assert_eq!(record.level, "ERROR", "{record}");
    std::fs::create_dir(&wd).unwrap();
    assert_eq!(fetch_text(addr), "fine\n");
}

/// Only running out of descriptors makes a command wait for another
/// connection to end: any other failure to start is recorded at once, while
/// other connections run.
#[test]
fn a_command_that_cannot_start_does_not_wait_for_other_connections() {
    let dir = tempfile::tempdir().unwrap();
    let wd = dir.path().join("wd");
    std::fs::create_dir(&wd).unwrap();
    let (hold, hold_addr) = pass_tcp("hold");
    let (fail, fail_addr) = pass_tcp("fail");
    let config = format!(
        "[[service]]\nname = \"hold\"\ncommand = {}\n\
         [[service]]\nname = \"fail\"\ncommand = [\"echo\", \"fine\"]\ntimeout = \"5s\"\n\
         working_directory = \"{}\"\n",
        sh("echo held; exec sleep 30"),
        wd.display()
    );
    let d = Daemon::start(&config, vec![hold, fail]);
    let mut held = connect(hold_addr);
    assert_eq!(read_line(&mut held), "held\n");
    std::fs::remove_dir(&wd).unwrap();
    assert_eq!(
        fetch_text(fail_addr),
        "",
        "the client is closed without output"
    );
    let record = d.wait_record_where(|r| r.service == "fail");
    assert_eq!(record.reason, "spawn-failed", "{record}");
    let waits = d.log_lines(&["out of descriptors"]);
    assert!(waits.is_empty(), "{waits:?}");
}

#[test]
fn direct_transfer_hands_the_socket_to_the_command() {
    checksum_direct();
    // stdin is the socket too: a half-close reaches the command as EOF.
    let (d, addr) = serve(r#"["tr", "a-z", "A-Z"]"#, "transfer = \"direct\"");
    let mut conn = connect(addr);
    conn.write_all(b"hello direct\n").unwrap();
    conn.shutdown(Shutdown::Write).unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).unwrap();
    assert_eq!(out, "HELLO DIRECT\n");
    let record = d.wait_record(1);
    assert_eq!(record.reason, "command-exited", "{record}");
    assert_eq!((record.bytes, record.bytes_received), (13, 13), "{record}");
}

fn checksum_direct() {
    let script = "seq 1 30000000";
    let (d, addr) = serve(&sh(script), "transfer = \"direct\"");
    let (bytes, got) = received_sha256(connect(addr));
    assert_eq!(
        got,
        expected_sha256(script),
        "direct: {bytes} bytes arrived but differ"
    );
    // The daemon never saw the bytes; TCP_INFO counted them.
    let record = d.wait_record(1);
    assert_eq!(record.reason, "command-exited", "{record}");
    assert_eq!(record.bytes, bytes, "{record}");
}

#[test]
fn direct_transfer_ends_the_group_when_the_client_resets() {
    let (d, addr) = serve(
        &sh("trap '' TERM; sleep 1000 & echo $!; exec sleep 1000"),
        "transfer = \"direct\"",
    );
    let mut conn = connect(addr);
    let grandchild: i32 = read_line(&mut conn).trim().parse().unwrap();
    reset_on_close(&conn);
    drop(conn);
    let record = d.wait_record(1);
    assert_eq!(record.reason, "client-gone", "{record}");
    assert_eq!(record.exit, "SIGKILL", "{record}");
    assert!(gone_soon(grandchild), "grandchild {grandchild} survived");
    assert!(d.children().is_empty());
}

/// The command starts as a freshly exec'd program should: no signal blocked,
/// none ignored (the daemon ignores SIGPIPE and blocks all signals while it
/// spawns), in its own process group, with only descriptors 0, 1 and 2.
#[test]
fn the_command_starts_with_default_signals_its_own_group_and_three_descriptors() {
    let (passed, addr) = pass_tcp("test");
    // Started with a soft descriptor limit below the hard one, which the
    // daemon raises for itself.
    let opts = Options::env(&[("SR_NOFILE_SOFT", "1000")]);
    let mut d = Daemon::spawn(
        &one_service(
            r#"["sh", "-c", "grep -E '^Sig(Blk|Ign)' /proc/self/status; cut -d' ' -f5 /proc/$$/stat; ls /proc/self/fd | wc -l; ulimit -Sn"]"#,
            "",
        ),
        vec![passed],
        opts,
    );
    d.wait_note("READY=1");
    let (soft, _) = limits(d.pid(), "Max open files");
    assert_ne!(soft, "1000", "the daemon did not raise its soft limit");
    let out = fetch_text(addr);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "SigBlk:\t0000000000000000", "{out}");
    // Ignored: only what the daemon itself inherited ignored (a test
    // runner's environment may have some); not the SIGPIPE it ignores.
    let daemon_ignored = signal_mask(d.pid(), "SigIgn");
    // The daemon catches only the signals the spawn resets in the child
    // (sys.rs, RESET_SIGNALS): HUP, INT, BUS, SEGV, TERM. A handler added
    // elsewhere could run in the child before exec; this catches it.
    let caught = signal_mask(d.pid(), "SigCgt");
    // Signal 33 is glibc's own SIGSETXID handler, sent only by glibc's setuid
    // family, which the daemon never calls (the spawn uses raw syscalls).
    let reset: u64 = [1, 2, 7, 11, 15, 33].iter().map(|n| 1u64 << (n - 1)).sum();
    assert_eq!(
        caught & !reset,
        0,
        "SigCgt {caught:016x}: a handler the spawn does not reset"
    );
    let sigpipe = 1u64 << (13 - 1);
    assert_ne!(daemon_ignored & sigpipe, 0, "the daemon ignores SIGPIPE");
    assert_eq!(
        lines[1],
        format!("SigIgn:\t{:016x}", daemon_ignored & !sigpipe),
        "{out}"
    );
    let record = d.wait_record(1);
    assert_eq!(
        lines[2].trim(),
        record.pid.to_string(),
        "the command leads its own group: {out}"
    );
    // ls's own descriptors: 0, 1, 2 and the directory it lists.
    assert_eq!(lines[3].trim(), "4", "{out}");
    // The command gets back the soft limit the daemon was started with.
    assert_eq!(lines[4], "1000", "{out}");
}

/// A slow reader costs the daemon little: clients of a command that writes
/// without end, which read nothing, leave its output in the kernel's
/// buffers (where it holds the command back), not in the daemon's memory.
/// Each used to cost the daemon the relay's whole buffer (256 KiB from the
/// socket pair, 1 MiB from a pipe, and as much again behind TLS); now about
/// what a spliced connection costs (some 20 KiB, the connection's own
/// state; some 35 KiB with TLS in the daemon).
#[test]
fn slow_readers_cost_the_daemon_little_memory() {
    const WARM: usize = 4;
    const SLOW: usize = 24;
    /// Per slow reader, with a wide margin both ways.
    const BOUND_KIB: u64 = 128;
    let pki = Pki::new();
    for (name, tls) in [
        ("socketpair", false),
        ("copy", false),
        ("socketpair over TLS", true),
    ] {
        let transfer = name.split(' ').next().unwrap();
        let mut extra = format!("transfer = \"{transfer}\"\nmax_connections = 64\n");
        if tls {
            extra += &pki.tls_lines();
        }
        let (d, addr) = serve(r#"["cat", "/dev/zero"]"#, &extra);
        // The first few pay what every daemon pays once (threads, the
        // allocator's arenas); the rest, what a slow reader costs.
        let warm = SlowReaders::open(addr, WARM, tls.then_some(&pki));
        let before = settled(&d, WARM);
        let slow = SlowReaders::open(addr, SLOW, tls.then_some(&pki));
        let after = settled(&d, WARM + SLOW);
        let each = after.saturating_sub(before) / SLOW as u64;
        eprintln!("{name}: {before} -> {after} KiB anonymous, {each} KiB per slow reader");
        assert!(
            each < BOUND_KIB,
            "{name}: each slow reader costs the daemon {each} KiB ({before} -> {after} KiB for {SLOW})"
        );
        drop((warm, slow));
    }
}

/// Clients that connect and read nothing, until dropped: TCP streams, or
/// TLS sessions held by a Python process.
enum SlowReaders {
    Raw(Vec<TcpStream>),
    Tls(std::process::Child),
}

impl SlowReaders {
    fn open(addr: std::net::SocketAddr, n: usize, tls: Option<&Pki>) -> SlowReaders {
        let Some(pki) = tls else {
            return SlowReaders::Raw((0..n).map(|_| connect(addr)).collect());
        };
        let script = "import socket, ssl, sys\n\
            port, ca, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])\n\
            ctx = ssl.create_default_context(cafile=ca)\n\
            def tls():\n    \
                raw = socket.create_connection(('127.0.0.1', port), timeout=30)\n    \
                return ctx.wrap_socket(raw, server_hostname='localhost')\n\
            held = [tls() for _ in range(n)]\n\
            print('connected', flush=True)\n\
            sys.stdin.read()\n";
        let mut child = Command::new(PYTHON)
            .args(["-c", script, &addr.port().to_string(), &pki.file("ca.pem")])
            .arg(n.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "connected\n", "{n} TLS clients did not connect");
        SlowReaders::Tls(child)
    }
}

impl Drop for SlowReaders {
    fn drop(&mut self) {
        match self {
            SlowReaders::Raw(streams) => streams.clear(),
            SlowReaders::Tls(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The daemon's anonymous memory (KiB) once `commands` commands are blocked
/// on their full output and it has not moved for half a second.
fn settled(d: &Daemon, commands: usize) -> u64 {
    let blocked = || {
        let children = d.children();
        let full = children
            .iter()
            .filter(|&&c| blocked_on_full_stdout(c) || blocked_on_full_socket(c))
            .count();
        (full == commands).then_some(())
    };
    poll(PATIENCE, blocked)
        .unwrap_or_else(|| panic!("{commands} commands never all blocked on a full output"));
    let mut last = anonymous_kib(d.pid());
    poll(PATIENCE, || {
        std::thread::sleep(Duration::from_millis(500));
        let now = anonymous_kib(d.pid());
        let still = now.abs_diff(last) <= 64;
        last = now;
        still.then_some(now)
    })
    .expect("the daemon's memory never settled")
}
