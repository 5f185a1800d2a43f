//! The per-service controls against the real binary: timeouts, max_bytes,
//! banner, access rules, per-source limits, rates, the PROXY protocol, and
//! what the command runs as. Slow readers and slowloris writers are here too:
//! they must end at their timeouts without slowing anyone else.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn timeout_ends_a_connection_and_its_command() {
    let (d, addr) = serve(&sh("echo start; exec sleep 60"), r#"timeout = "500ms""#);
    let started = Instant::now();
    let out = read_all(connect(addr));
    assert_eq!(out, b"start\n");
    let record = d.wait_record(1);
    assert_eq!(record.reason, "timeout", "{record}");
    assert!((500..5000).contains(&record.duration_ms), "{record}");
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(gone_soon(record.pid), "the command outlived its timeout");
}

#[test]
fn idle_timeout_spares_a_busy_connection_and_ends_a_silent_one() {
    let (busy, busy_addr) = pass_tcp("busy");
    let (quiet, quiet_addr) = pass_tcp("quiet");
    let config = r#"
[[service]]
name = "busy"
command = ["sh", "-c", "while :; do echo tick; sleep 0.1; done"]
idle_timeout = "1500ms"
kill_grace = "300ms"

[[service]]
name = "quiet"
command = ["sh", "-c", "echo a; sleep 0.2; echo b; exec sleep 60"]
idle_timeout = "1500ms"
kill_grace = "300ms"
"#;
    let d = Daemon::start(config, vec![busy, quiet]);

    let mut b = connect(busy_addr);
    let q = connect(quiet_addr);
    // The quiet one ends 1.5 s after its last line.
    assert_eq!(read_all(q), b"a\nb\n");
    let record = d.wait_record_where(|r| r.service == "quiet");
    assert_eq!(record.reason, "idle-timeout", "{record}");
    // Not much later either: the timer is set for when the quiet would
    // reach idle_timeout, not idle_timeout after the daemon last looked.
    assert!((1700..3800).contains(&record.duration_ms), "{record}");
    // The busy one outlived it, several idle periods long, and still runs;
    // and the daemon sleeps between its lines (a timer set in the past
    // would spin a core).
    let cpu = cpu_ticks(d.pid());
    let until = Instant::now() + Duration::from_millis(3500);
    let mut ticks = 0;
    while Instant::now() < until {
        assert_eq!(read_line(&mut b), "tick\n");
        ticks += 1;
    }
    assert!(ticks >= 10, "{ticks}");
    let spent = cpu_ticks(d.pid()) - cpu;
    assert!(
        spent < clock_ticks_per_second(),
        "{spent} ticks of CPU in 3.5 s"
    );
    let records = d.records();
    assert!(records.iter().all(|r| r.service != "busy"), "{records:#?}");
}

#[test]
fn max_bytes_sends_exactly_that_many_then_ends_the_command() {
    for transfer in ["socketpair", "splice", "copy"] {
        let (d, addr) = serve(
            r#"["cat", "/dev/zero"]"#,
            &format!("max_bytes = 100000\ntransfer = \"{transfer}\""),
        );
        let out = read_all(connect(addr));
        assert_eq!(out.len(), 100_000, "{transfer}");
        let record = d.wait_record(1);
        assert_eq!(record.reason, "max-bytes", "{record}");
        assert_eq!(record.bytes, 100_000, "{record}");
        assert!(gone_soon(record.pid));
        assert_eq!(record.exit, "SIGTERM", "{record}");
    }
}

#[test]
fn banner_comes_before_the_output_on_every_path() {
    for transfer in ["splice", "direct"] {
        let (mut d, addr) = serve(
            r#"["echo", "x"]"#,
            &format!("banner = \"hello\\r\\n\"\ntransfer = \"{transfer}\""),
        );
        assert_eq!(fetch(addr), b"hello\r\nx\n", "{transfer}");
        let record = d.wait_record(1);
        assert_eq!(record.bytes, 9, "{record}");
        // The daemon's total counts the banner once on both paths.
        d.wait_note("STATUS=0 active, 1 served, 9 B sent");
    }
}

#[test]
fn max_per_source_refuses_with_the_busy_message_and_frees_on_close() {
    let (mut d, addr) = serve(
        // It writes now and then, so a client that leaves is noticed.
        &sh("echo up; while sleep 0.2; do echo .; done"),
        "max_per_source = 2\nbusy_message = \"busy\\n\"",
    );
    let mut first = connect(addr);
    let mut second = connect(addr);
    assert_eq!(read_line(&mut first), "up\n");
    assert_eq!(read_line(&mut second), "up\n");
    // The third and fourth get the message and no command.
    assert_eq!(read_all(connect(addr)), b"busy\n");
    assert_eq!(read_all(connect(addr)), b"busy\n");
    let warn = d.wait_log(&["refused 127.0.0.1:", "at max_per_source (2)"]);
    assert!(warn.contains("reason=\"max-per-source\""), "{warn}");
    // Both refusals counted (and logged, or not) before looking.
    d.wait_note("2 refused");
    assert_eq!(
        d.log_lines(&["refused 127.0.0.1:", "WARN"]).len(),
        1,
        "one warning per episode"
    );
    assert_eq!(d.children().len(), 2, "no command for refused clients");

    drop(first);
    let record = d.wait_record_where(|_| true);
    assert_eq!(record.reason, "client-gone", "{record}");
    let mut again = connect(addr);
    assert_eq!(read_line(&mut again), "up\n");
    // The episode's end is logged with its count once refusals stop.
    let end = d.wait_log(&["refusals ended", "reason=\"max-per-source\""]);
    assert!(end.contains("refused=2"), "{end}");
}

/// Without `max_per_source`, one address may hold half of the service's
/// places: here 2 of `max_connections = 3`. Loopback clients are not
/// counted by that default (the connections below all come from 127.0.0.1;
/// the PROXY header names the source the rules see).
#[test]
fn by_default_one_address_holds_at_most_half_the_places() {
    let (d, addr) = serve(
        &sh("echo up; while sleep 0.2; do echo .; done"),
        "max_connections = 3\nproxy_protocol = true\nbusy_message = \"busy\\n\"",
    );
    let from = |ip: &str| {
        let mut c = connect(addr);
        let header = format!("PROXY TCP4 {ip} 198.51.100.1 5555 443\r\n");
        c.write_all(header.as_bytes()).unwrap();
        c
    };
    let mut first = from("192.0.2.7");
    let mut second = from("192.0.2.7");
    assert_eq!(read_line(&mut first), "up\n");
    assert_eq!(read_line(&mut second), "up\n");
    assert_eq!(read_all(from("192.0.2.7")), b"busy\n");
    d.wait_log(&["refused 192.0.2.7:5555", "at max_per_source (2)"]);
    // Another address gets the last place; so would a loopback one.
    let mut other = from("192.0.2.8");
    assert_eq!(read_line(&mut other), "up\n");
    drop((first, second, other));

    let (_d, addr) = serve(
        &sh("echo up; while sleep 0.2; do echo .; done"),
        "max_connections = 3",
    );
    let mut local: Vec<_> = (0..3).map(|_| connect(addr)).collect();
    for c in &mut local {
        assert_eq!(read_line(c), "up\n", "loopback clients take every place");
    }
}

#[test]
fn rate_refuses_clients_beyond_the_bucket() {
    let (d, addr) = serve(
        r#"["echo", "x"]"#,
        "rate = 0.2\nbusy_message = \"slow down\\n\"",
    );
    let (mut served, mut refused) = (0, 0);
    let started = Instant::now();
    for _ in 0..10 {
        match fetch(addr).as_slice() {
            b"x\n" => served += 1,
            b"slow down\n" => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    // A bucket of 1 that refills every 5 s.
    let allowed = 1 + (started.elapsed().as_secs_f64() * 0.2).floor() as usize;
    assert!(
        served >= 1 && served <= allowed,
        "served {served}, allowed {allowed}"
    );
    assert!(refused >= 1, "nothing refused");
    assert_eq!(served + refused, 10);
    d.wait_log(&["refused 127.0.0.1:", "reason=\"rate\""]);
}

#[test]
fn allow_and_deny_close_refused_clients_without_a_command() {
    let cases = [
        (r#"allow = ["10.0.0.0/8"]"#, false),
        (r#"deny = ["127.0.0.1"]"#, false),
        (
            r#"allow = ["127.0.0.0/8"]
deny = ["127.0.0.2"]"#,
            true,
        ),
        (r#"allow = ["::1", "127.0.0.1/32"]"#, true),
    ];
    for (rules, admitted) in cases {
        let (d, addr) = serve(
            r#"["echo", "x"]"#,
            &format!("{rules}\nbusy_message = \"no\""),
        );
        let out = fetch(addr);
        if admitted {
            assert_eq!(out, b"x\n", "{rules}");
            d.wait_record(1);
        } else {
            // Denied clients are told nothing, not even the busy message.
            assert_eq!(out, b"", "{rules}");
            d.wait_log(&["refused 127.0.0.1:", "reason=\"denied\""]);
            assert!(d.records().is_empty(), "{rules}");
        }
    }
}

/// Waits until the daemon has read all that `c` sent: its kernel has
/// acknowledged the bytes, and they are no longer in its socket's receive
/// queue.
fn wait_until_read(c: &TcpStream) {
    let (client, server) = (c.local_addr().unwrap(), c.peer_addr().unwrap());
    let read = poll(PATIENCE, || {
        let acked = tcp_queues(client, server)?.0 == 0;
        (acked && tcp_queues(server, client)?.1 == 0).then_some(())
    });
    assert!(
        read.is_some(),
        "the daemon did not read what was sent: {:?} (client), {:?} (daemon)",
        tcp_queues(client, server),
        tcp_queues(server, client)
    );
}

fn proxy_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    match (src, dst) {
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            h.push(0x21); // TCP over IPv6
            h.extend_from_slice(&(36u16 + 7).to_be_bytes());
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
            h.extend_from_slice(&s.port().to_be_bytes());
            h.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => unreachable!(),
    }
    // One TLV (PP2_TYPE_AUTHORITY "host"), which is skipped.
    h.extend_from_slice(&[0x02, 0x00, 0x04]);
    h.extend_from_slice(b"host");
    h
}

#[test]
fn proxy_protocol_gives_the_client_address_to_the_command_and_the_rules() {
    let (d, addr) = serve(
        &sh("echo $REMOTE_ADDR $REMOTE_PORT $TCPLOCALIP; cat"),
        "proxy_protocol = true\nstdin = \"client\"\ndeny = [\"192.0.2.66\"]",
    );
    // v1, with the payload in the same write: it reaches the command intact.
    let mut c = connect(addr);
    c.write_all(b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 443\r\npayload")
        .unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(c), b"192.0.2.7 5555 198.51.100.1\npayload");
    assert_eq!(d.wait_record(1).peer, "192.0.2.7:5555");

    // v2 over IPv6, the header split across writes.
    let mut c = connect(addr);
    let header = proxy_v2(
        "[2001:db8::7]:6000".parse().unwrap(),
        "[2001:db8::1]:443".parse().unwrap(),
    );
    c.write_all(&header[..10]).unwrap();
    // The rest only once the daemon has read the first part.
    wait_until_read(&c);
    c.write_all(&header[10..]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(c), b"2001:db8::7 6000 2001:db8::1\n");
    assert_eq!(d.wait_record(2).peer, "[2001:db8::7]:6000");

    // The rules see the proxied address.
    let mut c = connect(addr);
    c.write_all(b"PROXY TCP4 192.0.2.66 198.51.100.1 5555 443\r\n")
        .unwrap();
    assert_eq!(read_all(c), b"");
    d.wait_log(&["refused 192.0.2.66:5555", "reason=\"denied\""]);

    // A malformed header closes the connection; nothing runs.
    let mut c = connect(addr);
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(read_all(c), b"");
    let line = d.wait_log(&["reason=\"proxy-header\""]);
    assert!(line.contains("not a PROXY protocol header"), "{line}");
    assert_eq!(d.records().len(), 2);
}

#[test]
fn proxy_from_refuses_a_header_from_anyone_else() {
    let (d, addr) = serve(
        r#"["echo", "x"]"#,
        "proxy_protocol = true\nproxy_from = [\"10.0.0.0/8\"]",
    );
    // A client that reaches the socket directly cannot claim an address.
    let mut c = connect(addr);
    c.write_all(b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 443\r\n")
        .unwrap();
    assert_eq!(read_all(c), b"");
    let line = d.wait_log(&["refused 127.0.0.1:", "reason=\"proxy-untrusted\""]);
    assert!(line.contains("not in proxy_from"), "{line}");
    assert!(d.records().is_empty());
}

#[test]
#[cfg_attr(
    not(as_root),
    ignore = "needs root: the command switches to user nobody"
)]
fn command_runs_as_another_user_with_limits_and_nice() {
    require_root();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let (_d, addr) = serve(
        &sh("id -u; id -g; ulimit -n; ulimit -t; ulimit -v; awk '/Max processes/ {print $3}' /proc/self/limits; cut -d' ' -f19 /proc/self/stat; grep -E '^Cap(Prm|Eff|Amb)' /proc/self/status; pwd"),
        "user = \"nobody\"\nrlimit_nofile = 77\nrlimit_cpu = 30\nrlimit_as = 1073741824\nrlimit_nproc = 500\nnice = 7\nworking_directory = \"/tmp\"",
    );
    let out = fetch_text(addr);
    assert_eq!(
        out,
        format!(
            "{}\n{}\n77\n30\n1048576\n500\n7\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapAmb:\t0000000000000000\n/tmp\n",
            nobody.uid, nobody.gid
        )
    );
}

/// The launcher threads run at nice 10, below the event loop, so that a
/// burst of spawns yields the CPU to running streams; the commands they
/// start get their own priority back (the daemon's, or their service's
/// `nice`) before their exec. Root has CAP_SYS_NICE, which allows it.
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: CAP_SYS_NICE")]
fn launchers_run_below_the_event_loop_and_commands_at_their_own_priority() {
    require_root();
    let nice_of = |stat: &str| -> i64 {
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(16).unwrap().parse().unwrap()
    };
    let (d, addr) = serve(&sh("cut -d' ' -f19 /proc/self/stat"), "");
    assert_eq!(fetch_text(addr), "0\n", "the command's nice");
    let line = d.wait_log(&["launchers: "]);
    assert!(line.contains("at nice 10"), "{line}");
    let mut seen = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", d.pid())).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap();
        let Ok(stat) = std::fs::read_to_string(task.join("stat")) else {
            continue;
        };
        seen.push((comm.trim().to_owned(), nice_of(&stat)));
    }
    let launchers: Vec<_> = seen
        .iter()
        .filter(|(c, _)| c.starts_with("launcher-"))
        .collect();
    assert!(!launchers.is_empty(), "{seen:?}");
    assert!(launchers.iter().all(|(_, n)| *n == 10), "{seen:?}");
    assert!(
        seen.iter()
            .filter(|(c, _)| c.starts_with("tokio"))
            .all(|(_, n)| *n == 0),
        "the event loop stays at 0: {seen:?}"
    );
    let (_d, addr) = serve(&sh("cut -d' ' -f19 /proc/self/stat; awk '/Max nice priority/ {print $4}' /proc/self/limits"), "nice = 5");
    assert_eq!(
        fetch_text(addr),
        "5\n0\n",
        "the service's nice; RLIMIT_NICE as it was"
    );
}

#[test]
#[cfg_attr(
    not(as_root),
    ignore = "needs root: the check runs as uid 65534 through setpriv"
)]
fn check_refuses_a_user_switch_the_daemon_cannot_make() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[[service]]\nname = \"a\"\ncommand = [\"true\"]\nuser = \"root\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(BIN)
        .arg("--check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:4:8: service \"a\": user: running commands as user \"root\" (uid 0) needs CAP_SETUID and CAP_SETGID, which the daemon (uid 65534) does not have",
            path.display()
        )),
        "{err}"
    );
}

/// 200 slow clients (100 reading a byte a second, 100 sending a byte a
/// second to `cat`) beside one fast client: once they have settled, the fast
/// one gets at least half its speed alone, and every slow one ends at its
/// `timeout` (12 s, long enough on a loaded machine for the measurement to happen among them).
#[test]
fn slow_readers_and_slowloris_writers_end_at_their_timeouts_without_slowing_others() {
    const SLOW: usize = 200;
    const FAST_BYTES: u64 = 200 << 20;
    let (fast, fast_addr) = pass_tcp("fast");
    let (reader, reader_addr) = pass_tcp("reader");
    let (writer, writer_addr) = pass_tcp("writer");
    let config = format!(
        r#"
[[service]]
name = "fast"
command = ["head", "-c", "{FAST_BYTES}", "/dev/zero"]

[[service]]
name = "reader"
command = ["yes"]
timeout = "12s"
kill_grace = "300ms"
max_connections = 1000

[[service]]
name = "writer"
command = ["cat"]
stdin = "client"
timeout = "12s"
kill_grace = "300ms"
max_connections = 1000
"#
    );
    let d = Daemon::start(&config, vec![fast, reader, writer]);
    let measure = || {
        let started = Instant::now();
        let n = read_all(connect(fast_addr)).len() as u64;
        assert_eq!(n, FAST_BYTES);
        FAST_BYTES as f64 / started.elapsed().as_secs_f64()
    };
    // The best of three each way: one sample on a shared machine is noise.
    let best = || (0..3).map(|_| measure()).fold(0.0, f64::max);
    let alone = best();

    let slow = std::thread::spawn(move || {
        fan_out(SLOW, SLOW, move |i| {
            let reads = i % 2 == 0;
            let mut s = connect(if reads { reader_addr } else { writer_addr });
            s.set_nodelay(true).unwrap();
            // A byte a second for 13.5 s, or until the daemon ends it.
            let started = Instant::now();
            while started.elapsed() < Duration::from_millis(13500) {
                let r = if reads {
                    let mut b = [0u8; 1];
                    s.read(&mut b).map(|n| n > 0)
                } else {
                    s.write(b"x").map(|n| n > 0)
                };
                if !matches!(r, Ok(true)) {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    });
    // Measured once the slow clients have settled: all their commands run
    // and the daemon is quiet again (filling 200 connections' socket and
    // pipe buffers at the start is a burst, not their steady cost).
    let deadline = Instant::now() + PATIENCE;
    poll(PATIENCE, || (d.children().len() >= SLOW).then_some(()))
        .expect("the slow clients never all started");
    loop {
        let before = cpu_ticks(d.pid());
        // The measurement's window.
        std::thread::sleep(Duration::from_millis(200));
        // Under 10% of a core over the window.
        if (cpu_ticks(d.pid()) - before) * 50 < clock_ticks_per_second() {
            break;
        }
        assert!(Instant::now() < deadline, "the daemon never settled");
    }
    let beside = best();
    let timed_out = |r: &Record| r.reason == "timeout";
    assert!(
        !d.records().iter().any(timed_out),
        "the slow clients must still be there while the fast one is measured"
    );
    slow.join().unwrap();
    eprintln!(
        "fast client alone {:.2} GB/s, beside {SLOW} slow clients {:.2} GB/s ({:.2}x)",
        alone / 1e9,
        beside / 1e9,
        beside / alone,
    );
    // Only a gross loss fails here (an event loop the slow clients block
    // reaches a few percent); the ratio itself is the benchmark's to
    // measure: on a shared machine, with the suite's other tests beside
    // it, it moves between 0.5 and 1.0 from run to run.
    assert!(beside > alone * 0.25, "alone {alone}, beside {beside}");
    // Each ended at its timeout (12 s), not later.
    for record in d.wait_records_where(SLOW, timed_out) {
        assert!((12000..15000).contains(&record.duration_ms), "{record}");
    }
    assert!(d.children().iter().all(|p| gone_soon(*p)));
}

/// How people grow past one machine: Debian's HAProxy in front of two
/// daemons (TCP mode, `send-proxy-v2`). Clients from two addresses are
/// spread over both daemons; every record names the real client, each
/// command sees it in REMOTE_ADDR, and `max_per_source` holds for it.
#[test]
fn behind_haproxy_two_daemons_name_the_real_client_and_hold_max_per_source() {
    let extra = "stdin = \"client\"\nproxy_protocol = true\nproxy_from = [\"127.0.0.1/32\"]\nmax_per_source = 1";
    let command = sh("echo $REMOTE_ADDR; read x");
    let (a, a_addr) = serve(&command, extra);
    let (b, b_addr) = serve(&command, extra);
    let dir = tempfile::tempdir().unwrap();
    let (probe, front) = tcp_listener();
    drop(probe);
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend front\n  bind {front}\n  default_backend relays\n\
             backend relays\n  balance roundrobin\n  server a {a_addr} send-proxy-v2\n  server b {b_addr} send-proxy-v2\n"
        ),
    )
    .unwrap();
    let mut haproxy = std::process::Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("haproxy (Debian's haproxy package)");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _haproxy = Kill(&mut haproxy);
    // HAProxy says nothing when it is ready: it is once it listens (a
    // connection to see would go to a daemon, and turn the round robin).
    let listens = || {
        let ss = std::process::Command::new("ss")
            .args(["-Hltn", &format!("sport = :{}", front.port())])
            .output()
            .ok()?;
        String::from_utf8_lossy(&ss.stdout)
            .contains("LISTEN")
            .then_some(())
    };
    poll(PATIENCE, listens).expect("haproxy listening");

    // A client bound to its own loopback address, as another host would be.
    let client = |ip: &str| {
        let socket = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::empty(),
            None,
        )
        .unwrap();
        let local: std::net::SocketAddr = format!("{ip}:0").parse().unwrap();
        nix::sys::socket::bind(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            &nix::sys::socket::SockaddrIn::from(match local {
                std::net::SocketAddr::V4(v4) => v4,
                _ => unreachable!(),
            }),
        )
        .unwrap();
        let stream = TcpStream::from(socket);
        let target = nix::sys::socket::SockaddrIn::from(match front {
            std::net::SocketAddr::V4(v4) => v4,
            _ => unreachable!(),
        });
        nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&stream), &target).unwrap();
        stream
    };
    // Round robin: .7 to a, .7 to b, .8 to a, .8 to b.
    let mut held = Vec::new();
    for ip in ["127.0.0.7", "127.0.0.7", "127.0.0.8", "127.0.0.8"] {
        let mut s = client(ip);
        assert_eq!(
            read_line(&mut s),
            format!("{ip}\n"),
            "REMOTE_ADDR is the client"
        );
        held.push(s);
    }
    // A second client from .7 on a, where .7 holds its one place: refused.
    let mut over = client("127.0.0.7");
    assert_eq!(
        read_line(&mut over),
        "",
        "max_per_source for the real client"
    );
    a.wait_log(&["refused 127.0.0.7", "max-per-source"]);
    assert!(
        b.log_lines(&["refused"]).is_empty(),
        "b holds .7's and .8's one place each"
    );
    for s in &mut held {
        s.write_all(b"bye\n").unwrap();
    }
    for d in [&a, &b] {
        let records = d.wait_records(2);
        let mut peers: Vec<&str> = records
            .iter()
            .map(|r| r.peer.split(':').next().unwrap())
            .collect();
        peers.sort();
        assert_eq!(
            peers,
            ["127.0.0.7", "127.0.0.8"],
            "each daemon served one of each"
        );
    }
}
