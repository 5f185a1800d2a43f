//! Bad files and bad values: each error with its exact message and its
//! position (file, line, column, service, key).

use std::sync::Arc;

use super::*;

#[test]
fn websocket_keys_are_checked() {
    let svc = |extra: &str| {
        load_str(
            "t.toml",
            &format!("[[service]]\nname = \"a\"\ncommand = [\"true\"]\n{extra}\n"),
        )
    };
    let e = |extra: &str| svc(extra).unwrap_err().to_string();
    assert_eq!(
        e("console = true"),
        r#"t.toml:4:11: service "a": console: applies only with protocol = "websocket" or "http""#
    );
    assert_eq!(
        e("protocol = \"websocket\"\ntransfer = \"direct\""),
        r#"t.toml:5:12: service "a": transfer: "direct" does not apply with protocol = "websocket": the daemon frames the command's output"#
    );
    assert_eq!(
        e("protocol = \"websocket\"\nbanner = \"hi\""),
        r#"t.toml:5:10: service "a": banner: does not apply with protocol = "websocket": nothing may come before the handshake's answer"#
    );
    assert!(e("protocol = \"websocket\"\npaths = [\"chat\"]")
        .contains("paths: \"chat\": a path starts with '/'"));
    assert!(
        e("protocol = \"websocket\"\nallowed_origins = [\"https://x/y\"]")
            .contains("expected an origin")
    );
    assert!(e("protocol = \"sctp\"").contains("protocol"));
    let binary = svc("protocol = \"websocket\"\nmessages = \"binary\"").unwrap();
    assert_eq!(
        binary.services[0].transfer,
        Transfer::Splice,
        "binary frames are spliced"
    );
    let plain = svc("protocol = \"websocket\"").unwrap();
    assert_eq!(
        plain.services[0].stdin,
        StdinMode::Client,
        "messages are input"
    );
    let text = svc("protocol = \"websocket\"\nstdin = \"null\"").unwrap();
    assert_eq!(text.services[0].transfer, defaults::TRANSFER);
    assert_eq!(text.services[0].stdin, StdinMode::Null, "stdin as given");
}

#[test]
fn control_values_are_checked() {
    let svc = |extra: &str| {
        err(&format!(
            "[[service]]\nname = \"a\"\ncommand = [\"true\"]\n{extra}\n"
        ))
    };
    assert_eq!(
        svc("allow = [\"10.0.0.1/8\"]"),
        r#"t.toml:4:9: service "a": allow: "10.0.0.1/8": host bits set; did you mean "10.0.0.0/8"?"#
    );
    assert_eq!(
        svc("max_per_source = 0"),
        r#"t.toml:4:18: service "a": max_per_source: must be at least 1"#
    );
    assert_eq!(
        svc("rate = -1"),
        r#"t.toml:4:8: service "a": rate: must be a number of connections per second above 0"#
    );
    assert_eq!(
        svc("ipv6_source_prefix = 0"),
        r#"t.toml:4:22: service "a": ipv6_source_prefix: 0: must be between 1 and 128"#
    );
    assert_eq!(
        svc("idle_timeout = 0"),
        r#"t.toml:4:16: service "a": idle_timeout: must be more than 0"#
    );
    assert_eq!(
        svc("max_bytes = 5\ntransfer = \"direct\""),
        r#"t.toml:4:13: service "a": max_bytes: does not apply with transfer = "direct": the output does not pass through the daemon"#
    );
    assert_eq!(
        svc("nice = 42"),
        r#"t.toml:4:8: service "a": nice: 42: must be between -20 and 19"#
    );
    assert_eq!(
        svc("user = \"no-such-user-here\""),
        r#"t.toml:4:8: service "a": user: "no-such-user-here": no such user"#
    );
    assert_eq!(
        svc("max_bytes = 4\nbanner = \"hello\""),
        r#"t.toml:5:10: service "a": banner: 5 bytes: must be shorter than max_bytes (4)"#
    );
    assert_eq!(
        svc("proxy_from = [\"10.0.0.0/8\"]"),
        r#"t.toml:4:14: service "a": proxy_from: applies only with proxy_protocol = true"#
    );
    let long = "x".repeat(defaults::MAX_MESSAGE + 1);
    assert_eq!(
        svc(&format!("banner = \"{long}\"")),
        format!(
            r#"t.toml:4:10: service "a": banner: {} bytes: must be at most 65536"#,
            long.len()
        )
    );
}

#[test]
fn unknown_key_is_located_in_its_service() {
    let e = err("[[service]]\nname = \"a\"\ncommand = [\"/bin/true\"]\ncomand = 1\n");
    assert!(
        e.starts_with("t.toml:4:1: service \"a\": comand: unknown field `comand`"),
        "{e}"
    );
    assert_eq!(
        e,
        "t.toml:4:1: service \"a\": comand: unknown field `comand`; did you mean `command`?"
    );
    let e = err("[[service]]\nname = \"a\"\ncommand = [\"true\"]\nfrobnicate = 1\n");
    assert!(
        e.ends_with("unknown field `frobnicate`; the keys are listed in splice-relay.toml(5)"),
        "{e}"
    );
}

#[test]
fn wrong_type_is_located_at_the_value() {
    let e = err("[[service]]\nname = \"a\"\ncommand = \"/bin/true\"\n");
    assert!(
        e.starts_with("t.toml:3:11: service \"a\": command: invalid type"),
        "{e}"
    );
    let e = err("shutdown_timeout = \"soon\"\n[[service]]\nname = \"a\"\ncommand = [\"true\"]\n");
    assert!(e.starts_with("t.toml:1:20: shutdown_timeout: "), "{e}");
}

#[test]
fn syntax_error_has_a_position() {
    let e = err("[[service]\n");
    assert!(e.starts_with("t.toml:1:"), "{e}");
}

#[test]
fn missing_command_names_the_service() {
    let e = err("[[service]]\nname = \"a\"\n");
    assert_eq!(
        e,
        r#"t.toml:1:1: service "a": command: missing: every service needs one, except one with shared = "NAME", whose clients watch NAME's"#
    );
}

#[test]
fn bad_values() {
    assert_eq!(
        err("[[service]]\nname = \"a\"\ncommand = []\n"),
        "t.toml:3:11: service \"a\": command: must not be empty"
    );
    assert_eq!(
        err("[[service]]\nname = \"a\"\ncommand = [\"/nonexistent/x\"]\n"),
        "t.toml:3:11: service \"a\": command: /nonexistent/x: No such file or directory"
    );
    let plain = std::env::temp_dir().join(format!("splice-relay-plain-{}", std::process::id()));
    std::fs::write(&plain, "not a program").unwrap();
    let text = format!(
        "[[service]]\nname = \"a\"\ncommand = [\"{}\"]\n",
        plain.display()
    );
    let e = err(&text);
    std::fs::remove_file(&plain).unwrap();
    assert_eq!(
        e,
        format!(
            "t.toml:3:11: service \"a\": command: {}: not executable",
            plain.display()
        )
    );
    assert_eq!(
        err("[[service]]\nname = \"a\"\ncommand = [\"true\"]\n[[service]]\nname = \"a\"\ncommand = [\"true\"]\n"),
        "t.toml:5:8: service \"a\": name: duplicate name: another service above has the same one"
    );
    assert_eq!(
        err("[[service]]\nname = \"a\"\ncommand = [\"true\"]\nlisten = \"nowhere\"\n"),
        "t.toml:4:10: service \"a\": listen: \"nowhere\": expected IP:PORT, [IPv6]:PORT or an absolute Unix socket path"
    );
    assert_eq!(
        err(""),
        "t.toml: no [[service]] is defined; at least one is needed"
    );
}

#[test]
fn cgroup_values_are_checked_where_they_stand() {
    let svc = |extra: &str| {
        err(&format!(
            "[[service]]\nname = \"a\"\ncommand = [\"true\"]\n{extra}\n"
        ))
    };
    assert_eq!(
        svc("memory_max = \"12 parsecs\""),
        r#"t.toml:4:14: service "a": memory_max: "12 parsecs": expected bytes, a number with K, M, G, T, P or E, a percentage, or "infinity""#
    );
    assert_eq!(
        svc("memory_max = 0"),
        r#"t.toml:4:14: service "a": memory_max: must be more than 0"#
    );
    assert_eq!(
        svc("cpu_quota = 50"),
        r#"t.toml:4:13: service "a": cpu_quota: invalid type: integer `50`, expected a string"#
    );
    assert_eq!(
        svc("cpu_quota = \"half\""),
        r#"t.toml:4:13: service "a": cpu_quota: "half": expected a percentage above 0 of one CPU, like "50%" (as CPUQuota=)"#
    );
    assert_eq!(
        svc("cpu_weight = 20000"),
        r#"t.toml:4:14: service "a": cpu_weight: 20000: must be between 1 and 10000"#
    );
    assert_eq!(
        svc("containment = \"jail\""),
        r#"t.toml:4:15: service "a": containment: "jail": expected one of "auto" "cgroup" "process-group""#
    );
    assert_eq!(
        svc("containment = \"process-group\"\ntasks_max = 5"),
        r#"t.toml:5:13: service "a": tasks_max: does not apply with containment = "process-group": limits are set on a connection's cgroup"#
    );
    // "infinity" is no limit, so it needs no cgroup.
    let c = load_str(
        "t",
        "[[service]]\nname = \"a\"\ncommand = [\"true\"]\nmemory_max = \"infinity\"\ncontainment = \"process-group\"\n",
    )
    .unwrap();
    assert_eq!(c.services[0].containment, Containment::ProcessGroup);
}

#[test]
fn shared_keys_are_checked_where_they_stand() {
    let svc = |extra: &str| {
        load_str(
            "t.toml",
            &format!("[[service]]\nname = \"a\"\ncommand = [\"true\"]\n{extra}\n"),
        )
    };
    let e = |extra: &str| svc(extra).unwrap_err().to_string();
    assert_eq!(
        e("shared = true\nstdin = \"client\""),
        r#"t.toml:5:9: service "a": stdin: "client" does not apply to a shared command: the one command of all the clients reads /dev/null"#
    );
    assert_eq!(
        e("shared = true\ntransfer = \"direct\""),
        r#"t.toml:5:12: service "a": transfer: "direct" does not apply to a shared command: its output is fanned out by the daemon"#
    );
    assert_eq!(
        e("linger = \"1s\""),
        r#"t.toml:4:10: service "a": linger: applies only with shared = true"#
    );
    assert_eq!(
        e("shared = false\nreplay = 10"),
        r#"t.toml:5:10: service "a": replay: applies only with shared = true"#
    );
    assert_eq!(
        e("shared = true\nmax_lag = 100"),
        r#"t.toml:5:11: service "a": max_lag: 100: must be at least 4096 (a page)"#
    );
    assert!(e("shared = true\nlinger = \"soon\"")
        .contains(r#"linger: "soon": expected a number and a unit, like "5s", or "never""#));
    assert!(e("shared = true\nstart = \"boot\"")
        .contains(r#"start: "boot": expected one of "first-client" "daemon""#));
    assert!(e("shared = true\nlagging = \"skip\"")
        .contains(r#"lagging: "skip": expected one of "drop" "wait""#));
    assert!(e("shared = 3").contains("shared: invalid type: integer `3`, expected true, false, or the name of a service with shared = true"));

    let s = svc("shared = true").unwrap();
    let shared = s.services[0].shared.clone().unwrap();
    assert_eq!(
        (
            shared.start,
            shared.linger,
            shared.max_lag,
            shared.replay,
            shared.lagging
        ),
        (
            Start::FirstClient,
            Some(defaults::LINGER),
            defaults::MAX_LAG,
            0,
            Lagging::Drop
        )
    );
    let s = svc("shared = true\nlinger = \"never\"\nstart = \"daemon\"\nreplay = 65536\nmax_lag = 8192\nlagging = \"wait\"\nprotocol = \"websocket\"").unwrap();
    let service = &s.services[0];
    let shared = service.shared.clone().unwrap();
    assert_eq!(
        (
            shared.start,
            shared.linger,
            shared.max_lag,
            shared.replay,
            shared.lagging
        ),
        (Start::Daemon, None, 8192, 65536, Lagging::Wait)
    );
    assert_eq!(
        service.stdin,
        StdinMode::Null,
        "a shared WebSocket service reads no messages"
    );
    assert_eq!(
        service.transfer,
        defaults::SHARED_TRANSFER,
        "fanned out by tee"
    );
    let copy = svc("shared = true\ntransfer = \"copy\"").unwrap();
    assert_eq!(copy.services[0].transfer, Transfer::Copy, "as written");
    assert!(Arc::ptr_eq(service.shared_command().unwrap(), service));
    assert!(svc("").unwrap().services[0].shared_command().is_none());
}

#[test]
fn a_service_can_watch_another_services_shared_command() {
    let two = |first: &str, second: &str| {
        load_str(
            "t.toml",
            &format!("[[service]]\nname = \"a\"\n{first}\n[[service]]\nname = \"b\"\n{second}\n"),
        )
    };
    // Named before or after the shared service, it watches its command.
    for (first, second, owner, watcher) in [
        (
            "command = [\"true\"]\nshared = true",
            "shared = \"a\"\nprotocol = \"websocket\"",
            0,
            1,
        ),
        (
            "shared = \"b\"",
            "command = [\"true\"]\nshared = true",
            1,
            0,
        ),
    ] {
        let c = two(first, second).unwrap();
        let (owner, watcher) = (&c.services[owner], &c.services[watcher]);
        assert!(Arc::ptr_eq(watcher.shared_command().unwrap(), owner));
        assert_eq!(watcher.argv, owner.argv);
        assert!(watcher.shared.is_none());
    }
    let e = |first: &str, second: &str| two(first, second).unwrap_err().to_string();
    assert_eq!(
        e("command = [\"true\"]", "shared = \"a\""),
        r#"t.toml:6:10: service "b": shared: "a": that service does not have shared = true"#
    );
    assert_eq!(
        e("command = [\"true\"]", "shared = \"c\""),
        r#"t.toml:6:10: service "b": shared: "c": no service of that name has shared = true"#
    );
    assert_eq!(
        e(
            "command = [\"true\"]\nshared = true",
            "command = [\"true\"]\nshared = \"a\""
        ),
        r#"t.toml:7:11: service "b": command: a service with shared = "NAME" has no command of its own: its clients watch NAME's"#
    );
    assert_eq!(
        e(
            "command = [\"true\"]\nshared = true",
            "shared = \"a\"\nlinger = \"1s\""
        ),
        r#"t.toml:8:10: service "b": linger: set it on the service whose command is shared"#
    );
    assert_eq!(
        e(
            "command = [\"true\"]\nshared = true",
            "shared = \"a\"\nstdin = \"client\""
        ),
        r#"t.toml:8:9: service "b": stdin: "client" does not apply to a shared command: the one command of all the clients reads /dev/null"#
    );
    // A watcher of a watcher has no command to watch.
    assert!(
        e("shared = \"b\"", "shared = \"a\"").contains("no service of that name has shared = true")
    );
}
