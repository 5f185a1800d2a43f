//! A service's TLS material: the certificate chain, its key and the client
//! CA, from files or from systemd credentials, read and checked when the
//! configuration is loaded, into the rustls configuration every handshake
//! of the service uses.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// Whether clients present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// None is asked for.
    None,
    /// Asked for; a client without one is served, one with a bad one is not.
    Optional,
    /// A client without a valid certificate from `tls_client_ca` is refused.
    Required,
}

/// A service's TLS, loaded and checked.
pub struct Tls {
    pub config: Arc<ServerConfig>,
    pub client_auth: ClientAuth,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

/// The keys as written: each a path or a credential name.
pub struct Sources<'a> {
    pub certificate: &'a str,
    pub key: &'a str,
    pub client_ca: Option<&'a str>,
    pub client_auth: ClientAuth,
}

/// A problem with one key: the key, and what is wrong.
pub type KeyProblem = (&'static str, String);

/// Reads and checks the certificate chain, the key, and the client CA.
pub fn load(sources: &Sources<'_>) -> Result<Tls, KeyProblem> {
    let chain = certificates("tls_certificate", sources.certificate)?;
    let key_path = resolve(sources.key).map_err(|m| ("tls_key", m))?;
    let key = PrivateKeyDer::from_pem_slice(&read("tls_key", &key_path)?).map_err(|e| {
        (
            "tls_key",
            format!(
                "{}: no private key in it ({e}; PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY expected)",
                key_path.display()
            ),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ("tls_certificate", e.to_string()))?;
    let builder = match (sources.client_ca, sources.client_auth) {
        (_, ClientAuth::None) => builder.with_no_client_auth(),
        (None, _) => {
            return Err((
                "tls_client_auth",
                "needs tls_client_ca: the certificates client certificates are checked against"
                    .into(),
            ))
        }
        (Some(ca), auth) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("tls_client_ca", ca)? {
                roots
                    .add(cert)
                    .map_err(|e| ("tls_client_ca", format!("{ca}: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match auth {
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            let verifier = verifier
                .build()
                .map_err(|e| ("tls_client_ca", format!("{ca}: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        (
            "tls_key",
            format!(
                "{}: does not go with tls_certificate ({e})",
                key_path.display()
            ),
        )
    })?;
    // No 0-RTT data: it could be replayed, and no command may run twice for one request.
    config.max_early_data_size = 0;
    // The keys may go to the kernel (kTLS) after the handshake.
    config.enable_secret_extraction = true;
    Ok(Tls {
        config: Arc::new(config),
        client_auth: sources.client_auth,
    })
}

/// Every certificate in a PEM file; at least one.
fn certificates(
    key: &'static str,
    source: &str,
) -> Result<Vec<CertificateDer<'static>>, KeyProblem> {
    let path = resolve(source).map_err(|m| (key, m))?;
    let pem = read(key, &path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| (key, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err((
            key,
            format!(
                "{}: no certificate in it (PEM CERTIFICATE blocks expected)",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, KeyProblem> {
    std::fs::read(path).map_err(|e| {
        (
            key,
            format!("{}: {}", path.display(), crate::fdio::reason(&e)),
        )
    })
}

/// An absolute path as it is; a name without '/' is a systemd credential
/// (`LoadCredential=NAME:…`), in `$CREDENTIALS_DIRECTORY`.
fn resolve(source: &str) -> Result<PathBuf, String> {
    if source.starts_with('/') {
        return Ok(PathBuf::from(source));
    }
    if source.is_empty() || source.contains('/') {
        return Err(format!(
            "{source:?}: an absolute path, or the name of a credential (LoadCredential=), expected"
        ));
    }
    match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(dir) => Ok(Path::new(&dir).join(source)),
        None => Err(format!(
            "{source:?} names a credential, and $CREDENTIALS_DIRECTORY is not set: give the unit \
             LoadCredential={source}:/path/to/file (see splice-relay.toml(5)), or write an absolute path"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_names_and_paths() {
        assert_eq!(resolve("/etc/x.pem").unwrap(), PathBuf::from("/etc/x.pem"));
        assert!(resolve("tls/x.pem")
            .unwrap_err()
            .contains("an absolute path"));
        assert!(resolve("").is_err());
    }
}
