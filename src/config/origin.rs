//! An origin in `allowed_origins`, as written and checked at load (the
//! WebSocket handshake matches browsers' `Origin` headers against it).

use std::fmt;
use std::str::FromStr;

/// An origin a service accepts: `scheme://host[:port]`, or `host[:port]`
/// for any scheme; without a port, any port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Lower case; None for any scheme.
    pub scheme: Option<String>,
    /// Lower case.
    pub host: String,
    /// None for any port.
    pub port: Option<u16>,
}

impl FromStr for Origin {
    type Err = String;

    fn from_str(text: &str) -> Result<Origin, String> {
        let bad = || {
            format!(
                "{text:?}: expected an origin like \"https://example.com\", \"example.com:8443\" or \"example.com\""
            )
        };
        let (scheme, rest) = match text.split_once("://") {
            Some((s, r))
                if !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
            {
                (Some(s.to_ascii_lowercase()), r)
            }
            Some(_) => return Err(bad()),
            None => (None, text),
        };
        let (host, port) = split_host_port(rest).ok_or_else(bad)?;
        if host.is_empty() || rest.contains(['/', '?', '#', '@']) {
            return Err(bad());
        }
        Ok(Origin {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(s) = &self.scheme {
            write!(f, "{s}://")?;
        }
        f.write_str(&self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`; None for a bad port.
pub fn split_host_port(text: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(p) => Some((host, Some(p.parse().ok()?))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match text.rsplit_once(':') {
        Some((host, p)) if !host.contains(':') => Some((host, Some(p.parse().ok()?))),
        Some(_) => None,
        None => Some((text, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_as_documented() {
        let o: Origin = "https://Example.com:8443".parse().unwrap();
        assert_eq!(
            (o.scheme.as_deref(), o.host.as_str(), o.port),
            (Some("https"), "example.com", Some(8443))
        );
        assert_eq!(o.to_string(), "https://example.com:8443");
        assert_eq!(split_host_port("[::1]:9"), Some(("::1", Some(9))));
        assert_eq!(
            split_host_port("a:b:c"),
            None,
            "an IPv6 address needs brackets"
        );
    }
}
