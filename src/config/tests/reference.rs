//! The reference (the man page) and the example: each names every key of
//! the schema, and nothing else.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

/// The reference for every key, splice-relay.toml(5).
const MAN_PAGE: &str = include_str!("../../../packaging/man/splice-relay.toml.5");

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

/// The README's table of the keys a newcomer needs first: every key it
/// names is a key of the schema (the man page is the reference for all).
#[test]
fn the_readmes_key_table_names_only_keys_of_the_schema() {
    const README: &str = include_str!("../../../README.md");
    let known: BTreeSet<String> = schema_keys().into_iter().map(|(_, k)| k).collect();
    let section = README
        .split("\n## ")
        .find(|s| s.starts_with("Configuration"))
        .expect("the README has a Configuration section");
    let mut named = 0;
    let mut unknown = Vec::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let first = row.split('|').nth(1).unwrap_or_default();
        for key in first.split('`').skip(1).step_by(2) {
            named += 1;
            if !known.contains(key) {
                unknown.push(key.to_owned());
            }
        }
    }
    assert!(
        named >= 10,
        "the README's key table was not found ({named} keys)"
    );
    assert!(
        unknown.is_empty(),
        "README.md names keys the schema lacks: {unknown:?}"
    );
}
