//! A login, checked once the request is read and before it is answered
//! (`htpasswd`, `bearer_tokens`): HTTP Basic against the password file, or
//! a bearer token, from `Authorization`, or, for browsers' WebSocket, which
//! cannot set headers, from the `access_token` query parameter or cookie.
//! Tokens are compared in constant time, and a password is checked against
//! a hash even for a user who does not exist, so that how long an answer
//! takes does not tell which names or tokens exist. A
//! password hash is checked on a blocking thread: bcrypt takes milliseconds
//! of CPU by design, which the event loop must not spend. As many are
//! checked at once as there are CPUs; a login that waits longer than
//! [`HASH_WAIT`] for its turn (a flood of them) is told to come back (503),
//! so that guessing cannot take every CPU or queue without end.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use data_encoding::BASE64;
use sha_crypt::{PasswordVerifier, ShaCrypt};

use super::request::Request;
use crate::config::login::{Hash, Login};

/// Who logged in, for `REMOTE_USER`, `AUTH_TYPE` and the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedIn {
    /// The user of `htpasswd`; None for a bearer token.
    pub user: Option<String>,
    /// `Basic` or `Bearer`.
    pub scheme: &'static str,
}

/// Why a login failed: none was offered, or a wrong one (why, for the log),
/// or its password could not be checked in time for the others being
/// checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failed {
    Missing,
    Wrong(String),
    Busy,
}

/// How long a password waits for its turn to be checked.
pub const HASH_WAIT: Duration = Duration::from_secs(1);

/// The password checks at once: one a CPU.
fn hashing() -> &'static tokio::sync::Semaphore {
    static HASHING: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
    HASHING.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        tokio::sync::Semaphore::new(cpus)
    })
}

/// Checks the request's login.
pub async fn check(login: &Arc<Login>, request: &Request) -> Result<LoggedIn, Failed> {
    if let Some(token) = bearer(request) {
        // Every token is compared, whichever matches.
        let known = login
            .tokens
            .iter()
            .fold(false, |found, t| found | same(t, token.as_bytes()));
        return match known && !login.tokens.is_empty() {
            true => Ok(LoggedIn {
                user: None,
                scheme: "Bearer",
            }),
            false => Err(Failed::Wrong(
                "a bearer token that is not in bearer_tokens".into(),
            )),
        };
    }
    let Some(authorization) = request.header("Authorization") else {
        return Err(Failed::Missing);
    };
    let Some((user, password)) = basic(&authorization) else {
        return Err(Failed::Wrong(
            "an Authorization header that is neither Basic nor Bearer".into(),
        ));
    };
    let found = login.users.iter().find(|u| u.name == user);
    // For a user who does not exist, another's hash is checked: the answer
    // takes as long as for one who does.
    let Some(hash) = found.or(login.users.first()).map(|u| u.hash.clone()) else {
        return Err(Failed::Wrong(
            "a password, and the service takes bearer tokens only".into(),
        ));
    };
    let Ok(Ok(turn)) = tokio::time::timeout(HASH_WAIT, hashing().acquire()).await else {
        return Err(Failed::Busy);
    };
    let verified = tokio::task::spawn_blocking(move || verify(&hash, &password))
        .await
        .unwrap_or(false);
    drop(turn);
    match (found, verified) {
        (Some(_), true) => Ok(LoggedIn {
            user: Some(user),
            scheme: "Basic",
        }),
        (Some(_), false) => Err(Failed::Wrong(format!("a wrong password for user {user:?}"))),
        (None, _) => Err(Failed::Wrong(format!(
            "user {user:?}, who is not in htpasswd"
        ))),
    }
}

/// The challenge a 401 carries: what the service takes.
pub fn challenge(login: &Login, realm: &str) -> String {
    let realm = realm.replace(['"', '\\'], "");
    match (login.users.is_empty(), login.tokens.is_empty()) {
        (false, true) => format!("Basic realm=\"{realm}\", charset=\"UTF-8\""),
        (true, _) => format!("Bearer realm=\"{realm}\""),
        (false, false) => {
            format!("Basic realm=\"{realm}\", charset=\"UTF-8\", Bearer realm=\"{realm}\"")
        }
    }
}

fn verify(hash: &Hash, password: &str) -> bool {
    match hash {
        Hash::Bcrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
        Hash::ShaCrypt(h) => ShaCrypt::default()
            .verify_password(password.as_bytes(), h.as_str())
            .is_ok(),
    }
}

/// `Basic base64(user:password)`.
fn basic(authorization: &str) -> Option<(String, String)> {
    let (scheme, credentials) = authorization.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = BASE64.decode(credentials.trim().as_bytes()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// A bearer token: `Authorization: Bearer …`, else `access_token` in the
/// query or in a cookie (RFC 6750's names).
fn bearer(request: &Request) -> Option<String> {
    if let Some(authorization) = request.header("Authorization") {
        let (scheme, token) = authorization.trim().split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned());
    }
    let in_query = request
        .query
        .split('&')
        .find_map(|pair| pair.strip_prefix("access_token="));
    let in_cookie = || {
        request.header("Cookie").and_then(|cookies| {
            cookies
                .split(';')
                .find_map(|c| c.trim().strip_prefix("access_token=").map(str::to_owned))
        })
    };
    in_query.map(str::to_owned).or_else(in_cookie)
}

/// Equal, in a time that depends on the lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::login::User;

    fn request(headers: &str, target: &str) -> Request {
        let text = format!("GET {target} HTTP/1.1\r\nHost: h\r\n{headers}\r\n");
        let mut parsed = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Request::new(&mut parsed);
        r.parse(text.as_bytes()).unwrap();
        Request::of(&r, false)
    }

    fn login() -> Arc<Login> {
        Arc::new(Login {
            users: vec![User {
                name: "alice".into(),
                // bcrypt, cost 4, of "secret".
                hash: Hash::Bcrypt(bcrypt::hash("secret", 4).unwrap()),
            }],
            tokens: vec![b"0123456789abcdef".to_vec()],
        })
    }

    fn basic_header(user_password: &str) -> String {
        format!(
            "Authorization: Basic {}\r\n",
            BASE64.encode(user_password.as_bytes())
        )
    }

    #[tokio::test]
    async fn basic_and_bearer_logins_are_checked() {
        let login = login();
        let check = |r: Request| {
            let login = Arc::clone(&login);
            async move { check(&login, &r).await }
        };
        let ok = check(request(&basic_header("alice:secret"), "/")).await;
        assert_eq!(
            ok,
            Ok(LoggedIn {
                user: Some("alice".into()),
                scheme: "Basic"
            })
        );
        let wrong = check(request(&basic_header("alice:guess"), "/")).await;
        assert!(matches!(wrong, Err(Failed::Wrong(w)) if w.contains("wrong password")));
        let nobody = check(request(&basic_header("mallory:secret"), "/")).await;
        assert!(matches!(nobody, Err(Failed::Wrong(w)) if w.contains("not in htpasswd")));
        assert_eq!(check(request("", "/")).await, Err(Failed::Missing));
        let bearer = LoggedIn {
            user: None,
            scheme: "Bearer",
        };
        let header = "Authorization: Bearer 0123456789abcdef\r\n";
        assert_eq!(check(request(header, "/")).await, Ok(bearer.clone()));
        assert_eq!(
            check(request("", "/?a=1&access_token=0123456789abcdef")).await,
            Ok(bearer.clone())
        );
        let cookie = "Cookie: theme=dark; access_token=0123456789abcdef\r\n";
        assert_eq!(check(request(cookie, "/")).await, Ok(bearer));
        let forged = check(request("", "/?access_token=0123456789abcdeX")).await;
        assert!(matches!(forged, Err(Failed::Wrong(_))));
    }

    #[test]
    fn tokens_are_the_same_only_when_every_byte_is() {
        assert!(!same(b"abc", b"abd") && same(b"abc", b"abc") && !same(b"abc", b"ab"));
    }

    #[test]
    fn the_challenge_names_what_the_service_takes() {
        let login = login();
        let both = challenge(&login, "svc\"x");
        assert_eq!(
            both,
            "Basic realm=\"svcx\", charset=\"UTF-8\", Bearer realm=\"svcx\""
        );
    }
}
