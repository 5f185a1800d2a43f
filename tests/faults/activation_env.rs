//! Malformed socket-activation variables (`LISTEN_FDS`, `LISTEN_FDNAMES`,
//! `LISTEN_PID`), and ones meant for another process: refused with exit 78
//! and a message naming the variable, or the documented fallback.

use nix::sys::signal::Signal;

use crate::common::*;

/// What is passed at fd 3 onwards.
#[derive(Clone, Copy)]
enum Sockets {
    /// This many listening TCP sockets.
    Tcp(usize),
    /// /dev/null, named "file".
    File,
}

/// The config the daemon gets.
#[derive(Clone, Copy)]
enum Config {
    /// One service printing "served" on the passed sockets.
    Served,
    /// One service printing "fallback" on `listen = "127.0.0.1:0"`, for when
    /// nothing is passed to this process.
    Bound,
    /// Two services, so a socket's name must match one of them.
    TwoServices,
}

enum Expect {
    /// Exit 78 with a message containing every string.
    Refused(&'static [&'static str]),
    /// READY=1, a log line containing every string, and the passed socket
    /// (or the `listen` address) serves.
    Serves(&'static [&'static str]),
}

use Config::*;
use Expect::*;
use RawPid::{Own, Unset, Value};
use Sockets::*;

/// One case: what it is, the sockets, LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID
/// (None: unset), the config, and the outcome.
type Case = (
    &'static str,
    Sockets,
    Option<&'static str>,
    Option<&'static str>,
    RawPid,
    Config,
    Expect,
);

#[rustfmt::skip]
const CASES: &[Case] = &[
    ("LISTEN_FDS=abc", Tcp(1), Some("abc"), Some("t"), Own, Served,
        Refused(&["invalid LISTEN_FDS", "LISTEN_FDS=\"abc\""])),
    ("LISTEN_FDS=-1", Tcp(1), Some("-1"), Some("t"), Own, Served,
        Refused(&["invalid LISTEN_FDS", "LISTEN_FDS=\"-1\""])),
    ("LISTEN_FDS empty", Tcp(1), Some(""), Some("t"), Own, Served,
        Refused(&["invalid LISTEN_FDS", "LISTEN_FDS=\"\""])),
    ("LISTEN_FDS=' 1'", Tcp(1), Some(" 1"), Some("t"), Own, Served,
        Refused(&["invalid LISTEN_FDS"])),
    ("LISTEN_FDS=99999", Tcp(1), Some("99999"), Some("t"), Own, Served,
        Refused(&["Bad file descriptor", "LISTEN_FDS=\"99999\""])),
    ("LISTEN_FDS=4294967295", Tcp(1), Some("4294967295"), Some("t"), Own, Served,
        Refused(&["fd count overflowed", "LISTEN_FDS=\"4294967295\""])),
    ("LISTEN_FDS=2, one fd open", Tcp(1), Some("2"), Some("a:b"), Own, Served,
        Refused(&["Bad file descriptor", "LISTEN_FDS=\"2\""])),
    ("fewer names than fds", Tcp(2), Some("2"), Some("a"), Own, Served,
        Refused(&["invalid LISTEN_FDNAMES", "LISTEN_FDNAMES=\"a\""])),
    ("more names than fds", Tcp(1), Some("1"), Some("a:b"), Own, Served,
        Refused(&["invalid LISTEN_FDNAMES", "LISTEN_FDNAMES=\"a:b\""])),
    ("empty LISTEN_FDNAMES, 2 fds", Tcp(2), Some("2"), Some(""), Own, Served,
        Refused(&["invalid LISTEN_FDNAMES"])),
    ("empty LISTEN_FDNAMES, 1 fd", Tcp(1), Some("1"), Some(""), Own, Served,
        Serves(&[])),
    ("no LISTEN_FDNAMES", Tcp(1), Some("1"), None, Own, Served,
        Serves(&[])),
    ("control characters in the name", Tcp(1), Some("1"), Some("we\u{1}ird\nname\t\u{1b}[31m"), Own, Served,
        Serves(&["listening", "fd 3 \"we\\u{1}ird\\nname\\t\\u{1b}[31m\""])),
    ("control characters, two services", Tcp(1), Some("1"), Some("bad\nname\u{7}"), Own, TwoServices,
        Refused(&["is named \"bad\\nname\\u{7}\""])),
    ("LISTEN_PID=abc", Tcp(1), Some("1"), Some("t"), Value("abc"), Served,
        Refused(&["invalid LISTEN_PID", "LISTEN_PID=\"abc\""])),
    ("LISTEN_PID empty", Tcp(1), Some("1"), Some("t"), Value(""), Served,
        Refused(&["invalid LISTEN_PID"])),
    ("LISTEN_PID=-5", Tcp(1), Some("1"), Some("t"), Value("-5"), Served,
        Refused(&["invalid LISTEN_PID"])),
    ("LISTEN_PID unset", Tcp(0), Some("1"), None, Unset, Bound,
        Serves(&[])),
    ("LISTEN_FDS=0", Tcp(0), Some("0"), None, Own, Bound,
        Serves(&[])),
    ("fd 3 is a file", File, Some("1"), Some("file"), Own, Served,
        Refused(&["fd 3 (\"file\"): not a socket"])),
];

/// Malformed `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID`: each ends in a
/// message on stderr naming the variable (or, past the variables, the fd)
/// and exit 78 (EX_CONFIG), or in the documented fallback (the socket serves;
/// without a socket for this process, the `listen` addresses are bound);
/// never a panic, never a hang, and no raw control character in the log.
#[test]
fn malformed_socket_activation_variables_are_refused_or_fall_back() {
    for (what, sockets, fds, names, pid, config, expect) in CASES {
        let mut text = match config {
            Bound => one_service(r#"["echo", "fallback"]"#, "listen = \"127.0.0.1:0\""),
            Served | TwoServices => one_service(r#"["echo", "served"]"#, ""),
        };
        if let TwoServices = config {
            text.push_str("[[service]]\nname = \"other\"\ncommand = [\"true\"]\n");
        }
        let (passed, addr) = match *sockets {
            File => {
                let null = std::fs::File::open("/dev/null").unwrap();
                let file = Passed {
                    fd: null.into(),
                    name: "file".into(),
                };
                (vec![file], None)
            }
            Tcp(n) => {
                let (passed, addrs): (Vec<_>, Vec<_>) =
                    (0..n).map(|i| pass_tcp(&format!("s{i}"))).unzip();
                (passed, addrs.first().copied())
            }
        };
        let raw = RawListen {
            fds: *fds,
            names: *names,
            pid: *pid,
        };
        let mut d = Daemon::spawn(&text, passed, Options::raw_listen(raw));
        match expect {
            Refused(needles) => {
                let code = d.wait_exit().code();
                let line = d.wait_log(&["splice-relay: "]);
                eprintln!("activation: {what}: exit {code:?}: {line}");
                assert_eq!(code, Some(78), "{what}: {}", d.log_text());
                for n in *needles {
                    assert!(line.contains(n), "{what}: {n:?} not in {line}");
                }
                let names_fd = matches!(config, TwoServices) || matches!(sockets, File);
                assert!(line.contains("LISTEN_") || names_fd, "{what}: {line}");
            }
            Serves(needles) => {
                d.wait_note("READY=1");
                if !needles.is_empty() {
                    d.wait_log(needles);
                }
                let (addr, want) = match config {
                    Bound => (d.bound_tcp_addr(), "fallback\n"),
                    _ => (addr.expect("a passed socket"), "served\n"),
                };
                assert_eq!(fetch_text(addr), want, "{what}");
                let listening = d.log_lines(&["listening"]);
                let warnings = d.log_lines(&["WARN"]);
                eprintln!("activation: {what}: serves; {listening:?}; warnings {warnings:?}");
                d.signal(Signal::SIGTERM);
                assert_eq!(d.wait_exit().code(), Some(0), "{what}");
            }
        }
        let log = d.log_text();
        assert!(!log.contains("panicked at"), "{what}: {log}");
        assert!(
            !log.chars().any(|c| c.is_control() && c != '\n'),
            "{what}: a raw control character reached the log: {log:?}"
        );
    }
}

/// `LISTEN_FDS` meant for another process comes, from systemd, with
/// `LISTEN_FDNAMES` too (systemd sets both), or without it: the daemon
/// ignores them with a warning and binds its `listen` addresses.
#[test]
fn listen_variables_for_another_process_are_ignored_with_their_names() {
    let cases = [
        (Value("1"), Some("web")),
        (Unset, Some("web")),
        (Value("1"), None),
    ];
    for (pid, names) in cases {
        let config = one_service(r#"["echo", "bound"]"#, "listen = \"127.0.0.1:0\"");
        let raw = RawListen {
            fds: Some("1"),
            names,
            pid,
        };
        let mut d = Daemon::spawn(&config, vec![], Options::raw_listen(raw));
        d.wait_note("READY=1");
        d.wait_log(&[
            "WARN",
            "LISTEN_FDS is set but LISTEN_PID is not this process",
        ]);
        let addr = d.bound_tcp_addr();
        assert_eq!(fetch_text(addr), "bound\n", "{raw:?}");
    }
}

/// `LISTEN_PID` of this process with `LISTEN_FDS=0`: nothing was passed, and
/// the warning must say so rather than blame `LISTEN_PID`.
#[test]
fn listen_fds_zero_is_not_blamed_on_listen_pid() {
    let config = one_service(r#"["echo", "bound"]"#, "listen = \"127.0.0.1:0\"");
    let raw = RawListen {
        fds: Some("0"),
        names: None,
        pid: Own,
    };
    let mut d = Daemon::spawn(&config, vec![], Options::raw_listen(raw));
    d.wait_note("READY=1");
    let warning = d.wait_log(&["WARN", "LISTEN_"]);
    assert!(
        !warning.contains("LISTEN_PID is not this process"),
        "LISTEN_PID is {}: {warning}",
        d.pid()
    );
}

/// The daemon starts with what systemd gives it: 0, 1, 2 and the sockets
/// passed. A descriptor that the test runner leaves open without
/// close-on-exec (a wrapper or a shell may leave one) must not reach it:
/// the cases above that count on the descriptor after the passed ones being
/// closed would find a file there.
#[test]
fn a_descriptor_the_runner_leaves_open_does_not_reach_the_daemon() {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let dir = tempfile::tempdir().unwrap();
    let stray = std::fs::File::create(dir.path().join("left-open")).unwrap();
    fcntl(&stray, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    let (passed, addr) = pass_tcp("t");
    let mut d = Daemon::spawn(
        &one_service(r#"["echo", "served"]"#, ""),
        vec![passed],
        Options::default(),
    );
    // Open for the start only: the test's other children inherit it meanwhile.
    drop(stray);
    d.wait_note("READY=1");
    let fds = fd_targets(d.pid());
    assert!(
        !fds.iter().any(|(_, target)| target.ends_with("/left-open")),
        "the daemon has the runner's descriptor: {fds:?}"
    );
    let third = fds.iter().find(|(n, _)| *n == 3);
    assert!(
        third.is_some_and(|(_, t)| t.starts_with("socket:")),
        "{fds:?}"
    );
    assert_eq!(fetch_text(addr), "served\n");
}
