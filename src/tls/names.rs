//! What the command learns about the TLS session, in the names mod_ssl and
//! sslserver use, so programs written for them keep working:
//! `SSL_PROTOCOL`, `SSL_CIPHER` (OpenSSL's names), `SSL_TLS_SNI`,
//! `SSL_CLIENT_VERIFY`, and for a client certificate `SSL_CLIENT_S_DN`,
//! `SSL_CLIENT_I_DN` (RFC 4514 strings, as mod_ssl 2.4 writes them),
//! `SSL_CLIENT_M_SERIAL` (upper-case hex) and `SSL_CLIENT_CERT` (PEM).

use rustls::{CipherSuite, ProtocolVersion, ServerConnection};
use x509_cert::der::Decode;
use x509_cert::Certificate;

pub fn environment(conn: &ServerConnection) -> Vec<(String, String)> {
    let mut env = vec![
        ("SSL_PROTOCOL".to_owned(), protocol(conn).to_owned()),
        ("SSL_CIPHER".to_owned(), cipher(conn)),
    ];
    if let Some(sni) = conn.server_name() {
        env.push(("SSL_TLS_SNI".into(), sni.to_owned()));
    }
    let leaf = conn.peer_certificates().and_then(|c| c.first());
    let verify = if leaf.is_some() { "SUCCESS" } else { "NONE" };
    env.push(("SSL_CLIENT_VERIFY".into(), verify.into()));
    if let Some(der) = leaf {
        if let Ok(cert) = Certificate::from_der(der) {
            let tbs = &cert.tbs_certificate;
            env.push(("SSL_CLIENT_S_DN".into(), tbs.subject.to_string()));
            env.push(("SSL_CLIENT_I_DN".into(), tbs.issuer.to_string()));
            env.push((
                "SSL_CLIENT_M_SERIAL".into(),
                serial(tbs.serial_number.as_bytes()),
            ));
        }
        env.push(("SSL_CLIENT_CERT".into(), pem(der)));
    }
    env
}

/// "TLSv1.3 TLS_AES_128_GCM_SHA256".
pub fn summary(conn: &ServerConnection) -> String {
    format!("{} {}", protocol(conn), cipher(conn))
}

fn protocol(conn: &ServerConnection) -> &'static str {
    match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "unknown",
    }
}

/// The suite's name as OpenSSL (and so mod_ssl) writes it.
fn cipher(conn: &ServerConnection) -> String {
    let Some(suite) = conn.negotiated_cipher_suite() else {
        return "unknown".into();
    };
    let name = match suite.suite() {
        CipherSuite::TLS13_AES_128_GCM_SHA256 => "TLS_AES_128_GCM_SHA256",
        CipherSuite::TLS13_AES_256_GCM_SHA384 => "TLS_AES_256_GCM_SHA384",
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => "TLS_CHACHA20_POLY1305_SHA256",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => "ECDHE-ECDSA-AES128-GCM-SHA256",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => "ECDHE-ECDSA-AES256-GCM-SHA384",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => {
            "ECDHE-ECDSA-CHACHA20-POLY1305"
        }
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => "ECDHE-RSA-AES128-GCM-SHA256",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => "ECDHE-RSA-AES256-GCM-SHA384",
        CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-RSA-CHACHA20-POLY1305",
        other => return format!("{other:?}"),
    };
    name.into()
}

/// A serial number's bytes as OpenSSL prints them: upper-case hex, without
/// the zero byte DER puts before a high first byte.
fn serial(bytes: &[u8]) -> String {
    let bytes = match bytes {
        [0, next, ..] if *next >= 0x80 => &bytes[1..],
        _ => bytes,
    };
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

fn pem(der: &[u8]) -> String {
    let base64 = data_encoding::BASE64.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in base64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_print_as_openssl_prints_them() {
        assert_eq!(serial(&[0x01, 0x23, 0xab, 0xcd]), "0123ABCD");
        assert_eq!(serial(&[0x00, 0x9f, 0x01]), "9F01");
        assert_eq!(serial(&[0x00, 0x1f]), "001F");
    }

    #[test]
    fn pem_lines_are_64_characters() {
        let text = pem(&[7u8; 100]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last(), Some(&"-----END CERTIFICATE-----"));
        assert_eq!(
            data_encoding::BASE64
                .decode(lines[1..lines.len() - 1].concat().as_bytes())
                .unwrap(),
            vec![7u8; 100]
        );
    }
}
