//! The benchmark's TLS client: rustls, full handshakes every time (no
//! resumption), the servers' certificate checked against the CA in
//! `$BENCH_TLS_CA`.

use std::io::{self, Read};
use std::net::TcpStream;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

fn config() -> Arc<ClientConfig> {
    static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    Arc::clone(CONFIG.get_or_init(|| {
        let ca = std::env::var("BENCH_TLS_CA").expect("BENCH_TLS_CA: the servers' CA (PEM)");
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&ca).expect("BENCH_TLS_CA") {
            roots.add(cert.expect("a certificate")).expect("a CA");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.resumption = rustls::client::Resumption::disabled();
        Arc::new(config)
    }))
}

/// A TLS connection over `stream`; the handshake happens on the first read.
pub struct Tls(StreamOwned<ClientConnection, TcpStream>);

impl Tls {
    pub fn new(stream: TcpStream) -> io::Result<Tls> {
        let name = ServerName::try_from("localhost").expect("a name");
        let conn = ClientConnection::new(config(), name).map_err(io::Error::other)?;
        Ok(Tls(StreamOwned::new(conn, stream)))
    }
}

impl Read for Tls {
    /// A server that closes without close_notify ends the stream too.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            other => other,
        }
    }
}
