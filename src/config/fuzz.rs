//! The loader on arbitrary and on damaged input: it never panics, and
//! every error says where.

use super::*;
use proptest::prelude::*;

/// Errors that are about the file as a whole, not a place in it.
fn whole_file(e: &ConfigError) -> bool {
    e.message.starts_with("no [[service]] is defined")
}

fn located(e: &ConfigError) -> bool {
    let Some(rest) = e.position.strip_prefix("t.toml:") else {
        return false;
    };
    let mut parts = rest.splitn(3, ':');
    let line = parts.next().and_then(|l| l.parse::<usize>().ok());
    let col = parts
        .next()
        .and_then(|c| c.split(':').next())
        .and_then(|c| c.parse::<usize>().ok());
    matches!((line, col), (Some(l), Some(c)) if l >= 1 && c >= 1)
}

/// Every key of the schema, top level and service, and one that is not.
fn keys() -> Vec<&'static str> {
    let mut keys = raw::keys::<raw::RawService>().to_vec();
    keys.extend(raw::keys::<raw::RawConfig>());
    keys.push("bogus");
    keys
}
const VALUES: &[&str] = &[
    "1",
    "0",
    "-1",
    "1e400",
    "nan",
    "inf",
    "3.5",
    "true",
    "\"\"",
    "\"x\"",
    "\"5s\"",
    "\"10.0.0.0/8\"",
    "[\"10.0.0.1/8\"]",
    "[\"::1\", \"bogus\"]",
    "[]",
    "[\"true\"]",
    "[\"/nonexistent\"]",
    "{}",
    "{ A = \"b\" }",
    "\"direct\"",
    "\"client\"",
    "\"null\"",
    "18446744073709551615",
    "\"250ms\"",
    "\"1h\"",
    "[1, 2]",
    "\"127.0.0.1:0\"",
];

/// A config built from real keys and values in random combinations.
fn config_text() -> impl Strategy<Value = String> {
    let keys = keys();
    let line = (0..keys.len(), 0..VALUES.len())
        .prop_map(move |(k, v)| format!("{} = {}\n", keys[k], VALUES[v]));
    let service = prop::collection::vec(line, 0..8).prop_map(|lines| {
        format!(
            "[[service]]\nname = \"s\"\ncommand = [\"true\"]\n{}",
            lines.concat()
        )
    });
    prop::collection::vec(service, 0..3).prop_map(|s| s.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic_and_errors_are_located(text in "\\PC{0,200}") {
        if let Err(e) = load_str("t.toml", &text) {
            prop_assert!(located(&e) || whole_file(&e), "{e}");
        }
    }

    #[test]
    fn real_keys_with_wrong_values_are_located(text in config_text()) {
        if let Err(e) = load_str("t.toml", &text) {
            prop_assert!(located(&e) || whole_file(&e), "{e}");
            prop_assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn the_example_damaged_anywhere_never_panics(at in 0..EXAMPLE.len(), cut in 0..40usize, junk in "[\\[\\]=\"{}#\n a-z0-9]{0,8}") {
        let mut text = EXAMPLE.to_owned();
        let at = (0..=at).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        let end = (at + cut).min(text.len());
        let end = (end..=text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
        text.replace_range(at..end, &junk);
        if let Err(e) = load_str("t.toml", &text) {
            prop_assert!(located(&e) || whole_file(&e), "{e}");
        }
    }
}

#[test]
fn the_key_list_comes_from_the_schema() {
    let keys = keys();
    for key in [
        "command",
        "user",
        "proxy_from",
        "nice",
        "log_level",
        "service",
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
}
