//! Where in the file an error is: `PATH:LINE:COL: service "NAME": KEY:`.
//!
//! Errors from serde carry a byte offset; errors found later name a service
//! and a key. The [`Locator`] turns either into a position, using the spans
//! toml keeps for every key and value.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::ConfigError;

/// Maps byte offsets and `(service, key)` pairs to `PATH:LINE:COL` positions.
pub struct Locator<'a> {
    pub origin: &'a str,
    pub text: &'a str,
    pub root: Option<&'a DeTable<'a>>,
}

impl<'a> Locator<'a> {
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }

    fn at(&self, offset: usize) -> String {
        let (line, col) = self.line_col(offset);
        format!("{}:{line}:{col}", self.origin)
    }

    fn services(&self) -> &'a [Spanned<DeValue<'a>>] {
        let services = self.root.and_then(|root| {
            root.iter()
                .find(|(k, _)| k.get_ref() == "service")
                .map(|(_, v)| v.get_ref())
        });
        match services {
            Some(DeValue::Array(a)) => a,
            _ => &[],
        }
    }

    fn service_table(&self, index: usize) -> Option<(&'a DeTable<'a>, Range<usize>)> {
        match self.services().get(index) {
            Some(v) => match v.get_ref() {
                DeValue::Table(t) => Some((t, v.span())),
                _ => None,
            },
            None => None,
        }
    }

    /// `service "NAME"`, or `service #N` when it has no usable name.
    fn service_label(&self, index: usize) -> String {
        let name = self.service_table(index).and_then(|(t, _)| {
            t.iter()
                .find(|(k, _)| k.get_ref() == "name")
                .and_then(|(_, v)| match v.get_ref() {
                    DeValue::String(s) => Some(s.to_string()),
                    _ => None,
                })
        });
        match name {
            Some(n) => format!("service {n:?}"),
            None => format!("service #{}", index + 1),
        }
    }

    /// The span of a key's value (or of the service table when the key is absent).
    pub fn span_of(&self, service: Option<usize>, key: &str) -> Option<Range<usize>> {
        let (table, fallback) = match service {
            Some(i) => {
                let (t, span) = self.service_table(i)?;
                (t, Some(span))
            }
            None => (self.root?, None),
        };
        table
            .iter()
            .find(|(k, _)| k.get_ref() == key)
            .map(|(_, v)| v.span())
            .or(fallback)
    }

    /// Which service and key a byte offset belongs to.
    pub fn find(&self, offset: usize) -> (Option<usize>, Option<String>) {
        let contains = |r: &Range<usize>| r.start <= offset && offset < r.end.max(r.start + 1);
        for (i, s) in self.services().iter().enumerate() {
            if let DeValue::Table(t) = s.get_ref() {
                for (k, v) in t.iter() {
                    if contains(&k.span()) || contains(&v.span()) {
                        return (Some(i), Some(k.get_ref().to_string()));
                    }
                }
                if contains(&s.span()) {
                    return (Some(i), None);
                }
            }
        }
        if let Some(root) = self.root {
            for (k, v) in root.iter() {
                if k.get_ref() != "service" && (contains(&k.span()) || contains(&v.span())) {
                    return (None, Some(k.get_ref().to_string()));
                }
            }
        }
        // Spans of `[[service]]` bodies are not always recorded: fall back to
        // the last service whose first key starts before the offset.
        let mut last = None;
        for (i, s) in self.services().iter().enumerate() {
            let start = match s.get_ref() {
                DeValue::Table(t) => t.iter().map(|(k, _)| k.span().start).min(),
                _ => None,
            };
            if start.is_some_and(|st| st <= offset) {
                last = Some(i);
            }
        }
        (last, None)
    }

    pub fn position(&self, service: Option<usize>, offset: Option<usize>) -> String {
        let mut p = match offset {
            Some(o) => self.at(o),
            None => self.origin.to_owned(),
        };
        if let Some(i) = service {
            p.push_str(": ");
            p.push_str(&self.service_label(i));
        }
        p
    }

    pub fn error(
        &self,
        service: Option<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        let offset = self.span_of(service, key).map(|r| r.start);
        ConfigError {
            position: self.position(service, offset),
            key: Some(key.to_owned()),
            message: message.into(),
        }
    }
}

/// screenful; say instead which key was probably meant.
pub fn shorten_unknown_field(message: &str) -> String {
    let Some((head, known)) = message.split_once(", expected one of ") else {
        return message.to_owned();
    };
    let Some(unknown) = head
        .strip_prefix("unknown field `")
        .and_then(|r| r.strip_suffix('`'))
    else {
        return message.to_owned();
    };
    let best = known
        .split(", ")
        .map(|k| k.trim_matches('`'))
        .map(|k| (edit_distance(unknown, k), k))
        .min();
    match best {
        Some((d, k)) if d <= 2 || k.starts_with(unknown) || unknown.starts_with(k) => {
            format!("{head}; did you mean `{k}`?")
        }
        _ => format!("{head}; the keys are listed in splice-relay.toml(5)"),
    }
}

/// Levenshtein distance, for suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1)
                .min(row[j] + 1)
                .min(diag + usize::from(ca != *cb));
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}
