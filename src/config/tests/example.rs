//! The example configuration: it loads with the documented defaults, and
//! every option it shows commented out is valid.

use std::time::Duration;

use super::*;

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
    // One address may hold half the places; loopback clients are not counted.
    assert_eq!(s.access.max_per_source, Some(32));
    assert!(!s.access.loopback_counted);
    assert!(!s.proxy_protocol);
    assert!(s.timeout.is_none() && s.idle_timeout.is_none() && s.max_bytes.is_none());
    assert!(s.run_as.is_empty());
}

/// Every commented-out example in the file is valid when uncommented
/// (user and group only as root, who may switch; the cgroup keys are for
/// the daemon's own subtree, which tests/containment.rs gives it).
#[test]
fn example_config_with_every_option_uncommented_loads() {
    let root = nix::unistd::geteuid().is_root();
    let elsewhere = |key: &str| {
        ["user", "group"].contains(&key) && !root
            || WEBSOCKET_KEYS.contains(&key)
            || HTTP_KEYS.contains(&key)
            || LOGIN_KEYS.contains(&key)
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
    assert!(s.access.loopback_counted);
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

/// The HTTP keys of the example, which apply with protocol = "http".
const HTTP_KEYS: [&str; 4] = [
    "content_type",
    "max_body_size",
    "cgi_headers",
    "forwarded_from",
];

/// The login keys: they name files (the tests of `http` load real ones).
const LOGIN_KEYS: [&str; 2] = ["htpasswd", "bearer_tokens"];

/// The example's TLS keys, and `handshake_timeout` (with TLS or WebSocket):
/// they need files (tls_keys_are_checked_where_they_stand loads them).
const TLS_KEYS: [&str; 5] = [
    "tls_certificate",
    "tls_key",
    "tls_client_ca",
    "tls_client_auth",
    "handshake_timeout",
];

/// The example with `keys` uncommented, under `protocol`.
fn uncommented(keys: &[&str], protocol: &str) -> String {
    EXAMPLE
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest
                    .split_once(" = ")
                    .is_some_and(|(k, _)| keys.contains(&k)) =>
            {
                rest.to_owned()
            }
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace("protocol = \"raw\"", &format!("protocol = \"{protocol}\""))
}

/// The example's WebSocket section, uncommented under protocol = "websocket",
/// loads with the documented defaults and examples.
#[test]
fn example_websocket_section_loads() {
    let text = uncommented(&WEBSOCKET_KEYS, "websocket");
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

/// The example's HTTP section, uncommented under protocol = "http" with the
/// keys it shares with WebSocket, loads with the documented defaults.
#[test]
fn example_http_section_loads() {
    let keys = [&HTTP_KEYS[..], &["paths", "ping_interval", "console"]].concat();
    let text = uncommented(&keys, "http");
    let c = load_str("config.example.toml", &text).unwrap();
    let s = &c.services[0];
    let Protocol::Http(http) = &s.protocol else {
        panic!("not an HTTP service: {:?}", s.protocol);
    };
    assert_eq!(http.content_type, defaults::CONTENT_TYPE);
    assert_eq!(http.max_body_size, defaults::MAX_BODY_SIZE);
    assert_eq!(http.ping_interval, defaults::PING_INTERVAL);
    assert_eq!(http.paths, ["/"]);
    assert_eq!(http.console, defaults::CONSOLE);
}
