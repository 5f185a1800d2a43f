//! TLS for a service (`tls_certificate`, `tls_key`, `tls_client_ca`,
//! `tls_client_auth`): the client's connection is encrypted, the command's
//! programming model is not. rustls does the protocol.
//!
//! - the service's certificate, key and client CA are the configuration's
//!   (`config::Tls`): read and checked when it is loaded, and again on
//!   reload, so renewed files apply to new connections;
//! - `handshake`: the handshake, after admission and before any command,
//!   bounded in time and read record by record; its failures are refusals;
//! - `names`: the command's `SSL_*` variables, in mod_ssl's names;
//! - `kernel`: after the handshake, where the kernel has the TLS ULP and the
//!   negotiated cipher, the keys go to the kernel (kTLS) and the connection
//!   goes on as if it were plaintext: splice, and `transfer = "direct"`, too;
//! - `layer`: otherwise the daemon encrypts and decrypts, between the
//!   client and one end of a socket pair that the rest of the connection
//!   takes for the client (`client::Transport`).

mod handshake;
mod kernel;
mod layer;
mod names;

pub use handshake::{accept, Accepted, HandshakeError};
pub use kernel::{hand_off, HandOff};
pub use layer::{Layer, Outcome};

/// What the start-up log says of TLS: who encrypts after the handshake.
pub fn kernel_line() -> String {
    format!("tls: {}", kernel::describe())
}
