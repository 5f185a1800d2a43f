//! The TLS handshake, after admission and before any command: bounded in
//! time, and read one record at a time, so that nothing the client sends
//! after its last handshake message is read early (the kernel, or the
//! layer, gets it whole).

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use rustls::{CertificateError, Error as TlsError, ServerConnection};
use tokio::io::unix::AsyncFd;

use super::names;
use crate::config::{certificate_problem, words, Tls};
use crate::fdio;

/// The largest record a client may send: 2^14 bytes of plaintext and the
/// most a cipher may add (RFC 8446 5.2, RFC 5246 6.2.3).
const MAX_RECORD: usize = (1 << 14) + 2048;
const HEADER: usize = 5;

/// A client that completed its handshake.
pub struct Accepted {
    pub conn: Box<ServerConnection>,
    /// `SSL_PROTOCOL`, `SSL_CIPHER`, … for the command.
    pub env: Vec<(String, String)>,
    /// "TLSv1.3 TLS_AES_128_GCM_SHA256", for the log.
    pub summary: String,
}

/// Why a client's handshake failed. No command runs.
#[derive(Debug)]
pub enum HandshakeError {
    /// What came first is not a TLS handshake (plaintext HTTP, say).
    NotTls(String),
    /// The handshake did not complete within the limit.
    Timeout(Duration),
    /// A client certificate was required and missing, or did not verify.
    ClientCertificate(String),
    /// Anything else: no shared version or cipher, a malformed or truncated
    /// message, the client's alert, a client that left.
    Handshake(String),
}

impl HandshakeError {
    /// The refusal's reason in the log's episodes.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::NotTls(_) => "tls-not-tls",
            HandshakeError::Timeout(_) => "tls-timeout",
            HandshakeError::ClientCertificate(_) => "tls-client-certificate",
            HandshakeError::Handshake(_) => "tls-handshake",
        }
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::NotTls(what) => write!(f, "not a TLS handshake: {what}"),
            HandshakeError::Timeout(limit) => {
                write!(
                    f,
                    "no complete TLS handshake within {} ms",
                    limit.as_millis()
                )
            }
            HandshakeError::ClientCertificate(why) => write!(f, "client certificate: {why}"),
            HandshakeError::Handshake(why) => write!(f, "TLS handshake: {why}"),
        }
    }
}

/// Runs the server's side of the handshake on `socket` within `limit`.
pub async fn accept(
    socket: &AsyncFd<OwnedFd>,
    tls: &Tls,
    limit: Duration,
) -> Result<Accepted, HandshakeError> {
    let mut conn = ServerConnection::new(Arc::clone(&tls.config))
        .map_err(|e| HandshakeError::Handshake(e.to_string()))?;
    match tokio::time::timeout(limit, drive(socket, &mut conn)).await {
        Err(_) => Err(HandshakeError::Timeout(limit)),
        Ok(Err(refused)) => Err(refused),
        Ok(Ok(())) => Ok(Accepted {
            env: names::environment(&conn),
            summary: names::summary(&conn),
            conn: Box::new(conn),
        }),
    }
}

async fn drive(
    socket: &AsyncFd<OwnedFd>,
    conn: &mut ServerConnection,
) -> Result<(), HandshakeError> {
    let mut record = Vec::with_capacity(HEADER + MAX_RECORD);
    let mut first = true;
    loop {
        flush(socket, conn).await?;
        if !conn.is_handshaking() {
            return Ok(());
        }
        read_record(socket, &mut record, first).await?;
        first = false;
        let mut rest = record.as_slice();
        while !rest.is_empty() {
            conn.read_tls(&mut rest)
                .map_err(|e| HandshakeError::Handshake(e.to_string()))?;
        }
        if let Err(e) = conn.process_new_packets() {
            // The alert that says why, if the socket takes it now.
            let _ = conn.write_tls(&mut Fd(socket.get_ref()));
            return Err(classify(e));
        }
    }
}

/// Writes what rustls has for the client.
async fn flush(
    socket: &AsyncFd<OwnedFd>,
    conn: &mut ServerConnection,
) -> Result<(), HandshakeError> {
    while conn.wants_write() {
        fdio::write_with(socket, |fd| {
            conn.write_tls(&mut Fd(fd)).map_err(|e| fdio::errno(&e))
        })
        .await
        .map_err(|e| HandshakeError::Handshake(format!("the client left: {}", e.desc())))?;
    }
    Ok(())
}

/// Reads exactly one record into `record`: its header, then its body.
async fn read_record(
    socket: &AsyncFd<OwnedFd>,
    record: &mut Vec<u8>,
    first: bool,
) -> Result<(), HandshakeError> {
    record.clear();
    record.resize(HEADER, 0);
    fill(socket, record, 0, first).await?;
    let (kind, major) = (record[0], record[1]);
    let len = usize::from(u16::from_be_bytes([record[3], record[4]]));
    if first && kind != 22 {
        return Err(HandshakeError::NotTls(describe_start(record)));
    }
    if !(20..=23).contains(&kind) || major != 3 || len > MAX_RECORD {
        return Err(HandshakeError::Handshake(format!(
            "a malformed record (type {kind}, version {major}.{}, {len} bytes)",
            record[2]
        )));
    }
    record.resize(HEADER + len, 0);
    fill(socket, record, HEADER, false).await
}

/// Reads until `buf[from..]` is full.
async fn fill(
    socket: &AsyncFd<OwnedFd>,
    buf: &mut [u8],
    from: usize,
    first: bool,
) -> Result<(), HandshakeError> {
    let mut at = from;
    while at < buf.len() {
        let n = fdio::read_with(socket, |fd| nix::unistd::read(fd, &mut buf[at..]))
            .await
            .map_err(|e| HandshakeError::Handshake(format!("the client left: {}", e.desc())))?;
        if n == 0 {
            return Err(if first && at == 0 {
                HandshakeError::Handshake("the client closed without a word".into())
            } else {
                HandshakeError::Handshake(
                    "the client closed in the middle of a handshake message (truncated)".into(),
                )
            });
        }
        at += n;
    }
    Ok(())
}

/// What a client that does not speak TLS sent, in a few words.
fn describe_start(start: &[u8]) -> String {
    let text: String = start
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        })
        .collect();
    if [&b"GET "[..], b"POST", b"HEAD", b"PUT ", b"PRI "]
        .iter()
        .any(|m| start.starts_with(m))
    {
        format!("plaintext HTTP ({text:?}…) on a TLS port")
    } else {
        format!("it starts with {text:?}")
    }
}

fn classify(e: TlsError) -> HandshakeError {
    match e {
        TlsError::NoCertificatesPresented => HandshakeError::ClientCertificate(
            "none presented, and tls_client_auth requires one".into(),
        ),
        TlsError::InvalidCertificate(c) => HandshakeError::ClientCertificate(match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired".into(),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not valid yet".into()
            }
            CertificateError::UnknownIssuer => "not issued by tls_client_ca".into(),
            c => certificate_problem(&c),
        }),
        TlsError::PeerIncompatible(p) => {
            HandshakeError::Handshake(format!("nothing in common with the client: {}", named(&p)))
        }
        TlsError::AlertReceived(alert) => HandshakeError::Handshake(format!(
            "the client ended it with an alert: {}",
            named(&alert)
        )),
        TlsError::PeerMisbehaved(why) => {
            HandshakeError::Handshake(format!("the client broke the protocol: {}", named(&why)))
        }
        TlsError::InvalidMessage(why) => {
            HandshakeError::Handshake(format!("a malformed message: {}", named(&why)))
        }
        other => HandshakeError::Handshake(other.to_string()),
    }
}

/// A rustls reason by its name, in words (`NoCipherSuitesInCommon`: "no
/// cipher suites in common").
fn named(reason: &impl fmt::Debug) -> String {
    words(&format!("{reason:?}"))
}

/// A descriptor as rustls' reader and writer: nonblocking, EAGAIN as WouldBlock.
pub struct Fd<'a>(pub &'a OwnedFd);

impl Read for Fd<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match nix::unistd::read(self.0, buf) {
                Err(Errno::EINTR) => {}
                r => return r.map_err(io::Error::from),
            }
        }
    }
}

impl Write for Fd<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match nix::unistd::write(self.0, buf) {
                Err(Errno::EINTR) => {}
                r => return r.map_err(io::Error::from),
            }
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        loop {
            match nix::sys::uio::writev(self.0, bufs) {
                Err(Errno::EINTR) => {}
                r => return r.map_err(io::Error::from),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{AlertDescription, PeerIncompatible};

    #[test]
    fn refusals_are_told_in_words() {
        let said = |e: TlsError| classify(e).to_string();
        assert_eq!(
            said(TlsError::PeerIncompatible(
                PeerIncompatible::NoCipherSuitesInCommon
            )),
            "TLS handshake: nothing in common with the client: no cipher suites in common"
        );
        assert_eq!(
            said(TlsError::AlertReceived(AlertDescription::HandshakeFailure)),
            "TLS handshake: the client ended it with an alert: handshake failure"
        );
        assert_eq!(
            said(TlsError::InvalidCertificate(CertificateError::BadSignature)),
            "client certificate: its signature does not verify"
        );
        assert_eq!(
            said(TlsError::InvalidCertificate(
                CertificateError::UnknownIssuer
            )),
            "client certificate: not issued by tls_client_ca"
        );
        assert_eq!(words("Unknown(7)"), "Unknown(7)", "not a bare name");
    }
}
