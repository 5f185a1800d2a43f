//! The loader on good and bad files, by theme; here, what the themes share.

mod errors;
mod example;
mod reading;
mod reference;
mod tls;

use super::*;

/// The error loading `text` gives, as the daemon prints it.
fn err(text: &str) -> String {
    load_str("t.toml", text).unwrap_err().to_string()
}
