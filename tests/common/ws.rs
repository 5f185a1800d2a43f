//! WebSocket clients for the tests. Real ones first: Python's websockets and
//! node's ws (Debian's python3-websockets and node-ws), driven by a short
//! script each test gives. And [`Frames`], a client that writes frames by
//! hand, for what no real client sends: unmasked frames, reserved bits and
//! opcodes, bad UTF-8, oversized frames, pings it never answers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output, Stdio};

use super::PATIENCE;

/// Debian's Python, which sees python3-websockets (a `python3` earlier in
/// PATH may not).
pub const PYTHON: &str = "/usr/bin/python3";

/// Runs `body` as the inside of `async def main(url)` with the websockets
/// module imported (and asyncio, json, sys), against `url`. Returns what it
/// printed; fails the test with its stderr if it failed.
pub fn python_ws(url: &str, body: &str) -> String {
    let script = format!(
        "import asyncio, json, sys, websockets\n\
         async def main(url):\n{}\n\
         asyncio.run(asyncio.wait_for(main(sys.argv[1]), {}))\n",
        indent(body),
        PATIENCE.as_secs()
    );
    let out = Command::new(PYTHON)
        .arg("-c")
        .arg(&script)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{PYTHON}: {e} (is python3-websockets installed?)"));
    succeeded("python3", &script, out)
}

/// Runs `script` with node, `ws` (Debian's node-ws) resolvable and `URL`
/// given as process.argv[1]. Returns what it printed.
pub fn node_ws(url: &str, script: &str) -> String {
    let out = Command::new("node")
        .arg("-e")
        .arg(script)
        .arg(url)
        .env("NODE_PATH", "/usr/share/nodejs")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("node: {e} (are nodejs and node-ws installed?)"));
    succeeded("node", script, out)
}

fn succeeded(what: &str, script: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{script}\n--- stdout\n{stdout}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn indent(body: &str) -> String {
    body.lines()
        .map(|l| format!("    {l}\n"))
        .collect::<String>()
}

/// An upgrade request for `path` with `extra` header lines (each ending in \r\n).
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Sends `request` raw and reads the answer's status line and headers.
pub fn http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(request).unwrap();
    let head = read_head(&mut s);
    (status(&head), head)
}

/// Reads up to the blank line after the headers, byte by byte (nothing after it).
pub fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!(
                "the answer ended early ({other:?}) after {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    String::from_utf8(head).unwrap()
}

pub fn status(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"))
}

/// A frame as it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The code of a close frame (None without one).
    pub fn close_code(&self) -> Option<u16> {
        assert_eq!(self.opcode, CLOSE, "not a close frame: {self:?}");
        (self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// A client that writes its frames by hand.
pub struct Frames {
    pub stream: TcpStream,
}

impl Frames {
    /// Connects and upgrades; panics unless the answer is 101.
    pub fn connect(addr: SocketAddr, path: &str) -> Frames {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream
            .write_all(upgrade_request(path, "").as_bytes())
            .unwrap();
        let head = read_head(&mut stream);
        assert_eq!(status(&head), 101, "{head}");
        assert!(
            head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
            "{head}"
        );
        Frames { stream }
    }

    /// Sends a masked frame with the final bit and opcode given.
    pub fn send(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.send_raw(encode(
            fin,
            opcode,
            payload,
            Some([0x12, 0x34, 0x56, 0x78]),
            0,
        ));
    }

    pub fn send_raw(&mut self, bytes: Vec<u8>) {
        self.stream.write_all(&bytes).unwrap();
    }

    /// Reads one frame; None at end-of-file or a reset.
    pub fn read(&mut self) -> Option<Frame> {
        let mut head = [0u8; 2];
        self.stream.read_exact(&mut head).ok()?;
        assert_eq!(head[1] & 0x80, 0, "a server frame is never masked");
        let len = match head[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                self.stream.read_exact(&mut b).ok()?;
                u16::from_be_bytes(b) as usize
            }
            127 => {
                let mut b = [0u8; 8];
                self.stream.read_exact(&mut b).ok()?;
                u64::from_be_bytes(b) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload).ok()?;
        Some(Frame {
            fin: head[0] & 0x80 != 0,
            opcode: head[0] & 0x0f,
            payload,
        })
    }

    /// Reads frames until one that is not a ping (pings are answered);
    /// None at end-of-file.
    pub fn next(&mut self) -> Option<Frame> {
        loop {
            let frame = self.read()?;
            if frame.opcode != PING {
                return Some(frame);
            }
            self.send(true, PONG, &frame.payload.clone());
        }
    }

    /// The next text message (pings answered), as a string.
    pub fn text(&mut self) -> String {
        let frame = self.next().expect("a message, not the end");
        assert_eq!((frame.fin, frame.opcode), (true, TEXT), "{frame:?}");
        String::from_utf8(frame.payload).unwrap()
    }

    /// Reads until the close frame; returns its code. Fails on end-of-file first.
    pub fn close_code(&mut self) -> Option<u16> {
        loop {
            let frame = self.next().expect("a close frame before the end");
            if frame.opcode == CLOSE {
                return frame.close_code();
            }
        }
    }

    /// True once the server has closed the connection (end-of-file or reset).
    pub fn ended(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    }
}

/// A client frame: `mask` None sends it unmasked, `rsv` sets reserved bits.
pub fn encode(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>, rsv: u8) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
    let masked = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(masked | n as u8),
        n @ 126..=0xffff => {
            out.push(masked | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(masked | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Opens the console page at `url` in headless Chromium (with `flags`) and
/// drives it over the DevTools protocol (tests/clients/console_cdp.py):
/// the command's first line, a typed line and its answer, a screenshot
/// kept as target/test-artifacts/`shot`, the close. Returns what the script
/// printed (the rows shown, the close row) and the screenshot's path.
pub fn console_in_chromium(
    url: &str,
    shot: &str,
    flags: &[&str],
) -> (serde_json::Value, std::path::PathBuf) {
    chromium_console(url, shot, flags, &[])
}

/// As [`console_in_chromium`], for a shared command (which reads no
/// input): the page watches until the output ends and the server closes.
pub fn console_watching_in_chromium(
    url: &str,
    shot: &str,
) -> (serde_json::Value, std::path::PathBuf) {
    chromium_console(url, shot, &[], &["--watch"])
}

fn chromium_console(
    url: &str,
    shot: &str,
    flags: &[&str],
    mode: &[&str],
) -> (serde_json::Value, std::path::PathBuf) {
    let profile = tempfile::tempdir().unwrap();
    let mut browser = Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-port=0",
        ])
        .arg("--window-size=900,520")
        .args(flags)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium (Debian's chromium package)");
    let stderr = browser.stderr.take().unwrap();
    let devtools = std::io::BufRead::lines(std::io::BufReader::new(stderr))
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("DevTools listening on ").map(str::to_owned))
        .expect("chromium's DevTools address");
    let port = devtools
        .trim_start_matches("ws://127.0.0.1:")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let artifacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join(shot);
    let out = Command::new(PYTHON)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/console_cdp.py"
        ))
        .args([&port, url, shot.to_str().unwrap()])
        .args(mode)
        .output()
        .unwrap();
    let _ = browser.kill();
    let _ = browser.wait();
    let stdout = succeeded("console_cdp.py", url, out);
    let last = stdout.lines().last().unwrap_or_default();
    let v = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    (v, shot)
}
