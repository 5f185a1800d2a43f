//! Records in journald's native protocol: one datagram per record, its
//! fields as journal fields, queued like any other record.

use std::fmt;
use std::io::Write;
use std::sync::Arc;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;

use super::queue::{Class, Sink};

/// Where journald takes native-protocol datagrams.
pub(super) const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Records in journald's native protocol, queued like any other record:
/// `PRIORITY` (ERROR 3, WARN 4, INFO 5, DEBUG 6, TRACE 7), `TARGET`,
/// `CODE_FILE`, `CODE_LINE`, `SYSLOG_IDENTIFIER=splice-relay`, `MESSAGE`,
/// and each of the event's fields under its name in capitals.
pub(super) struct Journal {
    pub(super) sink: Arc<Sink>,
}

impl Journal {
    pub(super) fn new(sink: Arc<Sink>) -> Journal {
        Journal { sink }
    }

    /// The datagram of `event`.
    pub(super) fn format(event: &Event<'_>) -> Vec<u8> {
        let meta = event.metadata();
        let mut buf = Vec::with_capacity(256);
        let priority = match *meta.level() {
            tracing::Level::ERROR => b"3",
            tracing::Level::WARN => b"4",
            tracing::Level::INFO => b"5",
            tracing::Level::DEBUG => b"6",
            tracing::Level::TRACE => b"7",
        };
        put_field(&mut buf, "PRIORITY", |b| b.extend_from_slice(priority));
        put_field(&mut buf, "TARGET", |b| {
            b.extend_from_slice(meta.target().as_bytes())
        });
        if let Some(file) = meta.file() {
            put_field(&mut buf, "CODE_FILE", |b| {
                b.extend_from_slice(file.as_bytes())
            });
        }
        if let Some(line) = meta.line() {
            put_field(&mut buf, "CODE_LINE", |b| {
                let _ = write!(b, "{line}");
            });
        }
        put_field(&mut buf, "SYSLOG_IDENTIFIER", |b| {
            b.extend_from_slice(b"splice-relay")
        });
        event.record(&mut Fields(&mut buf));
        buf
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for Journal {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        self.sink
            .push(Class::of(event.metadata()), Journal::format(event));
    }
}

/// An event's fields, as journal fields.
pub(super) struct Fields<'a>(&'a mut Vec<u8>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        put_field(self.0, field.name(), |b| {
            b.extend_from_slice(value.as_bytes())
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        put_field(self.0, field.name(), |b| {
            let _ = write!(b, "{value:?}");
        });
    }
}

/// Appends a field in the native protocol's length-prefixed form, which
/// takes any value: `NAME`, newline, the value's length (64 bits, little
/// endian), the value, newline. The name as journald wants it: `.` becomes
/// `_`, leading `_` and characters other than ASCII letters, digits and `_`
/// are left out, letters in capitals.
pub(super) fn put_field(buf: &mut Vec<u8>, name: &str, value: impl FnOnce(&mut Vec<u8>)) {
    buf.extend(
        name.bytes()
            .map(|c| if c == b'.' { b'_' } else { c })
            .skip_while(|&c| c == b'_')
            .filter(|&c| c == b'_' || c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_uppercase()),
    );
    buf.push(b'\n');
    let at = buf.len();
    buf.extend_from_slice(&[0; 8]);
    value(buf);
    let len = (buf.len() - at - 8) as u64;
    buf[at..at + 8].copy_from_slice(&len.to_le_bytes());
    buf.push(b'\n');
}
