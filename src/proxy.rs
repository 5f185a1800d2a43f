//! The PROXY protocol, versions 1 and 2: a load balancer in front of the daemon
//! starts each connection with one header that names the real client.
//!
//! [`parse`] judges a buffer: a complete header, a prefix of one that needs more
//! bytes, or something that can no longer be a header. [`read_header`] takes the
//! header off a socket without consuming a single byte of what follows, because
//! those bytes belong to the command. Version 2 announces its length, so it is
//! read in two exact steps; version 1 ends at its CRLF, which is found by
//! peeking before anything past it is read.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{recv, MsgFlags};
use tokio::io::unix::AsyncFd;

use crate::fdio;

const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 header, CRLF included.
const V1_MAX: usize = 107;
const V2_SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v2 header accepted: 16 fixed bytes and 4080 of addresses and TLVs.
const V2_MAX: usize = 16 + 4080;
/// Every header of either version is longer, so a first read of this size
/// never takes payload.
const FIRST_READ: usize = 8;

/// What the header said about the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// The proxy relayed a client: its address and the address it connected to.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// v2 LOCAL command (the proxy's own health check) or v1 `UNKNOWN`, or a v2
    /// address family we do not use (AF_UNIX, UNSPEC): use the socket's own peer.
    Local,
}

/// The outcome of [`parse`] on a buffer that may hold a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A complete header of `len` bytes starts the buffer.
    Done { header: Header, len: usize },
}

/// A header that is malformed, unsupported, incomplete in time, or unreadable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyError(pub String);

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProxyError {}

fn fail<T>(msg: impl Into<String>) -> Result<T, ProxyError> {
    Err(ProxyError(msg.into()))
}

/// Parses the header at the start of `buf`; bytes after it are not looked at.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let proper_prefix = |sig: &[u8]| buf.len() < sig.len() && sig.starts_with(buf);
    if buf.starts_with(V2_SIG) {
        parse_v2(buf)
    } else if proper_prefix(V2_SIG) || proper_prefix(V1_PREFIX) {
        Ok(Parsed::Incomplete)
    } else if buf.starts_with(V1_PREFIX) {
        parse_v1(buf)
    } else {
        fail("not a PROXY protocol header")
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    // The protocol word is judged as soon as it can be, before the CRLF.
    let rest = &buf[V1_PREFIX.len()..];
    let end = rest.iter().position(|&b| b == b' ' || b == b'\r');
    let word = &rest[..end.unwrap_or(rest.len())];
    let known = |w: &[u8]| w == word || (end.is_none() && w.starts_with(word));
    if ![&b"TCP4"[..], b"TCP6", b"UNKNOWN"].into_iter().any(known) {
        let word = String::from_utf8_lossy(word);
        return fail(format!("PROXY v1: unknown protocol {word:?}"));
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return fail(format!("PROXY v1: no CRLF within {V1_MAX} bytes"));
        }
        return Ok(Parsed::Incomplete);
    };
    let line = &buf[V1_PREFIX.len()..end];
    let header = if line == b"UNKNOWN" || line.starts_with(b"UNKNOWN ") {
        Header::Local
    } else {
        v1_addresses(&String::from_utf8_lossy(line))?
    };
    let len = end + 2;
    Ok(Parsed::Done { header, len })
}

/// `TCP4 SRC DST SPORT DPORT` or the same with TCP6, single spaces only.
fn v1_addresses(line: &str) -> Result<Header, ProxyError> {
    let fields: Vec<&str> = line.split(' ').collect();
    let [proto, src, dst, sport, dport] = fields[..] else {
        let proto = fields[0];
        return fail(format!(
            "PROXY v1: expected {proto} SRC DST SPORT DPORT, single-spaced"
        ));
    };
    let ip = |s: &str, which: &str| match s.parse() {
        Ok(ip @ IpAddr::V4(_)) if proto == "TCP4" => Ok(ip),
        Ok(ip @ IpAddr::V6(_)) if proto == "TCP6" => Ok(ip),
        _ => fail(format!("PROXY v1: bad {which} address {s:?} for {proto}")),
    };
    let port = |s: &str, which: &str| match s.parse::<u16>() {
        Ok(p) if s.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => fail(format!("PROXY v1: bad {which} port {s:?}")),
    };
    Ok(Header::Proxied {
        source: SocketAddr::new(ip(src, "source")?, port(sport, "source")?),
        destination: SocketAddr::new(ip(dst, "destination")?, port(dport, "destination")?),
    })
}

/// Version 2; `buf` starts with the whole signature. Each field is judged as
/// soon as it is there, so a bad header fails before its body is awaited.
fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let Some(&version_command) = buf.get(12) else {
        return Ok(Parsed::Incomplete);
    };
    let (version, command) = (version_command >> 4, version_command & 0xf);
    if version != 2 {
        return fail(format!("PROXY v2: unsupported version 0x{version:x}"));
    }
    if command > 1 {
        return fail(format!("PROXY v2: unsupported command 0x{command:x}"));
    }
    let Some(&family) = buf.get(13) else {
        return Ok(Parsed::Incomplete);
    };
    // LOCAL ignores the whole address block, family included.
    let addresses = match (command, family) {
        (0, _) | (1, 0x00) => 0,
        (1, 0x11) => 12,
        (1, 0x21) => 36,
        (1, 0x31) => 216,
        (_, 0x12 | 0x22) => return fail("PROXY v2: UDP is not supported on a stream socket"),
        _ => return fail(format!("PROXY v2: unsupported family 0x{family:02x}")),
    };
    let Some(total) = v2_len(buf) else {
        return Ok(Parsed::Incomplete);
    };
    let length = total - 16;
    if total > V2_MAX {
        return fail(format!(
            "PROXY v2: header of {total} bytes is over the {V2_MAX}-byte limit"
        ));
    }
    if length < addresses {
        return fail(format!(
            "PROXY v2: length {length} does not cover the {addresses} bytes of addresses"
        ));
    }
    let Some(body) = buf.get(16..total) else {
        return Ok(Parsed::Incomplete);
    };
    let header = match (command, family) {
        (1, 0x11 | 0x21) => {
            let n = if family == 0x11 { 4 } else { 16 };
            let ip = |b: &[u8]| match <[u8; 4]>::try_from(b) {
                Ok(v4) => IpAddr::from(v4),
                Err(_) => IpAddr::from(<[u8; 16]>::try_from(b).unwrap_or_default()),
            };
            let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
            Header::Proxied {
                source: SocketAddr::new(ip(&body[..n]), port(2 * n)),
                destination: SocketAddr::new(ip(&body[n..2 * n]), port(2 * n + 2)),
            }
        }
        _ => Header::Local,
    };
    Ok(Parsed::Done { header, len: total })
}

/// The whole length of a v2 header, once its fixed 16 bytes are in `buf`.
fn v2_len(buf: &[u8]) -> Option<usize> {
    buf.get(14..16)
        .map(|l| 16 + usize::from(u16::from_be_bytes([l[0], l[1]])))
}

/// Reads exactly the header from a nonblocking socket registered with the event
/// loop, never a byte of what follows it, within `limit`. End-of-file before
/// the header is complete is an error too.
pub async fn read_header(socket: &AsyncFd<OwnedFd>, limit: Duration) -> Result<Header, ProxyError> {
    tokio::time::timeout(limit, read_exactly_header(socket))
        .await
        .unwrap_or_else(|_| {
            let ms = limit.as_millis();
            fail(format!("no complete PROXY header within {ms} ms"))
        })
}

async fn read_exactly_header(socket: &AsyncFd<OwnedFd>) -> Result<Header, ProxyError> {
    let mut buf = Vec::with_capacity(V1_MAX);
    loop {
        // How long `buf` may grow without reaching past the header.
        let safe = match parse(&buf)? {
            Parsed::Done { header, .. } => return Ok(header),
            Parsed::Incomplete if buf.len() < FIRST_READ => FIRST_READ,
            Parsed::Incomplete if buf[0] == V2_SIG[0] => v2_len(&buf).unwrap_or(16),
            Parsed::Incomplete => buf.len() + v1_safe(socket, &buf).await?,
        };
        let start = buf.len();
        buf.resize(safe, 0);
        let got = when_readable(socket, |fd| nix::unistd::read(fd, &mut buf[start..])).await;
        buf.truncate(start + *got.as_ref().unwrap_or(&0));
        got?;
    }
}

/// Peeks at what has arrived after `buf`, an incomplete v1 header, and says
/// how much of it to take: up to the CRLF, or all of it when there is none yet
/// (every byte before a CRLF is header). Taking it before waiting again keeps
/// readiness from firing forever on the same bytes.
async fn v1_safe(socket: &AsyncFd<OwnedFd>, buf: &[u8]) -> Result<usize, ProxyError> {
    let mut peeked = [0u8; V1_MAX];
    let room = V1_MAX - buf.len();
    let n = when_readable(socket, |fd| {
        recv(fd.as_raw_fd(), &mut peeked[..room], MsgFlags::MSG_PEEK)
    })
    .await?;
    let mut previous = buf.last().copied();
    let crlf_end = peeked[..n].iter().position(|&b| {
        let lf_after_cr = b == b'\n' && previous == Some(b'\r');
        previous = Some(b);
        lf_after_cr
    });
    Ok(crlf_end.map_or(n, |i| i + 1))
}

/// Runs one read-like call once the socket is readable; end-of-file is an
/// error here, since the header is not complete yet.
async fn when_readable(
    socket: &AsyncFd<OwnedFd>,
    op: impl FnMut(&OwnedFd) -> nix::Result<usize>,
) -> Result<usize, ProxyError> {
    match fdio::read_with(socket, op).await {
        Ok(0) => fail("client closed before the PROXY header was complete"),
        Ok(n) => Ok(n),
        Err(e) => fail(format!("reading the PROXY header: {}", e.desc())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::{collection::vec, prelude::*};
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    fn proxied(source: &str, destination: &str) -> Header {
        let (source, destination) = (source.parse().unwrap(), destination.parse().unwrap());
        Header::Proxied {
            source,
            destination,
        }
    }

    fn v1(line: &str) -> Vec<u8> {
        format!("PROXY {line}\r\n").into_bytes()
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let len = (body.len() as u16).to_be_bytes();
        [V2_SIG, &[0x20 | command, family], &len, body].concat()
    }

    fn valid() -> Vec<(Vec<u8>, Header)> {
        let v4 = [1, 2, 3, 4, 5, 6, 7, 8, 0x1f, 0x90, 0, 80];
        let mut v6 = [0u8; 36];
        (v6[15], v6[31], v6[33], v6[35]) = (1, 2, 1, 2);
        let tlvs = [&v4[..], &[0x04, 0, 2, b'h', b'i', 0xEE]].concat();
        let tcp4 = proxied("1.2.3.4:8080", "5.6.7.8:80");
        let tcp6 = proxied("[2001:db8::1]:0", "[::1]:65535");
        vec![
            (v1("TCP4 1.2.3.4 5.6.7.8 8080 80"), tcp4.clone()),
            (v1("TCP6 2001:db8::1 ::1 0 65535"), tcp6),
            (v1("UNKNOWN"), Header::Local),
            (b"PROXY UNKNOWN \xff  x\r\n".to_vec(), Header::Local),
            (v2(1, 0x11, &v4), tcp4.clone()),
            (v2(1, 0x21, &v6), proxied("[::1]:1", "[::2]:2")),
            (v2(1, 0x11, &tlvs), tcp4),
            (v2(0, 0x11, &v4), Header::Local),
            (v2(0, 0x12, &[]), Header::Local),
            (v2(1, 0x00, b"xyz"), Header::Local),
            (v2(1, 0x31, &[7; 216]), Header::Local),
            (v2(0, 0x00, &[0; 4080]), Header::Local),
        ]
    }

    #[test]
    fn valid_headers_parse_and_their_prefixes_are_incomplete() {
        for (bytes, header) in valid() {
            let buf = [&bytes[..], b"\r\nPROXY TCP4 payload\r\n"].concat();
            let len = bytes.len();
            assert_eq!(parse(&buf), Ok(Parsed::Done { header, len }), "{bytes:?}");
            for i in 0..len {
                assert_eq!(parse(&bytes[..i]), Ok(Parsed::Incomplete), "{bytes:?} {i}");
            }
        }
    }

    /// Inputs and their errors: a v1 line without "PROXY " and CRLF, or v2
    /// bytes after the signature in hex.
    const MALFORMED_V1: &str = r#"
TCP5 1.2.3.4 5.6.7.8 1 2 | unknown protocol "TCP5"
 TCP4 1.2.3.4 5.6.7.8 1 2 | unknown protocol ""
TCP45 1.2.3.4 5.6.7.8 1 2 | unknown protocol "TCP45"
TCP4 | expected TCP4 SRC DST SPORT DPORT, single-spaced
TCP4 1.2.3.4  5.6.7.8 1 2 | expected TCP4 SRC DST SPORT DPORT, single-spaced
TCP6 ::1 ::2 1 | expected TCP6 SRC DST SPORT DPORT, single-spaced
TCP4 ::1 5.6.7.8 1 2 | bad source address "::1" for TCP4
TCP6 ::1 5.6.7.8 1 2 | bad destination address "5.6.7.8" for TCP6
TCP4 1.2.3.4 5.6.7.8 99999 80 | bad source port "99999"
TCP4 1.2.3.4 5.6.7.8 80 +80 | bad destination port "+80"
TCP4 1.2.3.4 5.6.7.8 80  | bad destination port """#;
    const MALFORMED_V2: &str = "
11 | unsupported version 0x1
23 | unsupported command 0x3
21 22 | UDP is not supported on a stream socket
21 12 | UDP is not supported on a stream socket
21 32 | unsupported family 0x32
20 00 0f f1 | header of 4097 bytes is over the 4096-byte limit
21 11 00 08 | length 8 does not cover the 12 bytes of addresses";

    #[test]
    fn malformed_headers_say_what_is_wrong() {
        let not = "not a PROXY protocol header".to_owned();
        let long = v1(&format!("UNKNOWN {}", "x".repeat(92)));
        let early = r#"PROXY v1: unknown protocol "tcp4""#.to_owned();
        let mut cases = vec![
            (b"GET /\r\n".to_vec(), not),
            (b"PROXY tcp4".to_vec(), early),
        ];
        cases.push((
            long[..107].to_vec(),
            "PROXY v1: no CRLF within 107 bytes".into(),
        ));
        for (line, message) in MALFORMED_V1
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(" | "))
        {
            cases.push((v1(line), format!("PROXY v1: {message}")));
        }
        for (hex, message) in MALFORMED_V2
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(" | "))
        {
            let rest = hex.split(' ').map(|b| u8::from_str_radix(b, 16).unwrap());
            cases.push((
                [V2_SIG, &rest.collect::<Vec<_>>()].concat(),
                format!("PROXY v2: {message}"),
            ));
        }
        assert_eq!(cases.len(), 21);
        for (input, message) in cases {
            assert_eq!(parse(&input), Err(ProxyError(message)), "{input:?}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(sig in 0..3usize, rest in vec(any::<u8>(), 0..600)) {
            let _ = parse(&[[&b""[..], V1_PREFIX, V2_SIG][sig], &rest].concat());
        }

        #[test]
        fn generated_headers_parse(v6: bool, is_v2: bool, a: [u8; 16], b: [u8; 16],
            sport: u16, dport: u16, tlvs in vec(any::<u8>(), 0..64),
            payload in vec(any::<u8>(), 0..64)) {
            let raw = |x: [u8; 16]| if v6 { x.to_vec() } else { x[..4].to_vec() };
            let ip = |x: [u8; 16]| match <[u8; 4]>::try_from(raw(x).as_slice()) {
                Ok(v4) => IpAddr::from(v4),
                Err(_) => IpAddr::from(x),
            };
            let source = SocketAddr::new(ip(a), sport);
            let destination = SocketAddr::new(ip(b), dport);
            let bytes = if is_v2 {
                let ports = [sport.to_be_bytes(), dport.to_be_bytes()].concat();
                v2(1, if v6 { 0x21 } else { 0x11 }, &[raw(a), raw(b), ports, tlvs].concat())
            } else {
                let proto = if v6 { "TCP6" } else { "TCP4" };
                v1(&format!("{proto} {} {} {sport} {dport}", ip(a), ip(b)))
            };
            let len = bytes.len();
            let header = Header::Proxied { source, destination };
            prop_assert_eq!(parse(&[bytes, payload].concat()), Ok(Parsed::Done { header, len }));
        }
    }

    fn pair() -> (AsyncFd<OwnedFd>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let ours = crate::sys::register(ours.into(), tokio::io::Interest::READABLE).unwrap();
        (ours, theirs)
    }

    #[tokio::test]
    async fn reads_exactly_the_header_in_pieces() {
        let (v1, v2) = (&valid()[0], &valid()[6]);
        // v1 cut after the first read and between CR and LF; v2 inside its
        // fixed part and inside its addresses.
        let cases = [(v1, [11, v1.0.len() - 1]), (v2, [13, 20])];
        for ((bytes, header), [a, b]) in cases {
            let (fd, mut client) = pair();
            let payload = b"\r\nPROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nrest";
            let pieces = [&bytes[..a], &bytes[a..b], &[&bytes[b..], payload].concat()];
            let write = async {
                for piece in pieces {
                    client.write_all(piece).unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                client
            };
            let (got, client) = tokio::join!(read_header(&fd, Duration::from_secs(5)), write);
            assert_eq!(got.as_ref(), Ok(header));
            drop(client);
            let mut rest = [0u8; 100];
            let n = nix::unistd::read(fd.get_ref(), &mut rest).unwrap();
            assert_eq!(&rest[..n], payload);
        }
    }

    #[tokio::test]
    async fn gives_up_on_a_slow_or_closing_client() {
        let (fd, mut client) = pair();
        client.write_all(b"PROXY TCP4 1.2.3.4").unwrap();
        let late = read_header(&fd, Duration::from_millis(50)).await;
        let message = "no complete PROXY header within 50 ms";
        assert_eq!(late, Err(ProxyError(message.into())));
        let (fd, mut client) = pair();
        client
            .write_all(&[V2_SIG, b"\x21\x11\x00\x0c\x01"].concat())
            .unwrap();
        drop(client);
        let closed = read_header(&fd, Duration::from_secs(5)).await;
        let message = "client closed before the PROXY header was complete";
        assert_eq!(closed, Err(ProxyError(message.into())));
    }
}
