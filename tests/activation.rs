//! Sockets and configuration: what the daemon accepts at start, and what it refuses.

mod common;

use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::Command;

use common::*;

fn check(config: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config).unwrap();
    let out = check_config(&path);
    let stderr = String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "C");
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

#[test]
fn check_accepts_the_example_config() {
    let out = Command::new(BIN)
        .args(["--check", "--config", "config.example.toml"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "config.example.toml: OK, 1 service(s)\n"
    );
}

#[test]
fn each_kind_of_bad_config_gets_its_located_message_and_exit_78() {
    let plain = tempfile::NamedTempFile::new().unwrap();
    let cases = [
        (
            "[[service]]\nname = \"a\"\ncommand = [\"true\"]\ncomand = [\"x\"]\n",
            "splice-relay: C:4:1: service \"a\": comand: unknown field `comand`; did you mean `command`?\n".to_owned(),
        ),
        (
            "[[service]]\nname = \"a\"\ncommand = [\"true\"]\nmax_connections = \"ten\"\n",
            "splice-relay: C:4:19: service \"a\": max_connections: invalid type: string \"ten\", expected usize\n".to_owned(),
        ),
        (
            "[[service]]\nname = \"a\"\ncommand = []\n",
            "splice-relay: C:3:11: service \"a\": command: must not be empty\n".to_owned(),
        ),
        (
            "[[service]]\nname = \"a\"\ncommand = [\"/usr/bin/no-such-program\"]\n",
            "splice-relay: C:3:11: service \"a\": command: /usr/bin/no-such-program: No such file or directory\n".to_owned(),
        ),
        (
            &*format!("[[service]]\nname = \"a\"\ncommand = [\"{}\"]\n", plain.path().display()),
            format!("splice-relay: C:3:11: service \"a\": command: {}: not executable\n", plain.path().display()),
        ),
        (
            "[[service]]\nname = \"a\"\ncommand = [\"true\"]\n\n[[service]]\nname = \"a\"\ncommand = [\"true\"]\n",
            "splice-relay: C:6:8: service \"a\": name: duplicate name: another service above has the same one\n".to_owned(),
        ),
        (
            "[[service]]\nname = \"a\"\ncommand = [\"true\"]\nstdin = \"socket\"\n",
            "splice-relay: C:4:9: service \"a\": stdin: \"socket\": expected one of \"null\" \"client\"\n".to_owned(),
        ),
        (
            "[[service]]\nname = \"a\"\ncommand = [\"true\"]\ntransfer = \"direct\"\nstdin = \"null\"\n",
            "splice-relay: C:5:9: service \"a\": stdin: \"null\" does not apply with transfer = \"direct\": the client's socket is the command's stdin\n".to_owned(),
        ),
        (
            "[[service]]\nname = \"a\"\ncommand = [\"true\"]\ntransfer = 1\n",
            "splice-relay: C:4:12: service \"a\": transfer: invalid type: integer `1`, expected one of \"splice\" \"copy\" \"socketpair\" \"direct\"\n".to_owned(),
        ),
        (
            "[[service]]\nname = \"a\"\ncommand = [\"true\"]\nkill_grace = \"soon\"\n",
            "splice-relay: C:4:14: service \"a\": kill_grace: \"soon\": expected a number and a unit, like \"5s\"\n".to_owned(),
        ),
    ];
    for (config, expected) in cases {
        let (code, _, stderr) = check(config);
        assert_eq!(code, 78, "config:\n{config}\nstderr: {stderr}");
        assert_eq!(stderr, expected, "config:\n{config}");
    }
}

#[test]
fn a_bad_config_stops_start_up_before_ready() {
    let (passed, _) = pass_tcp("x");
    let mut d = Daemon::spawn(
        "[[service]]\nname = \"a\"\ncommand = []\n",
        vec![passed],
        Options::default(),
    );
    assert_eq!(d.wait_exit().code(), Some(78));
    d.wait_log(&[":3:11: service \"a\": command: must not be empty"]);
    let notes = d.all_notes();
    assert!(!notes.iter().any(|n| n.contains("READY=1")), "{notes:?}");
}

#[test]
fn a_single_service_takes_every_socket_whatever_its_name() {
    let (a, addr_a) = pass_tcp("splice-relay.socket");
    let (b, addr_b) = pass_tcp("other");
    let _d = Daemon::start(&one_service(r#"["echo", "hi"]"#, ""), vec![a, b]);
    assert_eq!(fetch_text(addr_a), "hi\n");
    assert_eq!(fetch_text(addr_b), "hi\n");
}

#[test]
fn named_sockets_reach_their_services() {
    let (a, addr_a) = pass_tcp("alpha");
    let (b, addr_b) = pass_tcp("beta");
    let config = r#"
[[service]]
name = "alpha"
command = ["echo", "from alpha"]

[[service]]
name = "beta"
command = ["echo", "from beta"]
"#;
    let _d = Daemon::start(config, vec![b, a]);
    assert_eq!(fetch_text(addr_a), "from alpha\n");
    assert_eq!(fetch_text(addr_b), "from beta\n");
}

#[test]
fn a_socket_no_service_claims_is_refused_by_fd_and_name() {
    let (a, _) = pass_tcp("alpha");
    let (g, _) = pass_tcp("gamma");
    let config = "[[service]]\nname = \"alpha\"\ncommand = [\"true\"]\n[[service]]\nname = \"beta\"\ncommand = [\"true\"]\n";
    let mut d = Daemon::spawn(config, vec![a, g], Options::default());
    assert_eq!(d.wait_exit().code(), Some(78));
    d.wait_log(&[
        "fd 4 \"gamma\"",
        "no [[service]] in",
        "is named \"gamma\" (services: alpha, beta)",
    ]);
}

#[test]
fn a_passed_fd_that_is_not_a_listening_stream_socket_is_refused() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (client, _server) = UnixStream::pair().unwrap();
    let cases: [(OwnedFd, &str, &str); 2] = [
        (
            udp.into(),
            "dgram",
            "fd 3 (\"dgram\"): a Datagram socket; expected a stream socket",
        ),
        (
            client.into(),
            "conn",
            "fd 3 (\"conn\"): a stream socket that is not listening",
        ),
    ];
    for (fd, name, message) in cases {
        let passed = Passed {
            fd,
            name: name.into(),
        };
        let mut d = Daemon::spawn(
            &one_service(r#"["true"]"#, ""),
            vec![passed],
            Options::default(),
        );
        assert_eq!(d.wait_exit().code(), Some(78), "{name}");
        d.wait_log(&[message]);
    }
}

#[test]
fn a_unix_socket_gives_the_peer_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let _d = Daemon::start(
        &one_service(r#"["env"]"#, ""),
        vec![pass_unix(&path, "local")],
    );
    let mut s = UnixStream::connect(&path).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.lines().any(|l| l == "PROTO=UNIX"), "{out}");
    assert!(
        out.lines()
            .any(|l| l == format!("UNIXREMOTEEUID={}", nix::unistd::geteuid())),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l == format!("UNIXREMOTEPID={}", std::process::id())),
        "{out}"
    );
}

#[test]
fn without_socket_activation_it_binds_the_configured_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fallback.sock");
    let config = one_service(
        r#"["echo", "bound"]"#,
        &format!("listen = [\"127.0.0.1:0\", \"{}\"]", path.display()),
    );
    let mut d = Daemon::spawn(&config, vec![], Options::default());
    d.wait_note("READY=1");
    let addr = d.bound_tcp_addr();
    assert_eq!(fetch_text(addr), "bound\n");
    let mut out = String::new();
    UnixStream::connect(&path)
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, "bound\n");

    // A clean stop removes the socket file it created.
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.wait_exit().code(), Some(0));
    assert!(!path.exists());
    // What the manager was told, in order; also shows all_notes sees what
    // was sent (the bad-config test relies on it seeing READY=1).
    let notes = d.all_notes();
    let ready = notes.iter().position(|n| n.contains("READY=1"));
    let stopping = notes.iter().position(|n| n.contains("STOPPING=1"));
    assert!(
        ready.is_some() && stopping > ready,
        "READY=1, then STOPPING=1: {notes:?}"
    );
}

#[test]
fn without_socket_activation_a_service_needs_an_address() {
    let mut d = Daemon::spawn(&one_service(r#"["true"]"#, ""), vec![], Options::default());
    assert_eq!(d.wait_exit().code(), Some(78));
    d.wait_log(&[
        "service \"test\": listen: no address given, and the daemon is not socket-activated",
    ]);
}
