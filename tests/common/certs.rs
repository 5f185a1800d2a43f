//! Certificates for the TLS tests, made with the openssl command line as an
//! administrator would: a CA, a server certificate for localhost signed by
//! it, client certificates (good, from another CA, expired), and a
//! renewed server certificate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The files of one test's PKI, in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

/// The subject and serial of the good client certificate.
pub const CLIENT_SUBJECT: &str = "/C=DE/O=Example, Inc./CN=client one";
pub const CLIENT_SERIAL: &str = "0123ABCD";

impl Pki {
    /// A CA, `server.pem`/`server-key.pem` for localhost and 127.0.0.1,
    /// `client.pem`/`client-key.pem` (CLIENT_SUBJECT, CLIENT_SERIAL),
    /// `stranger.pem` (from another CA), `expired.pem` (expired in 2020),
    /// and `renewed.pem`/`renewed-key.pem` (CN=renewed).
    pub fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
        };
        pki.ca("ca", "/CN=splice-relay test CA");
        pki.ca("other-ca", "/CN=another CA");
        let server_ext = "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n";
        pki.leaf("server", "/CN=localhost", "ca", server_ext, "0x01");
        pki.leaf("renewed", "/CN=renewed", "ca", server_ext, "0x02");
        let client_ext = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n";
        pki.leaf(
            "client",
            CLIENT_SUBJECT,
            "ca",
            client_ext,
            &format!("0x{CLIENT_SERIAL}"),
        );
        pki.leaf("stranger", "/CN=stranger", "other-ca", client_ext, "0x03");
        pki.expired("expired", "/CN=expired", client_ext);
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The config lines of a TLS service with this PKI's server certificate.
    pub fn tls_lines(&self) -> String {
        format!(
            "tls_certificate = \"{}\"\ntls_key = \"{}\"\n",
            self.file("server.pem"),
            self.file("server-key.pem")
        )
    }

    /// `path(name)` as a string, for a config.
    pub fn file(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    fn ca(&self, name: &str, subject: &str) {
        openssl(
            self.dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}-key.pem"),
                "-out",
                &format!("{name}.pem"),
                "-days",
                "30",
                "-subj",
                subject,
            ],
        );
    }

    fn leaf(&self, name: &str, subject: &str, ca: &str, ext: &str, serial: &str) {
        let dir = self.dir.path();
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        key_and_request(dir, name, subject);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}-key.pem"),
                "-set_serial",
                serial,
                "-days",
                "30",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }

    /// A client certificate valid in 2020 only, signed by "ca" (`openssl
    /// ca` is the tool that takes dates).
    fn expired(&self, name: &str, subject: &str, ext: &str) {
        let dir = self.dir.path();
        std::fs::write(dir.join("index.txt"), "").unwrap();
        std::fs::write(dir.join("serial.txt"), "04\n").unwrap();
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        std::fs::write(
            dir.join("ca.cnf"),
            "[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\nserial = serial.txt\nnew_certs_dir = .\n\
             default_md = sha256\npolicy = any\nunique_subject = no\n[any]\ncommonName = supplied\n",
        )
        .unwrap();
        key_and_request(dir, name, subject);
        openssl(
            dir,
            &[
                "ca",
                "-batch",
                "-config",
                "ca.cnf",
                "-cert",
                "ca.pem",
                "-keyfile",
                "ca-key.pem",
                "-in",
                &format!("{name}.csr"),
                "-out",
                &format!("{name}.pem"),
                "-notext",
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20200201000000Z",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// A new P-256 key `NAME-key.pem` and its request `NAME.csr` for `subject`,
/// in `dir`.
pub fn key_and_request(dir: &Path, name: &str, subject: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subject,
        ],
    );
}

/// Runs openssl in `dir`; fails the test if it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian's openssl package)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `openssl x509` says of a certificate: `-subject`, `-fingerprint`, ….
pub fn x509(cert: &str, what: &[&str]) -> String {
    let mut args = vec!["x509", "-noout"];
    args.extend_from_slice(what);
    let out = Command::new("openssl")
        .args(&args)
        .stdin(std::fs::File::open(cert).unwrap())
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Runs a Python script with hashlib, json, os, socket, ssl, sys and time
/// imported, the daemon's port, the CA file and the PKI directory as
/// `port`, `ca` and `pki`; returns what it printed. Fails the test if the
/// script fails.
pub fn python_tls(addr: SocketAddr, pki: &Pki, body: &str) -> String {
    let script = format!(
        "import hashlib, json, os, socket, ssl, sys, time\n\
         port, ca, pki = int(sys.argv[1]), sys.argv[2], sys.argv[3]\n{body}"
    );
    let out = Command::new(super::ws::PYTHON)
        .arg("-c")
        .arg(&script)
        .arg(addr.port().to_string())
        .arg(pki.file("ca.pem"))
        .arg(pki.dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// For [`python_tls`]: completes a handshake on a raw socket `raw` (through
/// memory BIOs), then sends an application-data record of garbage, whose
/// tag cannot verify.
pub const FORGED_RECORD: &str = r#"ctx = ssl.create_default_context(cafile=ca)
raw = socket.create_connection(("127.0.0.1", port))
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
while True:
    try:
        obj.do_handshake()
        break
    except ssl.SSLWantReadError:
        raw.sendall(outgoing.read())
        incoming.write(raw.recv(65536))
raw.sendall(outgoing.read())
raw.sendall(bytes([23, 3, 3, 0, 40]) + os.urandom(40))
"#;
