//! A command's CGI header block (`cgi_headers = true`; RFC 3875 section 6):
//! header lines before the body, ended by an empty line, which set the
//! response's status (`Status: 404 Not Found`), its type, and other headers
//! of its own. The daemon keeps the headers it owns (the framing, the
//! connection's) and refuses a block that is malformed or too long.

/// The longest header block, and the most headers in it.
const MAX_BLOCK: usize = 8 * 1024;
const MAX_FIELDS: usize = 64;

/// Headers the daemon owns: a command's are dropped.
const OWNED: [&str; 8] = [
    "connection",
    "content-length",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A parsed header block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgiHead {
    pub status: u16,
    pub content_type: Option<String>,
    /// The rest, as the command wrote them.
    pub headers: Vec<(String, String)>,
}

/// The header block at the start of `bytes`: the block and where the body
/// starts, once the empty line has come; None while more is needed; or
/// why it is refused.
pub fn parse(bytes: &[u8]) -> Result<Option<(CgiHead, usize)>, String> {
    let Some((block, body)) = split(bytes) else {
        if bytes.len() > MAX_BLOCK {
            return Err(format!(
                "no end of the CGI header block within {MAX_BLOCK} bytes"
            ));
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(block)
        .map_err(|_| "a CGI header block that is not text".to_string())?;
    let mut head = CgiHead {
        status: 200,
        content_type: None,
        headers: Vec::new(),
    };
    let mut status = None;
    let mut location = false;
    for (i, line) in text.lines().enumerate() {
        if i >= MAX_FIELDS {
            return Err(format!("more than {MAX_FIELDS} CGI headers"));
        }
        let line = line.strip_suffix('\r').unwrap_or(line);
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("a CGI header line without a colon: {line:?}"))?;
        let value = value.trim();
        let token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token || value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(format!("a malformed CGI header: {line:?}"));
        }
        match name.to_ascii_lowercase().as_str() {
            "status" => {
                let code = value.split(' ').next().unwrap_or("");
                let code = code
                    .parse::<u16>()
                    .ok()
                    .filter(|c| (200..=599).contains(c) && code.len() == 3)
                    .ok_or_else(|| {
                        format!("a CGI Status that is not a status from 200 to 599: {value:?}")
                    })?;
                status = Some(code);
            }
            "content-type" => head.content_type = Some(value.to_owned()),
            owned if OWNED.contains(&owned) => {}
            lower => {
                location |= lower == "location";
                head.headers.push((name.to_owned(), value.to_owned()));
            }
        }
    }
    // A Location without a Status is a redirect (RFC 3875 section 6.2.3).
    head.status = status.unwrap_or(if location { 302 } else { 200 });
    Ok(Some((head, body)))
}

/// The block (without its empty line) and where the body starts.
fn split(bytes: &[u8]) -> Option<(&[u8], usize)> {
    let mut start = 0;
    while let Some(end) = bytes[start..].iter().position(|&b| b == b'\n') {
        let line = &bytes[start..start + end];
        if line.is_empty() || line == b"\r" {
            return Some((&bytes[..start], start + end + 1));
        }
        start += end + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_sets_the_status_type_and_headers_and_the_daemon_keeps_its_own() {
        let out = b"Status: 404 Not Found\r\nContent-Type: text/html\r\nX-Id: 7\r\nContent-Length: 3\r\n\r\nbody";
        let (head, at) = parse(out).unwrap().unwrap();
        assert_eq!(head.status, 404);
        assert_eq!(head.content_type.as_deref(), Some("text/html"));
        assert_eq!(head.headers, [("X-Id".to_string(), "7".to_string())]);
        assert_eq!(&out[at..], b"body");
        let (redirect, _) = parse(b"Location: /elsewhere\n\n").unwrap().unwrap();
        assert_eq!(redirect.status, 302);
        let (plain, at) = parse(b"\nno headers").unwrap().unwrap();
        assert_eq!((plain.status, at), (200, 1));
    }

    #[test]
    fn an_unfinished_block_waits_and_a_bad_one_is_refused() {
        assert_eq!(parse(b"Status: 200 OK\r\nX: y"), Ok(None));
        for (bad, why) in [
            (&b"Status: 99\n\n"[..], "200 to 599"),
            (b"no colon\n\n", "without a colon"),
            (b"Bad Name: x\n\n", "malformed"),
            (b"X: a\x01b\n\n", "malformed"),
        ] {
            assert!(parse(bad).unwrap_err().contains(why), "{bad:?}");
        }
        assert!(parse(&vec![b'x'; MAX_BLOCK + 1])
            .unwrap_err()
            .contains("no end"));
        assert_eq!(
            parse(&vec![b'x'; 8 * 1024]),
            Ok(None),
            "8 KiB without its end waits"
        );
        let status = parse(b"Status: 0404 Not Found\n\n").unwrap_err();
        assert!(status.contains("200 to 599"), "three digits: {status}");
    }
}
