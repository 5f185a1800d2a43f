//! The loader on good and bad files: defaults, and each error with its exact
//! message and position; and the reference (the man page) and the example,
//! which must name every key of the schema.

use std::collections::{BTreeMap, BTreeSet};
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

// --- The reference: the man page and the example name every key. ---

/// The reference for every key, splice-relay.toml(5).
const MAN_PAGE: &str = include_str!("../../packaging/man/splice-relay.toml.5");

/// Where a key stands: at the top level, or in a `[[service]]` table.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Scope {
    TopLevel,
    Service,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Scope::TopLevel => "top-level",
            Scope::Service => "service",
        })
    }
}

/// A key a document names, and the line that names it.
struct Named {
    scope: Scope,
    key: String,
    line: usize,
}

/// Every key of the schema (`service` being the `[[service]]` tables).
fn schema_keys() -> BTreeSet<(Scope, String)> {
    let top = raw::keys::<raw::RawConfig>()
        .iter()
        .map(|k| (Scope::TopLevel, k));
    let service = raw::keys::<raw::RawService>()
        .iter()
        .map(|k| (Scope::Service, k));
    top.chain(service)
        .map(|(s, k)| (s, k.to_string()))
        .collect()
}

/// What a document lacks and what it has too much of, against the schema;
/// empty when it names every key and nothing else.
fn compare(what: &str, named: &[Named]) -> Vec<String> {
    let schema = schema_keys();
    let mut seen: BTreeMap<(Scope, String), Vec<usize>> = BTreeMap::new();
    for n in named {
        seen.entry((n.scope, n.key.clone()))
            .or_default()
            .push(n.line);
    }
    let mut problems = Vec::new();
    let missing: Vec<String> = schema
        .iter()
        .filter(|k| !seen.contains_key(*k))
        .map(|(s, k)| format!("{s} key `{k}`"))
        .collect();
    if !missing.is_empty() {
        problems.push(format!("{what} lacks {}", missing.join(", ")));
    }
    for ((scope, key), lines) in &seen {
        if !schema.contains(&(*scope, key.clone())) {
            problems.push(format!(
                "{what}:{}: names a {scope} key `{key}` that the schema does not have",
                lines[0]
            ));
        }
    }
    problems
}

/// Adds `c` to the last run if it has the same font, else starts a run.
fn push_roff(runs: &mut Vec<(bool, String)>, bold: bool, c: char) {
    match runs.last_mut() {
        Some((b, s)) if *b == bold => s.push(c),
        _ => runs.push((bold, c.to_string())),
    }
}

/// Text with inline font escapes (`\fB`, `\fI`, `\fR`, `\fP`, `\f(BI`,
/// `\f[B]`) as runs, starting in bold or not; the escapes that only shape the
/// output (`\%`, `\&`, `\-` …) resolved.
fn roff_inline(text: &str, mut bold: bool, runs: &mut Vec<(bool, String)>) {
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            push_roff(runs, bold, c);
            continue;
        }
        match chars.next() {
            Some('f') => {
                let font: String = match chars.next() {
                    Some('(') => chars.by_ref().take(2).collect(),
                    Some('[') => chars.by_ref().take_while(|c| *c != ']').collect(),
                    Some(c) => c.to_string(),
                    None => String::new(),
                };
                bold = font.starts_with('B') || font == "3";
            }
            Some('%' | '&' | ':' | '/' | ',') | None => {}
            Some('(') => chars.by_ref().take(2).for_each(drop),
            Some('[') => chars.by_ref().take_while(|c| *c != ']').for_each(drop),
            Some('e') => push_roff(runs, bold, '\\'),
            Some(c) => push_roff(runs, bold, c),
        }
    }
}

/// The runs of a roff line, each bold or not: plain text with inline
/// escapes, or a font request (`.B`, `.BR`, `.RB`, `.BI`, `.IB`, `.I`, `.IR`,
/// `.RI`, `.R`) and its arguments. Other requests have none.
fn roff_runs(line: &str) -> Vec<(bool, String)> {
    let mut runs = Vec::new();
    let Some(request) = line.strip_prefix('.') else {
        roff_inline(line, false, &mut runs);
        return runs;
    };
    let (name, args) = request
        .split_once(char::is_whitespace)
        .unwrap_or((request, ""));
    // The font of each argument, in turn.
    let fonts: &[bool] = match name {
        "B" => &[true],
        "I" | "R" => &[false],
        "BR" | "BI" => &[true, false],
        "RB" | "IB" => &[false, true],
        "IR" | "RI" => &[false],
        _ => return runs,
    };
    // Arguments: words, or "quoted strings"; `.B` and `.I` take them as one text.
    let mut words = Vec::new();
    let mut rest = args.trim_start();
    while !rest.is_empty() {
        let (word, after) = match rest.strip_prefix('"') {
            Some(q) => q.split_once('"').unwrap_or((q, "")),
            None => rest.split_once(char::is_whitespace).unwrap_or((rest, "")),
        };
        words.push(word);
        rest = after.trim_start();
    }
    if fonts.len() == 1 {
        roff_inline(&words.join(" "), fonts[0], &mut runs);
    } else {
        for (i, w) in words.iter().enumerate() {
            roff_inline(w, fonts[i % 2], &mut runs);
        }
    }
    runs
}

/// The keys an entry's tag line names: the words in bold before the first
/// parenthesis (`\fBallow\fR, \fBdeny\fR (arrays …)`), `[[service]]` naming
/// `service`.
fn tag_keys(tag: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for (bold, text) in roff_runs(tag) {
        let (text, ends) = match text.split_once('(') {
            Some((before, _)) => (before, true),
            None => (text.as_str(), false),
        };
        if bold {
            keys.extend(
                text.split(|c: char| c == ',' || c.is_whitespace())
                    .map(|w| w.trim_start_matches("[[").trim_end_matches("]]"))
                    .filter(|w| !w.is_empty())
                    .map(str::to_owned),
            );
        }
        if ends {
            break;
        }
    }
    keys
}

/// The keys a man page documents: each `.TP` entry's tag line (the line after
/// it), in the scope of its section: `TOP-LEVEL KEYS` is the top level,
/// every other section is about a service's keys.
fn man_page_keys(page: &str) -> (Vec<Named>, Vec<String>) {
    let mut named = Vec::new();
    let mut problems = Vec::new();
    let mut scope = Scope::Service;
    let mut lines = page.lines().enumerate().map(|(i, l)| (i + 1, l));
    while let Some((_, line)) = lines.next() {
        if let Some(title) = line.strip_prefix(".SH") {
            let title: String = roff_runs(title.trim().trim_matches('"'))
                .into_iter()
                .map(|(_, t)| t)
                .collect();
            scope = if title.trim() == "TOP-LEVEL KEYS" {
                Scope::TopLevel
            } else {
                Scope::Service
            };
        } else if line.split_whitespace().next() == Some(".TP") {
            let Some((n, tag)) = lines.find(|(_, l)| !l.starts_with(".\\\"")) else {
                break;
            };
            let keys = tag_keys(tag);
            if keys.is_empty() {
                problems.push(format!(
                    "man page:{n}: a .TP entry whose tag names no key in bold: {tag}"
                ));
            }
            named.extend(keys.into_iter().map(|key| Named {
                scope,
                key,
                line: n,
            }));
        }
    }
    (named, problems)
}

/// The keys the example sets or shows commented out (`key = …`,
/// `# key = …`), and `[[service]]`; those after the first `[[service]]` are
/// a service's.
fn example_keys(text: &str) -> Vec<Named> {
    let mut named = Vec::new();
    let mut scope = Scope::TopLevel;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_start_matches(|c: char| c == '#' || c.is_whitespace());
        let key = if let Some(table) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
            let key = (Scope::TopLevel, table.trim());
            scope = Scope::Service;
            key
        } else {
            match line.split_once('=') {
                Some((key, _)) if key.ends_with(' ') => (scope, key.trim()),
                _ => continue,
            }
        };
        if !key.1.is_empty()
            && key
                .1
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            named.push(Named {
                scope: key.0,
                key: key.1.to_owned(),
                line: i + 1,
            });
        }
    }
    named
}

#[test]
fn the_man_page_and_the_example_name_every_key_of_the_schema() {
    let (man, mut problems) = man_page_keys(MAN_PAGE);
    problems.extend(compare("packaging/man/splice-relay.toml.5", &man));
    let mut twice: BTreeMap<(Scope, &str), Vec<usize>> = BTreeMap::new();
    for n in &man {
        twice.entry((n.scope, &n.key)).or_default().push(n.line);
    }
    for ((scope, key), lines) in twice.into_iter().filter(|(_, l)| l.len() > 1) {
        problems.push(format!(
            "packaging/man/splice-relay.toml.5: the {scope} key `{key}` has entries at lines {lines:?}"
        ));
    }
    problems.extend(compare("config.example.toml", &example_keys(EXAMPLE)));
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// The man page's tag lines are read in each form roff writes bold in.
#[test]
fn man_page_entries_are_read_in_every_form() {
    let page = ".SH TOP\\-LEVEL KEYS\n.TP\n.B log_level\nFilter.\n\
                .TP\n\\fB\\%[[service]]\\fR (tables)\n.SH SERVICE KEYS\n\
                .TP\n.\\\" a comment\n\\fB\\%allow\\fR, \\fB\\%deny\\fR (arrays, default \\fB\\%[]\\fR)\n\
                .TP\n.BR max_bytes \" (integer, default \" none )\n\
                .TP\n.BR rate \", \" rate_per_source\n\
                .TP\n\\fBname\\fP (string, \\fBrequired\\fP)\n\
                .TP\nNothing in bold\n";
    let (named, problems) = man_page_keys(page);
    let got: Vec<(Scope, &str, usize)> = named
        .iter()
        .map(|n| (n.scope, n.key.as_str(), n.line))
        .collect();
    assert_eq!(
        got,
        [
            (Scope::TopLevel, "log_level", 3),
            (Scope::TopLevel, "service", 6),
            (Scope::Service, "allow", 10),
            (Scope::Service, "deny", 10),
            (Scope::Service, "max_bytes", 12),
            (Scope::Service, "rate", 14),
            (Scope::Service, "rate_per_source", 14),
            (Scope::Service, "name", 16),
        ]
    );
    assert_eq!(
        problems,
        ["man page:18: a .TP entry whose tag names no key in bold: Nothing in bold"]
    );
    // And the failure names what is missing and what is extra.
    let report = compare("page", &named).join("\n");
    assert!(report.starts_with("page lacks "), "{report}");
    assert!(
        report.contains("top-level key `max_connections`"),
        "{report}"
    );
    assert!(report.contains("service key `command`"), "{report}");
    assert!(!report.contains("key `allow`"), "{report}");
    let extra = [Named {
        scope: Scope::Service,
        key: "bogus".into(),
        line: 7,
    }];
    assert!(compare("page", &extra)
        .iter()
        .any(|p| p == "page:7: names a service key `bogus` that the schema does not have"));
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
