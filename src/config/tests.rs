//! The loader on good and bad files: defaults, and each error with its exact
//! message and position.

use std::time::Duration;

use super::*;

fn err(text: &str) -> String {
    load_str("t.toml", text).unwrap_err().to_string()
}

#[test]
fn example_config_loads_with_the_documented_defaults() {
    let c = load_str("config.example.toml", EXAMPLE).unwrap();
    assert_eq!(c.log_level, defaults::LOG_LEVEL);
    assert_eq!(c.max_connections, defaults::MAX_CONNECTIONS);
    assert_eq!(c.shutdown_timeout, defaults::SHUTDOWN_TIMEOUT);
    let s = &c.services[0];
    assert_eq!(s.max_connections, defaults::SERVICE_MAX_CONNECTIONS);
    assert_eq!(s.kill_grace, defaults::KILL_GRACE);
    assert_eq!(s.pipe_size, defaults::PIPE_SIZE);
    assert_eq!(s.stdin, StdinMode::Null);
    assert_eq!(s.transfer, defaults::TRANSFER);
    assert_eq!(s.protocol, Protocol::Raw);
    assert_eq!(
        s.listen,
        vec![ListenAddr::Tcp("127.0.0.1:9009".parse().unwrap())]
    );
    assert_eq!(s.access.source_prefix_v6, defaults::IPV6_SOURCE_PREFIX);
    assert_eq!(s.access.max_per_source, None);
    assert!(!s.proxy_protocol);
    assert!(s.timeout.is_none() && s.idle_timeout.is_none() && s.max_bytes.is_none());
    assert!(s.run_as.is_empty());
}

/// Every commented-out example in the file is valid when uncommented
/// (user and group only as root, who may switch; the cgroup keys are for
/// the daemon's own subtree, which tests/cgroups.rs gives it).
#[test]
fn example_config_with_every_option_uncommented_loads() {
    let root = nix::unistd::geteuid().is_root();
    let elsewhere = |key: &str| {
        ["user", "group"].contains(&key) && !root
            || WEBSOCKET_KEYS.contains(&key)
            || TLS_KEYS.contains(&key)
            || [
                "delegated_cgroup",
                "memory_max",
                "memory_high",
                "cpu_quota",
                "cpu_weight",
                "tasks_max",
                "io_weight",
            ]
            .contains(&key)
    };
    let text: String = EXAMPLE
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    k.chars().all(|c| c.is_ascii_lowercase() || c == '_') && !elsewhere(k)
                }) =>
            {
                rest.to_owned()
            }
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        // proxy_from applies only with the header on.
        .replace("proxy_protocol = false", "proxy_protocol = true");
    let c = load_str("config.example.toml", &text).unwrap();
    let s = &c.services[0];
    assert_eq!(s.access.allow.len(), 2);
    assert_eq!(s.access.max_per_source, Some(8));
    assert_eq!(s.access.rate, Some(200.0));
    assert_eq!(s.timeout, Some(Duration::from_secs(3600)));
    assert_eq!(s.idle_timeout, Some(Duration::from_secs(300)));
    assert_eq!(s.max_bytes, Some(1 << 30));
    assert_eq!(s.busy_message.as_deref(), Some(&b"busy\n"[..]));
    assert_eq!(s.run_as.nice, Some(10));
    assert_eq!(s.run_as.rlimits.len(), 4);
    assert_eq!(s.proxy_from.len(), 2);
    if root {
        assert!(s.run_as.credentials.is_some());
    }
}

/// The WebSocket keys of the example, which apply with protocol = "websocket".
const WEBSOCKET_KEYS: [&str; 6] = [
    "messages",
    "allowed_origins",
    "paths",
    "ping_interval",
    "max_message_size",
    "console",
];

/// The example's TLS keys, and `handshake_timeout` (with TLS or WebSocket):
/// they need files (tls_keys_are_checked_where_they_stand loads them).
const TLS_KEYS: [&str; 5] = [
    "tls_certificate",
    "tls_key",
    "tls_client_ca",
    "tls_client_auth",
    "handshake_timeout",
];

/// The example's WebSocket section, uncommented under protocol = "websocket",
/// loads with the documented defaults and examples.
#[test]
fn example_websocket_section_loads() {
    let text: String = EXAMPLE
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest
                    .split_once(" = ")
                    .is_some_and(|(k, _)| WEBSOCKET_KEYS.contains(&k)) =>
            {
                rest.to_owned()
            }
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace("protocol = \"raw\"", "protocol = \"websocket\"");
    let c = load_str("config.example.toml", &text).unwrap();
    let s = &c.services[0];
    let Protocol::WebSocket(ws) = &s.protocol else {
        panic!("not a WebSocket service: {:?}", s.protocol);
    };
    assert_eq!(ws.messages, defaults::MESSAGES);
    assert_eq!(ws.ping_interval, defaults::PING_INTERVAL);
    assert_eq!(ws.max_message_size, defaults::MAX_MESSAGE_SIZE);
    assert_eq!(ws.console, defaults::CONSOLE);
    assert_eq!(s.handshake_timeout, defaults::HANDSHAKE_TIMEOUT);
    assert_eq!(ws.paths, ["/"]);
    assert_eq!(ws.allowed_origins.len(), 1);
}

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
        r#"t.toml:4:11: service "a": console: applies only with protocol = "websocket""#
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
fn durations() {
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert!(parse_duration("5 parsecs").is_err());
    assert!(parse_duration("s").is_err());
    assert_eq!(
        parse_duration("5 parsecs").unwrap_err(),
        r#""5 parsecs": unknown unit; use ms, s, m or h"#
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
    assert!(e.contains("service \"a\": missing field `command`"), "{e}");
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
fn bare_command_names_are_resolved_in_path() {
    let c = load_str("t", "[[service]]\nname = \"a\"\ncommand = [\"true\"]\n").unwrap();
    assert!(c.services[0].program.is_absolute());
    assert_eq!(c.services[0].argv[0], "true");
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
fn sizes_are_read_as_systemd_reads_them() {
    use super::raw::parse_size;
    assert_eq!(parse_size("512M"), Ok(Some(512 << 20)));
    assert_eq!(parse_size("1.5G"), Ok(Some(1_610_612_736)));
    assert_eq!(parse_size("4096"), Ok(Some(4096)));
    assert_eq!(parse_size("infinity"), Ok(None));
    let half = parse_size("50%").unwrap().unwrap();
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .unwrap()
        .unwrap() as u64;
    assert_eq!(half % page, 0, "a percentage is rounded to pages");
    assert!(parse_size("0").is_err() && parse_size("101%").is_err() && parse_size("5X").is_err());
}

/// A fixture's absolute path (src/config/fixtures).
fn fixture(name: &str) -> String {
    format!("{}/src/config/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn tls_keys_are_checked_where_they_stand() {
    let svc = |extra: &str| {
        load_str(
            "t.toml",
            &format!("[[service]]\nname = \"a\"\ncommand = [\"true\"]\n{extra}\n"),
        )
    };
    let e = |extra: &str| svc(extra).unwrap_err().to_string();
    let (cert, key, other) = (
        fixture("tls-cert.pem"),
        fixture("tls-key.pem"),
        fixture("tls-other-key.pem"),
    );
    let good = svc(&format!(
        "tls_certificate = \"{cert}\"\ntls_key = \"{key}\""
    ))
    .unwrap();
    let tls = good.services[0].tls.as_ref().expect("TLS");
    assert_eq!(tls.client_auth, ClientAuth::None);
    assert_eq!(
        good.services[0].handshake_timeout,
        defaults::HANDSHAKE_TIMEOUT
    );

    assert_eq!(
        e(&format!("tls_key = \"{key}\"")),
        r#"t.toml:4:11: service "a": tls_key: applies only with tls_certificate"#
    );
    assert!(e(&format!("tls_certificate = \"{cert}\"")).contains("tls_certificate: needs tls_key"));
    assert!(
        e("tls_certificate = \"/nonexistent.pem\"\ntls_key = \"/k\"")
            .contains("tls_certificate: /nonexistent.pem: No such file or directory")
    );
    assert!(
        e(&format!("tls_certificate = \"{key}\"\ntls_key = \"{key}\""))
            .contains("no certificate in it")
    );
    assert!(
        e(&format!(
            "tls_certificate = \"{cert}\"\ntls_key = \"{cert}\""
        ))
        .contains("tls_key: ")
            && e(&format!(
                "tls_certificate = \"{cert}\"\ntls_key = \"{cert}\""
            ))
            .contains("no private key in it")
    );
    assert!(e(&format!(
        "tls_certificate = \"{cert}\"\ntls_key = \"{other}\""
    ))
    .contains("does not go with tls_certificate"));
    assert!(e(&format!(
        "tls_certificate = \"{cert}\"\ntls_key = \"{key}\"\ntls_client_auth = \"optional\""
    ))
    .contains("tls_client_auth: needs tls_client_ca"));
    assert!(e("tls_certificate = \"certs/x.pem\"")
        .contains("an absolute path, or the name of a systemd credential"));
    assert!(e("handshake_timeout = 3").contains(
        r#"handshake_timeout: applies only with protocol = "websocket" or tls_certificate"#
    ));
    // A CA for client certificates asks for them unless told otherwise.
    let with_ca = svc(&format!(
        "tls_certificate = \"{cert}\"\ntls_key = \"{key}\"\ntls_client_ca = \"{cert}\"\nhandshake_timeout = \"2s\""
    ))
    .unwrap();
    let s = &with_ca.services[0];
    assert_eq!(s.tls.as_ref().unwrap().client_auth, ClientAuth::Required);
    assert_eq!(s.handshake_timeout, Duration::from_secs(2));
}
