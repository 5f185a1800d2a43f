//! Shared commands (`shared = true`): one command, many clients, each
//! with its own protocol, limits and record; real clients (sockets, Python's
//! ssl and websockets, the console page in Chromium).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// A command that says "ready" (the first line of `file`), waits until
/// `go` exists, then writes the rest of `file` and exits: every client can
/// join before the output that matters.
fn gated_cat(file: &Path, go: &Path) -> String {
    sh(&format!(
        "head -n 1 {f}; while [ ! -e {g} ]; do sleep 0.02; done; tail -n +2 {f}",
        f = file.display(),
        g = go.display()
    ))
}

/// `lines` lines of text, "ready" first; returns the file's sha256.
fn text_file(path: &Path, lines: usize) -> String {
    let mut text = String::from("ready\n");
    for i in 0..lines {
        text.push_str(&format!(
            "line {i} of the shared feed: {:x}\n",
            i * 2_654_435_761
        ));
    }
    std::fs::write(path, text).unwrap();
    sha256_of(path)
}

/// Waits until STATUS= says the service's shared command has `n` clients.
fn wait_clients(d: &mut Daemon, service: &str, n: usize) {
    let note = d.wait_note(&format!("{n} client(s))"));
    assert!(note.contains(&format!("shared: {service} (pid")), "{note}");
}

#[test]
fn every_protocol_watches_one_command_and_gets_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (file, go) = (dir.path().join("feed.txt"), dir.path().join("go"));
    let sha = text_file(&file, 2000);
    let pki = Pki::new();
    let names = ["feed", "feed-tls", "feed-ws", "feed-bin"];
    let (passed, addrs): (Vec<_>, Vec<_>) = names.iter().map(|n| pass_tcp(n)).unzip();
    // The replay is "ready\n": each client gets it, whenever it joins.
    let config = format!(
        "[[service]]\nname = \"feed\"\ncommand = {}\nshared = true\nreplay = 6\nkill_grace = \"300ms\"\n\
         [[service]]\nname = \"feed-tls\"\nshared = \"feed\"\n{}\
         [[service]]\nname = \"feed-ws\"\nshared = \"feed\"\nprotocol = \"websocket\"\nconsole = true\n\
         [[service]]\nname = \"feed-bin\"\nshared = \"feed\"\nprotocol = \"websocket\"\nmessages = \"binary\"\n",
        gated_cat(&file, &go),
        pki.tls_lines()
    );
    let mut d = Daemon::start(&config, passed);
    let [raw, tls, ws, bin] = [addrs[0], addrs[1], addrs[2], addrs[3]];

    std::thread::scope(|scope| {
        let raws = [
            scope.spawn(move || read_all(connect(raw))),
            scope.spawn(move || {
                let out = std::process::Command::new("socat")
                    .args(["-u", &format!("TCP:{raw}"), "-"])
                    .output()
                    .expect("socat");
                assert!(out.status.success(), "socat: {out:?}");
                out.stdout
            }),
        ];
        let tls_client = scope.spawn(|| {
            python_tls(
                tls,
                &pki,
                r#"ctx = ssl.create_default_context(cafile=ca)
with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as s:
    data = bytearray()
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        data += chunk
print(hashlib.sha256(data).hexdigest())"#,
            )
        });
        let text_client = scope.spawn(move || {
            python_ws(
                &format!("ws://{ws}/"),
                r#"import hashlib
lines = []
async with websockets.connect(url, max_size=None) as ws:
    async for m in ws:
        lines.append(m)
    code = ws.close_code
print(json.dumps({"sha": hashlib.sha256("".join(l + "\n" for l in lines).encode()).hexdigest(), "code": code}))"#,
            )
        });
        let binary_client = scope.spawn(move || {
            python_ws(
                &format!("ws://{bin}/"),
                r#"import hashlib
data = bytearray()
async with websockets.connect(url, max_size=None) as ws:
    async for m in ws:
        data += m
    code = ws.close_code
print(json.dumps({"sha": hashlib.sha256(data).hexdigest(), "code": code}))"#,
            )
        });
        let browser = scope.spawn(move || {
            console_watching_in_chromium(&format!("http://{ws}/"), "shared-console.png")
        });
        wait_clients(&mut d, "feed", 6);
        std::fs::write(&go, "").unwrap();

        let mut got = Vec::new();
        for client in raws {
            let bytes = client.join().unwrap();
            let path = dir.path().join("got");
            std::fs::write(&path, &bytes).unwrap();
            got.push(("raw", sha256_of(&path)));
        }
        got.push(("tls", tls_client.join().unwrap().trim().to_owned()));
        for (what, client) in [("text", text_client), ("binary", binary_client)] {
            let v: serde_json::Value = serde_json::from_str(&client.join().unwrap()).unwrap();
            assert_eq!(
                v["code"], 1000,
                "{what}: the end of the output is a normal close"
            );
            got.push((what, v["sha"].as_str().unwrap().to_owned()));
        }
        for (what, client_sha) in &got {
            assert_eq!(client_sha, &sha, "{what}");
        }
        let (v, shot) = browser.join().unwrap();
        let rows: Vec<String> = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(
            v["out"],
            serde_json::json!(rows),
            "the console shows every line"
        );
        assert!(v["closed"].as_str().unwrap().contains("1000"), "{v}");
        assert!(shot.exists());
    });

    // Six records, each of the one instance, each ended by the output (and
    // the console page's, which ran nothing).
    let records = d.wait_records_where(6, |r| r.reason != "page");
    let instance = records[0].instance.expect("the instance watched");
    for r in &records {
        assert_eq!(
            (r.reason.as_str(), r.instance, r.pid),
            ("output-ended", Some(instance), records[0].pid),
            "{r}"
        );
    }
    let ended = d.wait_log(&["shared command ended: output-ended"]);
    assert!(
        ended.contains("clients=6") && ended.contains("clients_max=6"),
        "{ended}"
    );
    assert!(ended.contains("exit=\"0\""), "{ended}");
    // The next client starts a new instance.
    let _ = fetch(raw);
    let next = d.wait_record_where(|r| r.instance.is_some_and(|i| i != instance));
    assert_ne!(next.pid, records[0].pid, "{next}");
}

/// A client that stops reading falls behind; past `max_lag` it is dropped
/// (`lagging`) while the command and the other client go on.
#[test]
fn a_client_that_stops_reading_is_dropped_and_the_others_go_on() {
    stalled_reader("copy");
}

/// The same, fanned out by tee(2) (`transfer = "splice"`).
#[test]
fn a_client_that_stops_reading_is_dropped_and_the_others_go_on_by_tee() {
    stalled_reader("splice");
}

fn stalled_reader(transfer: &str) {
    // A shell loop: a feed that a reading client keeps up with.
    let (d, addr) = serve(
        &sh("while :; do echo a line of the feed; done"),
        &format!("shared = true\nmax_lag = 1048576\npipe_size = 65536\ntransfer = \"{transfer}\""),
    );
    let stalled = connect(addr);
    let mut reader = connect(addr);
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0usize;
    let mut looked = 0usize;
    let dropped = loop {
        let n = read_some(&mut reader, &mut buf);
        assert!(n > 0, "the reader was dropped too");
        got += n;
        if got - looked >= 1 << 20 {
            looked = got;
            let lagging = d.log_lines(&["reason=\"lagging\""]);
            if let Some(line) = lagging.first() {
                break Record::from_line(line).unwrap();
            }
            assert!(got < 1 << 31, "2 GiB read and nobody was dropped");
        }
    };
    assert!(
        dropped.message.contains("more than max_lag behind"),
        "{dropped}"
    );
    assert_eq!(dropped.peer_port(), stalled.local_addr().unwrap().port());
    // The reader goes on: another 4 MiB after the drop.
    let after = got + (4 << 20);
    while got < after {
        let n = read_some(&mut reader, &mut buf);
        assert!(n > 0, "the reader was dropped too");
        got += n;
    }
    drop((reader, stalled));
    let gone = d.wait_record_where(|r| r.reason == "client-gone");
    assert_eq!(gone.instance, dropped.instance, "{gone}");
}

/// `max_bytes` applies to each client of a shared command on its own.
#[test]
fn each_client_keeps_its_own_limits() {
    let (d, addr) = serve(
        &sh("while :; do echo tick; sleep 0.05; done"),
        "shared = true\nmax_bytes = 12",
    );
    let mut first = connect(addr);
    assert_eq!(read_all(&mut first), b"tick\ntick\nti");
    let record = d.wait_record(1);
    assert_eq!(record.reason, "max-bytes", "{record}");
    let mut second = connect(addr);
    assert_eq!(read_all(&mut second), b"tick\ntick\nti");
    assert_eq!(
        d.wait_records(2)[1].instance,
        record.instance,
        "the same command"
    );
}

/// So does `idle_timeout`: each client's own traffic counts, and a client
/// that idles out leaves the command running for the others.
#[test]
fn each_client_has_its_own_idle_timeout() {
    let (d, addr) = serve(
        &sh("echo hi; sleep 30"),
        "shared = true\nidle_timeout = \"1s\"",
    );
    let mut first = connect(addr);
    assert_eq!(read_line(&mut first), "hi\n");
    let mut second = connect(addr);
    // Each idles out on its own: the first 1 s after its line, the second
    // 1 s after it came (it got nothing).
    let records = d.wait_records(2);
    for r in &records {
        assert_eq!(r.reason, "idle-timeout", "{r}");
        assert!(r.duration_ms >= 1000, "{r}");
        assert_eq!(r.instance, records[0].instance, "{r}");
    }
    assert_eq!(read_all(&mut first), b"");
    assert_eq!(read_all(&mut second), b"");
    // The command went on without them: no record of its end yet.
    assert!(d.log_lines(&["shared command ended"]).is_empty());
}

/// A late joiner gets the latest `replay` bytes first; in WebSocket text
/// mode from the start of a line.
#[test]
fn late_joiners_get_the_replay() {
    let (passed, addr) = pass_tcp("log");
    let (ws_passed, ws) = pass_tcp("log-ws");
    // The command waits for a line on a FIFO the test writes when done.
    let dir = tempfile::tempdir().unwrap();
    let done = dir.path().join("done");
    nix::unistd::mkfifo(&done, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let config = format!(
        "[[service]]\nname = \"log\"\ncommand = {}\nshared = true\nreplay = 9\n\
         [[service]]\nname = \"log-ws\"\nshared = \"log\"\nprotocol = \"websocket\"\n",
        sh(&format!(
            "printf 'one\\ntwo\\nthree\\n'; read -r _ < {}",
            done.display()
        ))
    );
    let d = Daemon::start(&config, vec![passed, ws_passed]);
    let mut first = connect(addr);
    let mut seen = vec![0u8; 14];
    first.read_exact(&mut seen).unwrap();
    assert_eq!(seen, b"one\ntwo\nthree\n");
    // The last 9 bytes, as they are: "o\nthree\n" and one more.
    let mut late = connect(addr);
    let mut replay = vec![0u8; 9];
    late.read_exact(&mut replay).unwrap();
    assert_eq!(replay, b"wo\nthree\n");
    let lines = python_ws(
        &format!("ws://{ws}/"),
        r#"async with websockets.connect(url) as ws:
    print(json.dumps([await ws.recv()]))"#,
    );
    assert_eq!(
        lines.trim(),
        r#"["three"]"#,
        "a text client starts at a line"
    );
    std::fs::write(&done, "\n").unwrap();
    // The output ended: each client gets its end and its record.
    for mut client in [first, late] {
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }
    let ended = d.wait_records_where(2, |r| r.reason == "output-ended");
    assert_eq!(ended.len(), 2, "{ended:?}");
}

/// Clients that join while the output flows, with a replay that holds
/// all of it, each get all of it: none joins between the output going to
/// the clients already there and its going into the replay.
#[test]
fn clients_that_join_while_output_flows_miss_nothing() {
    joining_while_output_flows("copy");
}

/// The same, fanned out by tee(2).
#[test]
fn clients_that_join_while_output_flows_miss_nothing_by_tee() {
    joining_while_output_flows("splice");
}

fn joining_while_output_flows(transfer: &str) {
    let clients = env_count("SPLICE_RELAY_SHARED_JOINERS", 120);
    raise_nofile(clients as u64 * 2 + 256);
    // 169 KB, a line a write: output flows while the clients join.
    let command = sh(
        "i=0; while [ $i -lt 300 ]; do seq $((i * 100)) $((i * 100 + 99)); i=$((i + 1)); done | \
         while read -r a; do echo $a; done",
    );
    let expected: String = (0..30_000).map(|n| format!("{n}\n")).collect();
    let (d, addr) = serve(
        &command,
        &format!(
            "shared = true\nreplay = 1048576\nmax_lag = 4194304\nmax_connections = {clients}\n\
             transfer = \"{transfer}\""
        ),
    );
    let got: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let readers: Vec<_> = (0..clients)
            .map(|i| {
                scope.spawn(move || {
                    std::thread::sleep(Duration::from_millis(i as u64 * 3));
                    let mut s = connect(addr);
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).unwrap();
                    got
                })
            })
            .collect();
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (i, got) in got.iter().enumerate() {
        assert!(
            got == expected.as_bytes(),
            "client {i} got {} bytes of {}",
            got.len(),
            expected.len()
        );
    }
    let records = d.wait_records(clients);
    assert!(records.iter().all(|r| r.reason == "output-ended"));
}

/// The command starts with the first client, serves every client that
/// comes while it runs, and ends `linger` after the last one left.
#[test]
fn the_command_starts_with_the_first_client_and_ends_linger_after_the_last() {
    let mark = format!("sr-shared-{}", std::process::id());
    let (mut d, addr) = serve(
        &format!(r#"["sh", "-c", "echo $$; while :; do sleep 0.05; echo .; done", "{mark}"]"#),
        "shared = true\nlinger = \"500ms\"",
    );
    assert_eq!(
        processes_with(&mark),
        Vec::<i32>::new(),
        "nothing before a client"
    );
    let mut a = connect(addr);
    let pid: i32 = read_line(&mut a).trim().parse().unwrap();
    // (The shell's fork for each `sleep` shows its mark until the exec.)
    assert!(processes_with(&mark).contains(&pid));
    let b = connect(addr);
    wait_clients(&mut d, "test", 2);
    // Linger starts once the daemon sees the last client leave: after this.
    let left = Instant::now();
    drop((a, b));
    let records = d.wait_records(2);
    assert!(records.iter().all(|r| r.pid == pid), "{records:?}");
    // Not before linger, and then gone.
    let ended = d.wait_log(&["shared command ended: lingered"]);
    assert!(left.elapsed() >= Duration::from_millis(500), "{ended}");
    assert!(ended.contains("exit=\"SIGTERM\""), "{ended}");
    assert_eq!(processes_with(&mark), Vec::<i32>::new());
    // Another client, another instance.
    let mut c = connect(addr);
    let again: i32 = read_line(&mut c).trim().parse().unwrap();
    assert_ne!(again, pid);
}

/// `lagging = "wait"`: the command waits for its slowest client, so a
/// client that pauses still gets every byte.
#[test]
fn lagging_wait_holds_the_command_for_the_slowest_client() {
    slowest_client("copy");
}

/// The same, fanned out by tee(2) (`transfer = "splice"`).
#[test]
fn lagging_wait_holds_the_command_for_the_slowest_client_by_tee() {
    slowest_client("splice");
}

fn slowest_client(transfer: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    let sha = random_file(&file, 24 << 20);
    let go = dir.path().join("go");
    let (mut d, addr) = serve(
        &sh(&format!(
            "echo ready; while [ ! -e {} ]; do sleep 0.02; done; cat {}",
            go.display(),
            file.display()
        )),
        // The replay is "ready\n", for the client that joins second.
        &format!("shared = true\nreplay = 6\nlagging = \"wait\"\nmax_lag = 65536\npipe_size = 65536\ntransfer = \"{transfer}\""),
    );
    let client = |pause: bool| {
        let dir = dir.path().to_owned();
        std::thread::spawn(move || {
            let mut s = connect(addr);
            assert_eq!(read_line(&mut s), "ready\n");
            if pause {
                std::thread::sleep(Duration::from_secs(2));
            }
            let path = dir.join(format!("got-{pause}"));
            std::fs::write(&path, read_all(s)).unwrap();
            sha256_of(&path)
        })
    };
    let (fast, slow) = (client(false), client(true));
    wait_clients(&mut d, "test", 2);
    std::fs::write(&go, "").unwrap();
    assert_eq!(fast.join().unwrap(), sha);
    assert_eq!(slow.join().unwrap(), sha);
    for r in d.wait_records(2) {
        assert_eq!(r.reason, "output-ended", "{r}");
    }
}

/// A command started with the daemon runs without clients, and one that
/// exits is started again after a back-off that doubles.
#[test]
fn a_command_started_with_the_daemon_is_restarted_with_a_back_off() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let (d, _addr) = serve(
        &sh(&format!("echo start >> {}; exit 3", ledger.display())),
        "shared = true\nstart = \"daemon\"",
    );
    for ms in [100, 200, 400] {
        d.wait_log(&["starting it again in", &format!("restart_in_ms={ms}")]);
    }
    let starts = std::fs::read_to_string(&ledger).unwrap().lines().count();
    assert!(starts >= 3, "{starts} starts");
    let ended = d.wait_log(&["shared command ended: output-ended"]);
    assert!(ended.contains("exit=\"3\""), "{ended}");
}

/// A reload that changes the command: running clients keep watching the
/// old one, which ends (`replaced`) when they have left; new clients get
/// the new one.
#[test]
fn a_reload_leaves_running_clients_on_the_command_they_watch() {
    let ticking = |word: &str| sh(&format!("while :; do echo {word}; sleep 0.05; done"));
    let (mut d, addr) = serve(&ticking("A"), "shared = true\nlinger = \"30s\"");
    let mut old = connect(addr);
    assert_eq!(read_line(&mut old), "A\n");
    std::fs::write(
        &d.config_path,
        one_service(&ticking("B"), "shared = true\nlinger = \"30s\""),
    )
    .unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_note("RELOADING=1");
    d.wait_note("READY=1");
    let mut new = connect(addr);
    assert_eq!(read_line(&mut new), "B\n");
    for _ in 0..5 {
        assert_eq!(read_line(&mut old), "A\n");
    }
    drop(old);
    let ended = d.wait_log(&["shared command ended: replaced"]);
    assert!(ended.contains("clients=1"), "{ended}");
    assert_eq!(read_line(&mut new), "B\n");
    // A reload that changes nothing leaves the command running.
    d.signal(Signal::SIGHUP);
    d.wait_note("RELOADING=1");
    d.wait_note("READY=1");
    let mut same = connect(addr);
    assert_eq!(read_line(&mut same), "B\n");
    drop((new, same));
    let records = d.wait_records(3);
    assert_eq!(records[1].instance, records[2].instance, "{records:?}");
    assert_ne!(records[0].instance, records[1].instance, "{records:?}");
}

/// The stop: clients get `shutdown_timeout`, then the shared command gets
/// the ending order and writes its record before the daemon exits.
#[test]
fn the_stop_ends_clients_then_the_command() {
    let (passed, addr) = pass_tcp("test");
    let config = format!(
        "shutdown_timeout = \"300ms\"\n{}",
        one_service(
            &sh("while :; do echo tick; sleep 0.05; done"),
            "shared = true"
        )
    );
    let mut d = Daemon::start(&config, vec![passed]);
    let mut client = connect(addr);
    assert_eq!(read_line(&mut client), "tick\n");
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit();
    assert!(status.success(), "{status}");
    assert_eq!(d.wait_record(1).reason, "shutdown");
    let ended = d.wait_log(&["shared command ended: shutdown"]);
    assert!(ended.contains("exit=\"SIGTERM\""), "{ended}");
    let stopped = d.log_lines(&["stopped"]);
    assert_eq!(stopped.len(), 1);
    let text = d.log_text();
    assert!(
        text.find("shared command ended").unwrap() < text.find(" INFO stopped").unwrap(),
        "the command's record comes before the daemon stops:\n{text}"
    );
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest);
}

/// A thousand clients of one command each get all of its output.
#[test]
fn a_thousand_clients_watch_one_command() {
    thousand_clients("copy");
}

/// The same, fanned out by tee(2) (`transfer = "splice"`).
#[test]
fn a_thousand_clients_watch_one_command_by_tee() {
    thousand_clients("splice");
}

fn thousand_clients(transfer: &str) {
    let clients = env_count("SPLICE_RELAY_SHARED_CLIENTS", 1000);
    raise_nofile(clients as u64 * 2 + 256);
    let dir = tempfile::tempdir().unwrap();
    let (file, go) = (dir.path().join("feed.txt"), dir.path().join("go"));
    text_file(&file, 200);
    let expected = std::fs::read(&file).unwrap();
    let (mut d, addr) = serve(
        &gated_cat(&file, &go),
        &format!(
            "shared = true\nreplay = 6\nmax_connections = {clients}\ntransfer = \"{transfer}\""
        ),
    );
    let mut sockets: Vec<TcpStream> = (0..clients).map(|_| connect(addr)).collect();
    wait_clients(&mut d, "test", clients);
    std::fs::write(&go, "").unwrap();
    for s in &mut sockets {
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected);
    }
    let records = d.wait_records(clients);
    assert!(records
        .iter()
        .all(|r| r.reason == "output-ended" && r.instance == records[0].instance));
    let ended = d.wait_log(&["shared command ended"]);
    assert!(ended.contains(&format!("clients_max={clients}")), "{ended}");
    let _ = std::io::stdout().flush();
}

/// Raises this process's soft RLIMIT_NOFILE to at least `n` (within the hard limit).
fn raise_nofile(n: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < n {
        setrlimit(Resource::RLIMIT_NOFILE, n.min(hard), hard).unwrap();
    }
}

/// With a delegated cgroup, the shared command runs in a cgroup of its own
/// (whatever its clients do, nothing it starts outlives it), and its record
/// says what it used; the cgroup is emptied after `linger` (and goes back to
/// the daemon's pool of ready ones).
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: makes cgroups")]
fn a_shared_command_runs_in_a_cgroup_of_its_own() {
    require_root();
    let cgroup = TestCgroup::delegated();
    let (sock, addr) = pass_tcp("test");
    let opts = Options {
        cgroup: Some(cgroup.path.clone()),
        ..Options::default()
    };
    let mark = format!("sr-shared-cg-{}", std::process::id());
    let config = one_service(
        &format!(
            r#"["sh", "-c", "setsid sh -c 'sleep 60; :' $0 & echo $$; while :; do sleep 0.05; echo .; done", "{mark}"]"#
        ),
        "shared = true\nlinger = \"200ms\"",
    );
    let mut d = Daemon::spawn(&config, vec![sock], opts);
    d.wait_note("READY=1");
    let mut a = connect(addr);
    let pid: i32 = read_line(&mut a).trim().parse().unwrap();
    let mut b = connect(addr);
    assert_eq!(read_line(&mut b), ".\n");
    let own = cgroup.populated_slots();
    assert_eq!(own.len(), 1, "one cgroup for the one command: {own:?}");
    let procs = std::fs::read_to_string(cgroup.path.join(&own[0]).join("cgroup.procs")).unwrap();
    assert!(procs.lines().any(|p| p == pid.to_string()), "{procs}");
    assert!(
        procs.lines().count() >= 2,
        "the command and what it started: {procs}"
    );
    drop((a, b));
    let ended = d.wait_log(&["shared command ended: lingered"]);
    assert!(ended.contains("cpu_usec="), "{ended}");
    cgroup.wait_all_empty();
    assert_eq!(
        processes_with(&mark),
        Vec::<i32>::new(),
        "nothing outlives it"
    );
}

/// `lagging = "wait"`: a client that stalls holds the command back; once
/// it leaves, the command goes on for whoever comes next.
#[test]
fn a_stalled_client_that_leaves_releases_a_waiting_command() {
    let (mut d, addr) = serve(
        r#"["yes", "a line of the feed"]"#,
        "shared = true\nlagging = \"wait\"\nmax_lag = 65536\npipe_size = 65536\nlinger = \"30s\"",
    );
    let stalled = connect(addr);
    nix::sys::socket::setsockopt(&stalled, nix::sys::socket::sockopt::RcvBuf, &4096).unwrap();
    wait_clients(&mut d, "test", 1);
    // Held back: once the stalled client's buffers and backlog are full,
    // the daemon stops reading, and `yes` waits in a full pipe.
    let status = d
        .notes
        .iter()
        .rev()
        .find(|n| n.contains("shared: test (pid"))
        .unwrap()
        .clone();
    let pid: i32 = status
        .split("(pid ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let held = poll(Duration::from_secs(10), || {
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        wchan.ends_with("pipe_write").then_some(())
    });
    assert!(held.is_some(), "the command was never held back");
    reset_on_close(&stalled);
    drop(stalled);
    d.wait_record_where(|r| r.reason == "client-gone");
    let mut next = connect(addr);
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0;
    while got < 4 << 20 {
        let n = read_some(&mut next, &mut buf);
        assert!(n > 0, "the feed ended");
        got += n;
    }
}
