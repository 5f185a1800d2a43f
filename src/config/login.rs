//! Logins for HTTP and WebSocket services, as read from their files:
//! `htpasswd` (users and their password hashes) and `bearer_tokens` (one a
//! line). Each is an absolute path or a systemd credential's name, read at
//! load and so again at each reload. Only hashes that resist guessing are
//! taken: bcrypt (`htpasswd -B`) and SHA-512-crypt or SHA-256-crypt
//! (`openssl passwd -6`); plain text, MD5 (`$apr1$`, `$1$`), SHA-1
//! (`{SHA}`) and DES crypt are refused with the line that has them.

use std::fmt;

use super::tls::resolve;

/// The shortest bearer token taken: shorter ones could be guessed.
pub const MIN_TOKEN: usize = 16;

/// Who may log in to a service.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    /// Users and their hashes, from `htpasswd`.
    pub users: Vec<User>,
    /// Bearer tokens, from `bearer_tokens`.
    pub tokens: Vec<Vec<u8>>,
}

impl fmt::Debug for Login {
    // Hashes and tokens stay out of debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Login")
            .field("users", &self.users)
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

/// A user of `htpasswd`.
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub hash: Hash,
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A password hash of a kind that is taken.
#[derive(Clone, PartialEq, Eq)]
pub enum Hash {
    /// `$2a$`, `$2b$`, `$2y$`: bcrypt.
    Bcrypt(String),
    /// `$6$` (SHA-512) or `$5$` (SHA-256): glibc's SHA-crypt.
    ShaCrypt(String),
}

/// Reads the service's login files; None when it names neither.
pub fn load(
    htpasswd: Option<&str>,
    bearer_tokens: Option<&str>,
) -> Result<Option<Login>, (&'static str, String)> {
    if htpasswd.is_none() && bearer_tokens.is_none() {
        return Ok(None);
    }
    let users = match htpasswd {
        Some(source) => users(&read("htpasswd", source)?).map_err(|m| ("htpasswd", m))?,
        None => Vec::new(),
    };
    let tokens = match bearer_tokens {
        Some(source) => {
            tokens(&read("bearer_tokens", source)?).map_err(|m| ("bearer_tokens", m))?
        }
        None => Vec::new(),
    };
    Ok(Some(Login { users, tokens }))
}

fn read(key: &'static str, source: &str) -> Result<String, (&'static str, String)> {
    let path = resolve(source).map_err(|m| (key, m))?;
    let bytes = std::fs::read(&path).map_err(|e| {
        (
            key,
            format!("{}: {}", path.display(), crate::fdio::reason(&e)),
        )
    })?;
    String::from_utf8(bytes).map_err(|_| (key, format!("{}: not UTF-8 text", path.display())))
}

/// The lines that are not blank or comments, with their numbers.
fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// `name:hash` lines, as Apache's `htpasswd` writes them.
fn users(text: &str) -> Result<Vec<User>, String> {
    let mut users: Vec<User> = Vec::new();
    for (n, line) in lines(text) {
        let Some((name, hash)) = line.split_once(':') else {
            return Err(format!("line {n}: not \"user:hash\""));
        };
        let at = |m: String| format!("line {n} (user {name:?}): {m}");
        if name.is_empty() || name.chars().any(char::is_control) {
            return Err(format!(
                "line {n}: an empty user name, or one with control characters"
            ));
        }
        if users.iter().any(|u| u.name == name) {
            return Err(at("the user comes twice".into()));
        }
        let hash = kind(hash).map_err(at)?;
        users.push(User {
            name: name.to_owned(),
            hash,
        });
    }
    if users.is_empty() {
        return Err("no users in it".into());
    }
    Ok(users)
}

/// What kind of hash `hash` is, if one that is taken.
fn kind(hash: &str) -> Result<Hash, String> {
    const REHASH: &str = "re-hash the password with `htpasswd -B` (bcrypt)";
    let refused = |what: &str| Err(format!("{what}, which is refused: {REHASH}"));
    match hash {
        h if ["$2a$", "$2b$", "$2y$"].iter().any(|p| h.starts_with(p)) => {
            if h.len() == 60 {
                Ok(Hash::Bcrypt(h.to_owned()))
            } else {
                Err(format!("a bcrypt hash is 60 characters, not {}", h.len()))
            }
        }
        h if h.starts_with("$6$") || h.starts_with("$5$") => Ok(Hash::ShaCrypt(h.to_owned())),
        h if h.starts_with("$apr1$") || h.starts_with("$1$") => refused("an MD5 hash"),
        h if h.starts_with("{SHA}") => refused("a SHA-1 hash"),
        h if h.len() == 13
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/') =>
        {
            refused("a DES crypt(3) hash")
        }
        _ => refused("plain text or an unknown kind of hash"),
    }
}

/// One token a line: printable ASCII without spaces (it travels in a
/// header), at least [`MIN_TOKEN`] characters.
fn tokens(text: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut tokens = Vec::new();
    for (n, token) in lines(text) {
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "line {n}: a token is printable ASCII without spaces"
            ));
        }
        if token.len() < MIN_TOKEN {
            return Err(format!(
                "line {n}: a token of {} characters, which could be guessed (at least {MIN_TOKEN})",
                token.len()
            ));
        }
        tokens.push(token.as_bytes().to_vec());
    }
    if tokens.is_empty() {
        return Err("no tokens in it".into());
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BCRYPT: &str = "$2y$05$jakxTUd2aSNqy9rCIWBsMeXC/ifyNkoj0bPmZtRRHe.IbjWQQo.kW";

    #[test]
    fn strong_hashes_are_taken_and_weak_ones_refused_with_their_line() {
        let text = format!("# users\n\nalice:{BCRYPT}\nbob:$6$salt$abc\n");
        let users = users(&text).unwrap();
        assert_eq!(users.len(), 2);
        assert!(matches!(users[0].hash, Hash::Bcrypt(_)));
        assert!(matches!(users[1].hash, Hash::ShaCrypt(_)));
        for (line, why) in [
            ("carol:$apr1$abc$def", "MD5"),
            ("carol:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "SHA-1"),
            ("carol:rl0uE7pJ3H8Ts", "DES"),
            ("carol:hunter2", "plain text"),
            ("carol:$2y$05$short", "60 characters"),
            ("carol", "not \"user:hash\""),
        ] {
            let err = super::users(&format!("alice:{BCRYPT}\n{line}\n")).unwrap_err();
            assert!(err.contains("line 2") && err.contains(why), "{line}: {err}");
        }
        let twice = super::users(&format!("alice:{BCRYPT}\nalice:{BCRYPT}\n")).unwrap_err();
        assert!(twice.contains("twice"), "{twice}");
        assert!(super::users("# none\n").unwrap_err().contains("no users"));
    }

    #[test]
    fn tokens_are_long_printable_words() {
        assert_eq!(
            tokens("# t\n0123456789abcdef\n").unwrap(),
            [b"0123456789abcdef".to_vec()]
        );
        assert!(tokens("short\n").unwrap_err().contains("could be guessed"));
        assert!(tokens("0123456789 abcdef\n")
            .unwrap_err()
            .contains("without spaces"));
        assert!(tokens("\n").unwrap_err().contains("no tokens"));
    }
}
