//! The kernel's TLS (kTLS): after the handshake, where the kernel has the
//! TLS ULP and the negotiated cipher, the session's keys go to the kernel,
//! which then encrypts what is written to the socket and decrypts what is
//! read from it. The connection's pipeline runs on the socket itself, so
//! the splice path splices into it and a command given the socket
//! (`transfer = "direct"`) writes plaintext that the kernel encrypts.
//!
//! What the kernel leaves to user space, and what the daemon does with it:
//! - records that are not data: a read meets them as EIO, and `fdio::read`
//!   reads the record and its type: the client's close_notify is its
//!   end-of-file, another alert its end, and a TLS 1.3 KeyUpdate (which the
//!   kernels Debian ships cannot take: rekeying came in 6.14) ends the
//!   connection with an alert and a warning that says so;
//! - the close_notify at the end of the output: the kernel never sends one,
//!   so `fdio::end_output` does, before the shutdown;
//! - session tickets: rustls sends them with the end of the handshake, which
//!   is written out before the keys are taken.
//!
//! Whether the kernel offers it is read once, from `tcp_available_ulp`: the
//! daemon under the shipped unit cannot load the module itself (no
//! CAP_NET_ADMIN), nor make a connection of its own to try it. A cipher the
//! kernel refuses keys for (its crypto module missing) costs the one
//! connection that found out; later sessions with it stay in user space.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use nix::sys::socket::sockopt::{TcpTlsRx, TcpTlsTx, TcpUlp, TlsCryptoInfo};
use nix::sys::socket::{setsockopt, shutdown, Shutdown as How};
use rustls::{CipherSuite, ConnectionTrafficSecrets, ProtocolVersion, ServerConnection};

/// Where the kernel lists the TCP ULPs it has loaded.
const AVAILABLE_ULP: &str = "/proc/sys/net/ipv4/tcp_available_ulp";

/// Whether the kernel offers kTLS (its `tls` ULP is loaded), or why not.
/// Read once, from a file: the shipped unit may make no connection of its
/// own (`IPAddressDeny=`), and has no CAP_NET_ADMIN to load the module.
pub fn offer() -> &'static Result<(), String> {
    static OFFER: OnceLock<Result<(), String>> = OnceLock::new();
    OFFER.get_or_init(|| match std::fs::read_to_string(AVAILABLE_ULP) {
        Ok(list) if list.split_whitespace().any(|u| u == "tls") => Ok(()),
        Ok(list) => Err(format!(
            "the kernel's tls module is not loaded ({AVAILABLE_ULP}: {:?}; load it with `modprobe tls`, \
             at boot through modules-load.d)",
            list.trim()
        )),
        Err(e) => Err(format!("{AVAILABLE_ULP}: {}", crate::fdio::reason(&e))),
    })
}

/// The ciphers (libc's TLS_CIPHER_* numbers) the kernel refused keys for:
/// a session with one of those stays in user space.
static REFUSED: AtomicU32 = AtomicU32::new(0);

fn bit(cipher: u16) -> u32 {
    1 << (cipher & 31)
}

/// What the start-up log says of the kernel's TLS.
pub fn describe() -> String {
    match offer() {
        Ok(()) => "the kernel encrypts after the handshake (kTLS: the tls module is loaded)".into(),
        Err(why) => format!("records are encrypted in the daemon (rustls): no kTLS, {why}"),
    }
}

/// What became of a session offered to the kernel.
pub enum HandOff {
    /// The kernel encrypts and decrypts from now on: the connection goes on
    /// as if it were plaintext.
    Kernel,
    /// The kernel does not take this session (no ULP, a cipher or version
    /// it lacks, data rustls still holds): it is given back, untouched, for
    /// the layer in user space.
    Declined(Box<ServerConnection>),
    /// The kernel refused the keys after rustls gave them up: the session
    /// cannot go on, and the socket is shut down. Why, for the record.
    Lost(String),
}

/// Hands the session to the kernel, if it takes the negotiated cipher.
pub fn hand_off(socket: BorrowedFd<'_>, mut conn: Box<ServerConnection>) -> HandOff {
    use HandOff::Declined;
    if offer().is_err() {
        return Declined(conn);
    }
    let version = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => libc::TLS_1_3_VERSION,
        Some(ProtocolVersion::TLSv1_2) => libc::TLS_1_2_VERSION,
        _ => return Declined(conn),
    };
    let cipher = match conn.negotiated_cipher_suite().map(|s| s.suite()) {
        Some(
            CipherSuite::TLS13_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        ) => libc::TLS_CIPHER_AES_GCM_128,
        Some(
            CipherSuite::TLS13_AES_256_GCM_SHA384
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ) => libc::TLS_CIPHER_AES_GCM_256,
        Some(
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ) => libc::TLS_CIPHER_CHACHA20_POLY1305,
        _ => return Declined(conn),
    };
    // Anything rustls still holds (to write, or decrypted past the
    // handshake; reading it one record at a time leaves none) would be lost
    // to the kernel.
    let held = conn.process_new_packets().map_or(true, |s| {
        s.plaintext_bytes_to_read() > 0 || s.tls_bytes_to_write() > 0
    });
    if REFUSED.load(Ordering::Relaxed) & bit(cipher) != 0 || held {
        return Declined(conn);
    }
    if setsockopt(&socket, TcpUlp::default(), b"tls").is_err() {
        return Declined(conn);
    }
    // From here the session is the kernel's or nobody's: rustls' state is
    // given up for the keys.
    let installed = conn
        .dangerous_extract_secrets()
        .map_err(|e| e.to_string())
        .and_then(
            |secrets| match (info_of(version, secrets.tx), info_of(version, secrets.rx)) {
                (Some(tx), Some(rx)) => setsockopt(&socket, TcpTlsTx, &tx)
                    .and_then(|()| setsockopt(&socket, TcpTlsRx, &rx))
                    .map_err(|e| e.desc().to_owned()),
                _ => Err("keys of an unexpected form".to_owned()),
            },
        );
    match installed {
        Ok(()) => {
            crate::sys::ktls_in_use();
            HandOff::Kernel
        }
        Err(why) => {
            // This connection can only be closed. Sessions with this cipher
            // stay in user space from now on.
            REFUSED.fetch_or(bit(cipher), Ordering::Relaxed);
            tracing::warn!(
                error = %why,
                "the kernel's TLS refused a session's keys ({}): that connection is closed, and \
                 later ones with its cipher are encrypted in the daemon",
                cipher_name(cipher)
            );
            let _ = shutdown(socket.as_raw_fd(), How::Both);
            HandOff::Lost(format!(
                "the kernel refused the session's keys ({}): {why}",
                cipher_name(cipher)
            ))
        }
    }
}

fn info_of(version: u16, (seq, secrets): (u64, ConnectionTrafficSecrets)) -> Option<TlsCryptoInfo> {
    let (cipher, key, iv) = match &secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            (libc::TLS_CIPHER_AES_GCM_128, key.as_ref(), iv.as_ref())
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            (libc::TLS_CIPHER_AES_GCM_256, key.as_ref(), iv.as_ref())
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (
            libc::TLS_CIPHER_CHACHA20_POLY1305,
            key.as_ref(),
            iv.as_ref(),
        ),
        _ => return None,
    };
    crypto_info(cipher, version, key, iv, seq)
}

/// The kernel's crypto_info for `cipher`: for GCM the first 4 bytes of the
/// 12-byte IV are the salt and the rest the IV; ChaCha20 takes all 12.
fn crypto_info(
    cipher: u16,
    version: u16,
    key: &[u8],
    iv: &[u8],
    seq: u64,
) -> Option<TlsCryptoInfo> {
    let info = libc::tls_crypto_info {
        version,
        cipher_type: cipher,
    };
    let rec_seq = seq.to_be_bytes();
    Some(match cipher {
        libc::TLS_CIPHER_AES_GCM_128 => {
            TlsCryptoInfo::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
                info,
                iv: iv.get(4..12)?.try_into().ok()?,
                key: key.get(..16)?.try_into().ok()?,
                salt: iv.get(..4)?.try_into().ok()?,
                rec_seq,
            })
        }
        libc::TLS_CIPHER_AES_GCM_256 => {
            TlsCryptoInfo::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
                info,
                iv: iv.get(4..12)?.try_into().ok()?,
                key: key.get(..32)?.try_into().ok()?,
                salt: iv.get(..4)?.try_into().ok()?,
                rec_seq,
            })
        }
        libc::TLS_CIPHER_CHACHA20_POLY1305 => {
            TlsCryptoInfo::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
                info,
                iv: iv.get(..12)?.try_into().ok()?,
                key: key.get(..32)?.try_into().ok()?,
                salt: [],
                rec_seq,
            })
        }
        _ => return None,
    })
}

fn cipher_name(cipher: u16) -> &'static str {
    match cipher {
        libc::TLS_CIPHER_AES_GCM_128 => "AES-128-GCM",
        libc::TLS_CIPHER_AES_GCM_256 => "AES-256-GCM",
        _ => "ChaCha20-Poly1305",
    }
}
