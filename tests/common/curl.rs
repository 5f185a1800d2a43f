//! curl, Debian's, as the HTTP tests' client: what it got (the status, the
//! head, the body), with the head in a file of its own.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};

/// What curl got: its exit code, the response's head and its body.
pub struct Got {
    pub code: i32,
    pub head: String,
    pub body: Vec<u8>,
    pub stderr: String,
}

impl Got {
    /// The final status (after any `100 Continue`).
    pub fn status(&self) -> u16 {
        let mut statuses = self.head.lines().filter(|l| l.starts_with("HTTP/"));
        let line = statuses.next_back().unwrap_or_default();
        line.split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Runs curl on `url` with `args`; the head goes to a file of its own.
pub fn curl(url: &str, args: &[&str]) -> Got {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "-D"])
        .arg(&head)
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("curl (Debian's curl package)");
    Got {
        code: out.status.code().unwrap_or(-1),
        head: std::fs::read_to_string(&head).unwrap_or_default(),
        body: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

/// curl streaming `url` (`-N`), once it has printed its first line: the
/// child, the rest of its output, and that line.
pub fn streaming(url: &str) -> (Child, BufReader<ChildStdout>, String) {
    let mut child = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "60", url])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    (child, out, line)
}
