//! Several HTTP and WebSocket services on one socket, chosen by path: under
//! systemd (services that give the passed socket's name as `socket_name`)
//! and bound from `listen` (services that name the same address). curl and
//! Python's websockets are the clients; each connection's record names the
//! service its request went to, and each service keeps its own rules,
//! limits and command.

mod common;

use std::net::SocketAddr;

use common::*;

/// Services that share the passed socket "web", each `(name, protocol,
/// paths, command, extra lines)`.
fn site(services: &[(&str, &str, &str, &str, &str)]) -> String {
    let mut config = String::new();
    for (name, protocol, paths, command, extra) in services {
        config.push_str(&format!(
            "[[service]]\nname = \"{name}\"\nsocket_name = \"web\"\nprotocol = \"{protocol}\"\n\
             command = {command}\nkill_grace = \"300ms\"\n{paths}\n{extra}\n"
        ));
    }
    config
}

fn paths(list: &[&str]) -> String {
    let quoted: Vec<String> = list.iter().map(|p| format!("{p:?}")).collect();
    format!("paths = [{}]", quoted.join(", "))
}

/// The daemon serving `config` on one passed socket named "web", READY.
fn start(config: &str) -> (Daemon, SocketAddr) {
    let (passed, addr) = pass_tcp("web");
    (Daemon::start(config, vec![passed]), addr)
}

#[test]
fn one_socket_serves_each_path_s_command_and_the_longest_path_wins() {
    let (logs, deep, live) = (paths(&["/logs"]), paths(&["/logs/deep"]), paths(&["/live"]));
    let config = site(&[
        (
            "logs",
            "http",
            &logs,
            &sh("echo logs $SCRIPT_NAME $PATH_INFO"),
            "",
        ),
        ("deep", "http", &deep, &sh("echo deep $SCRIPT_NAME"), ""),
        (
            "live",
            "websocket",
            &live,
            &sh("echo live $SCRIPT_NAME"),
            "",
        ),
        ("rest", "http", "", &sh("echo rest $PATH_INFO"), ""),
    ]);
    let (d, addr) = start(&config);
    let get = |path: &str| {
        let got = curl(&url(addr, path), &[]);
        assert_eq!(got.status(), 200, "{path}: {}", got.stderr);
        got.text()
    };
    assert_eq!(get("/logs"), "logs /logs\n");
    assert_eq!(get("/logs/today"), "logs /logs /today\n");
    assert_eq!(get("/logs/deep/1"), "deep /logs/deep\n");
    // Under a path means at it or below a '/': /logsx is not under /logs.
    assert_eq!(get("/logsx"), "rest /logsx\n");
    assert_eq!(get("/anything"), "rest /anything\n");
    let out = python_ws(
        &format!("ws://{addr}/live"),
        r#"async with websockets.connect(url) as ws:
    print(json.dumps(await ws.recv()))"#,
    );
    assert_eq!(out.trim(), "\"live /live\"");

    let records = d.wait_records(6);
    let mut services: Vec<&str> = records.iter().map(|r| r.service.as_str()).collect();
    services.sort_unstable();
    assert_eq!(services, ["deep", "live", "logs", "logs", "rest", "rest"]);
    // The WebSocket client may close before the end of output reaches it.
    let ended = |r: &Record| r.reason == "output-ended" || r.service == "live";
    assert!(records.iter().all(ended), "{records:?}");
    d.wait_log(&["listening", "service=\"logs, deep, live, rest\""]);
}

#[test]
fn a_request_for_no_service_s_path_gets_404_and_runs_nothing() {
    let (a, b) = (paths(&["/a"]), paths(&["/b/"]));
    let config = site(&[
        ("a", "http", &a, &sh("echo a"), ""),
        ("b", "websocket", &b, &sh("echo b"), ""),
    ]);
    let (d, addr) = start(&config);
    for path in ["/", "/c", "/ab", "/b"] {
        let got = curl(&url(addr, path), &[]);
        assert_eq!(got.status(), 404, "{path}");
        assert!(
            got.text().contains("no service of this socket answers"),
            "{path}: {}",
            got.text()
        );
    }
    assert_eq!(curl(&url(addr, "/a/x"), &[]).text(), "a\n");
    d.wait_log(&["refused", "answered 404"]);
    // Only the request served has a record.
    assert_eq!(d.wait_records(1).len(), 1);
    assert_eq!(d.records().len(), 1);
}

#[test]
fn each_service_on_a_shared_socket_keeps_its_own_rules_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let (open, closed, one) = (paths(&["/open"]), paths(&["/closed"]), paths(&["/one"]));
    let hold = sh(&format!("echo held; cat {}", fifo.display()));
    let config = site(&[
        ("open", "http", &open, &sh("echo open"), ""),
        (
            "closed",
            "http",
            &closed,
            &sh("echo closed"),
            "deny = [\"127.0.0.0/8\"]",
        ),
        ("one", "http", &one, &hold, "max_connections = 1"),
    ]);
    let (d, addr) = start(&config);
    assert_eq!(curl(&url(addr, "/open"), &[]).text(), "open\n");
    let denied = curl(&url(addr, "/closed"), &[]);
    assert_eq!(denied.status(), 403, "{}", denied.text());
    d.wait_log(&["service=closed", "reason=\"denied\""]);

    // The one place of "one" is taken: the next client is told 503 at
    // once, and the other services still serve.
    let first = held(&url(addr, "/one"));
    let busy = curl(&url(addr, "/one"), &[]);
    assert_eq!(busy.status(), 503, "{}", busy.text());
    assert_eq!(busy.header("Retry-After").as_deref(), Some("1"));
    d.wait_log(&["service=one", "reason=\"max-connections\""]);
    assert_eq!(curl(&url(addr, "/open"), &[]).text(), "open\n");
    // Once it ends, its place is free again.
    std::fs::write(&fifo, "").unwrap();
    assert!(first.wait_with_output().unwrap().status.success());
    let second = held(&url(addr, "/one"));
    std::fs::write(&fifo, "").unwrap();
    assert!(second.wait_with_output().unwrap().status.success());
}

/// curl streaming `url`, once the command's first line ("held") is out.
fn held(url: &str) -> std::process::Child {
    let (child, mut out, line) = streaming(url);
    assert_eq!(line, "held\n");
    // The rest is read to its end, so curl never meets a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    child
}

#[test]
fn services_that_listen_on_the_same_address_share_it() {
    // An address for the daemon to bind (free a moment ago).
    let addr = tcp_listener().1;
    let listen = format!("listen = [\"{addr}\"]");
    let config = format!(
        "[[service]]\nname = \"one\"\nprotocol = \"http\"\ncommand = {}\n{}\n{listen}\n\
         [[service]]\nname = \"two\"\nprotocol = \"http\"\ncommand = {}\n{}\n{listen}\n",
        sh("echo one"),
        paths(&["/one"]),
        sh("echo two"),
        paths(&["/two"]),
    );
    let d = Daemon::start(&config, Vec::new());
    assert_eq!(curl(&url(addr, "/one"), &[]).text(), "one\n");
    assert_eq!(curl(&url(addr, "/two"), &[]).text(), "two\n");
    let records = d.wait_records(2);
    assert_eq!(records[0].service, "one");
    assert_eq!(records[1].service, "two");
}

#[test]
fn a_reload_can_add_a_service_to_a_shared_socket() {
    let (a, b) = (paths(&["/a"]), paths(&["/b"]));
    let (passed, addr) = pass_tcp("web");
    let first = site(&[("a", "http", &a, &sh("echo a"), "")]);
    let mut d = Daemon::start(&first, vec![passed]);
    assert_eq!(curl(&url(addr, "/b"), &[]).status(), 404);
    let second = site(&[
        ("a", "http", &a, &sh("echo a"), ""),
        ("b", "http", &b, &sh("echo b"), ""),
    ]);
    std::fs::write(&d.config_path, second).unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    d.wait_note("RELOADING=1");
    let ready = d.wait_note("READY=1");
    assert!(!ready.contains("reload failed"), "{ready}");
    assert_eq!(curl(&url(addr, "/b"), &[]).text(), "b\n");
    assert_eq!(curl(&url(addr, "/a"), &[]).text(), "a\n");
}

#[test]
fn services_that_cannot_share_a_socket_are_config_errors_with_their_position() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let (x, y) = (paths(&["/x"]), paths(&["/y"]));
    let cases = [
        (
            site(&[
                ("a", "http", &x, &sh("echo a"), ""),
                ("b", "raw", "", &sh("echo b"), ""),
            ]),
            "service \"b\": protocol: a raw service cannot share the systemd socket named \"web\" with service \"a\"",
        ),
        (
            site(&[
                ("a", "http", &x, &sh("echo a"), ""),
                ("b", "websocket", "paths = [\"/y\", \"/x\"]", &sh("echo b"), ""),
            ]),
            "service \"b\": paths: \"/x\" is also answered by service \"a\"",
        ),
        (
            site(&[
                ("a", "http", "", &sh("echo a"), ""),
                ("b", "http", "", &sh("echo b"), ""),
            ]),
            "service \"b\": paths: any path (neither has `paths`) is also answered by service \"a\"",
        ),
        (
            site(&[
                ("a", "http", &x, &sh("echo a"), ""),
                ("b", "http", &y, &sh("echo b"), &pki.tls_lines()),
            ]),
            "service \"b\": tls_certificate: differs from service \"a\"'s, which shares the systemd socket named \"web\"",
        ),
        (
            site(&[
                ("a", "http", &x, &sh("echo a"), ""),
                ("b", "http", &y, &sh("echo b"), "handshake_timeout = 3"),
            ]),
            "service \"b\": handshake_timeout: differs from service \"a\"'s",
        ),
    ];
    for (config, expected) in cases {
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, &config).unwrap();
        let out = check_config(&path);
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{said}");
        assert!(said.contains(expected), "expected {expected:?} in: {said}");
        // The position: the file, the line and the column.
        assert!(said.contains(&format!("{}:", path.display())), "{said}");
    }
}

#[test]
fn services_sharing_a_tls_socket_are_routed_after_the_handshake() {
    let pki = Pki::new();
    let (a, b) = (paths(&["/a"]), paths(&["/b"]));
    let tls = pki.tls_lines();
    let config = site(&[
        ("a", "http", &a, &sh("echo a $HTTPS"), &tls),
        ("b", "websocket", &b, &sh("echo b $HTTPS"), &tls),
    ]);
    let (d, addr) = start(&config);
    let resolve = format!("localhost:{}:127.0.0.1", addr.port());
    let ca = pki.file("ca.pem");
    let https = |path: &str| format!("https://localhost:{}{path}", addr.port());
    let got = curl(&https("/a"), &["--cacert", &ca, "--resolve", &resolve]);
    assert_eq!((got.code, got.status()), (0, 200), "{}", got.stderr);
    assert_eq!(got.text(), "a on\n");
    let missing = curl(&https("/c"), &["--cacert", &ca, "--resolve", &resolve]);
    assert_eq!(missing.status(), 404, "{}", missing.stderr);
    let record = d.wait_record_where(|r| r.service == "a");
    assert!(record.tls.starts_with("TLSv1.3"), "{record}");
}
