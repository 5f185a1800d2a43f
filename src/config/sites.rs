//! Services that share a listening socket: those that name the same `listen`
//! address, or the same systemd socket (`socket_name`, else their name). A
//! socket's services are a [`Site`]; when there are several, each request is
//! read first and goes to the service whose `paths` it is under (the longest
//! matching path wins), so only HTTP and WebSocket services share, no two
//! answer the same path, and the settings used before the request is read
//! (TLS, the PROXY header, `handshake_timeout`) agree.

use std::sync::Arc;

use super::{ListenAddr, Protocol, Service};

/// The services of one socket, in the file's order: never empty. The first
/// gives the settings used before a request is routed.
#[derive(Debug, Clone)]
pub struct Site(Vec<Arc<Service>>);

impl Site {
    /// The service whose settings apply before a request is routed.
    pub fn front(&self) -> &Arc<Service> {
        &self.0[0]
    }

    /// Whether several services share the socket, so that each request is
    /// read before its service is known.
    pub fn is_shared(&self) -> bool {
        self.0.len() > 1
    }

    pub fn services(&self) -> &[Arc<Service>] {
        &self.0
    }

    /// The service a request for `path` goes to: the one with the longest
    /// of its `paths` that `path` is at or under (a service without `paths`
    /// answers any, after every other).
    pub fn route(&self, path: &str) -> Option<&Arc<Service>> {
        self.0
            .iter()
            .filter_map(|s| Some((answered(s, path)?, s)))
            .max_by_key(|(length, _)| *length)
            .map(|(_, s)| s)
    }
}

/// How long the path is that `service` answers `path` by (0: it answers any
/// path), or None if it does not answer it.
fn answered(service: &Service, path: &str) -> Option<usize> {
    let paths = paths(service);
    if paths.is_empty() {
        return Some(0);
    }
    paths
        .iter()
        .filter(|p| under(path, p))
        .map(|p| p.len())
        .max()
}

/// Whether `path` is `prefix` or below it (`/a` answers `/a/b`, not `/ab`).
pub fn under(path: &str, prefix: &str) -> bool {
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| prefix.ends_with('/') || rest.starts_with('/'))
}

fn paths(service: &Service) -> &[String] {
    match &service.protocol {
        Protocol::Raw => &[],
        Protocol::WebSocket(ws) => &ws.paths,
        Protocol::Http(http) => &http.paths,
    }
}

/// The site of a systemd socket named `name`. With a single service, every
/// passed socket goes to it whatever its name (systemd names a socket after
/// its unit when FileDescriptorName= is unset).
pub fn of_socket(services: &[Arc<Service>], name: &str) -> Option<Site> {
    if let [only] = services {
        return Some(Site(vec![Arc::clone(only)]));
    }
    of_socket_named(services, name)
}

/// The site of the address `addr`, bound from the services' `listen`.
pub fn of_address(services: &[Arc<Service>], addr: &ListenAddr) -> Option<Site> {
    let named: Vec<_> = services
        .iter()
        .filter(|s| s.listen.contains(addr))
        .cloned()
        .collect();
    (!named.is_empty()).then_some(Site(named))
}

/// Every site with more than one service, each once.
pub fn shared(services: &[Arc<Service>]) -> Vec<Site> {
    let mut sites: Vec<Site> = Vec::new();
    let by_address = services
        .iter()
        .flat_map(|s| s.listen.iter())
        .filter_map(|a| of_address(services, a));
    let by_name = services
        .iter()
        .filter_map(|s| of_socket_named(services, &s.socket_name));
    for site in by_address.chain(by_name) {
        let same = |other: &Site| {
            other.0.len() == site.0.len()
                && other.0.iter().zip(&site.0).all(|(a, b)| a.name == b.name)
        };
        if site.is_shared() && !sites.iter().any(same) {
            sites.push(site);
        }
    }
    sites
}

/// As [`of_socket`], without the single-service rule.
fn of_socket_named(services: &[Arc<Service>], name: &str) -> Option<Site> {
    let named: Vec<_> = services
        .iter()
        .filter(|s| s.socket_name == name)
        .cloned()
        .collect();
    (!named.is_empty()).then_some(Site(named))
}

/// A service that cannot share its socket as configured: its index in the
/// file, the key to point at, and why.
pub type Conflict = (usize, &'static str, String);

/// Checks every shared socket: its services speak HTTP or WebSocket, answer
/// different paths, and agree on what is read before a request is routed.
pub fn check(services: &[Arc<Service>]) -> Result<(), Conflict> {
    let index = |s: &Service| services.iter().position(|o| o.name == s.name).unwrap_or(0);
    for site in shared(services) {
        let front = site.front();
        let what = site_name(&site);
        for (n, s) in site.0.iter().enumerate() {
            if matches!(s.protocol, Protocol::Raw) {
                let other = &site.0[if n == 0 { 1 } else { 0 }].name;
                return Err((
                    index(s),
                    "protocol",
                    format!(
                        "a raw service cannot share {what} with service {other:?}: only \
                         \"http\" and \"websocket\" services share a socket, chosen by their paths"
                    ),
                ));
            }
            for earlier in &site.0[..n] {
                if let Some(path) = same_path(earlier, s) {
                    return Err((
                        index(s),
                        "paths",
                        format!(
                            "{path} is also answered by service {:?}, which shares {what}: \
                             each path of a shared socket goes to one service",
                            earlier.name
                        ),
                    ));
                }
            }
            if let Some((key, why)) = disagreement(front, s) {
                return Err((
                    index(s),
                    key,
                    format!(
                        "differs from service {:?}'s, which shares {what}: {why}",
                        front.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// "listen 127.0.0.1:80" or "the socket named web", for errors.
fn site_name(site: &Site) -> String {
    let [a, b, ..] = &site.0[..] else {
        return String::new();
    };
    match a.listen.iter().find(|addr| b.listen.contains(addr)) {
        Some(addr) => format!("listen {addr}"),
        None => format!("the systemd socket named {:?}", a.socket_name),
    }
}

/// A path two services both answer, for errors ("any path" when neither
/// has `paths`).
fn same_path(a: &Service, b: &Service) -> Option<String> {
    let (pa, pb) = (paths(a), paths(b));
    if pa.is_empty() && pb.is_empty() {
        return Some("any path (neither has `paths`)".into());
    }
    pa.iter().find(|p| pb.contains(p)).map(|p| format!("{p:?}"))
}

/// The first setting read before a request is routed on which `b` differs
/// from the socket's first service `a`, and what it governs.
fn disagreement(a: &Service, b: &Service) -> Option<(&'static str, &'static str)> {
    let written = |s: &Service| s.tls.as_ref().map(|t| t.written.clone());
    if written(a) != written(b) {
        return Some((
            "tls_certificate",
            "the TLS handshake comes before the request names its service",
        ));
    }
    if a.proxy_protocol != b.proxy_protocol || a.proxy_from != b.proxy_from {
        return Some((
            "proxy_from",
            "the PROXY header comes before the request names its service",
        ));
    }
    if a.handshake_timeout != b.handshake_timeout {
        return Some((
            "handshake_timeout",
            "it bounds the reading of the request that names the service",
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Vec<Arc<Service>> {
        crate::config::load_str("t.toml", text).unwrap().services
    }

    fn service(name: &str, extra: &str) -> String {
        format!("[[service]]\nname = \"{name}\"\ncommand = [\"true\"]\n{extra}\n")
    }

    #[test]
    fn the_longest_path_a_request_is_under_wins_and_no_paths_takes_the_rest() {
        let text = [
            service(
                "a",
                "socket_name = \"w\"\nprotocol = \"http\"\npaths = [\"/a\"]",
            ),
            service(
                "deep",
                "socket_name = \"w\"\nprotocol = \"http\"\npaths = [\"/x\", \"/a/b/\"]",
            ),
            service("rest", "socket_name = \"w\"\nprotocol = \"websocket\""),
        ]
        .concat();
        let site = of_socket(&config(&text), "w").unwrap();
        assert!(site.is_shared());
        assert_eq!(site.front().name, "a");
        let to = |path| site.route(path).map(|s| s.name.clone());
        assert_eq!(to("/a").as_deref(), Some("a"));
        assert_eq!(
            to("/a/b").as_deref(),
            Some("a"),
            "/a/b/ answers below itself only"
        );
        assert_eq!(to("/a/b/c").as_deref(), Some("deep"));
        assert_eq!(to("/x/1").as_deref(), Some("deep"));
        assert_eq!(to("/ab").as_deref(), Some("rest"));
        assert_eq!(to("/").as_deref(), Some("rest"));
    }

    #[test]
    fn without_a_service_for_every_path_a_request_may_find_none() {
        let text = [
            service("a", "listen = \"127.0.0.1:1\"\nprotocol = \"http\"\npaths = [\"/a\"]"),
            service("b", "listen = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\nprotocol = \"http\"\npaths = [\"/b\"]"),
        ]
        .concat();
        let services = config(&text);
        let one = ListenAddr::Tcp("127.0.0.1:1".parse().unwrap());
        let two = ListenAddr::Tcp("127.0.0.1:2".parse().unwrap());
        let shared_site = of_address(&services, &one).unwrap();
        assert!(shared_site.route("/c").is_none());
        assert_eq!(shared_site.route("/b/c").unwrap().name, "b");
        // b alone on its second address: every path is its to judge.
        let alone = of_address(&services, &two).unwrap();
        assert!(!alone.is_shared());
        assert_eq!(alone.route("/b").unwrap().name, "b");
        assert_eq!(shared(&services).len(), 1, "one shared socket, listed once");
    }

    #[test]
    fn a_single_service_takes_every_passed_socket_and_several_need_their_names() {
        let one = config(&service("a", ""));
        assert_eq!(of_socket(&one, "anything").unwrap().front().name, "a");
        let two = config(&[service("a", ""), service("b", "")].concat());
        assert_eq!(of_socket(&two, "b").unwrap().front().name, "b");
        assert!(of_socket(&two, "c").is_none());
        assert!(shared(&two).is_empty());
    }
}
