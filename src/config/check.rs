//! From what serde read to the configuration the daemon runs on: defaults
//! applied, and the rules that relate keys to each other or to the system
//! (the program exists and is executable, the directory exists, names are
//! unique, the user exists and the daemon may switch to it).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::keywords::{
    ClientAuth as RawClientAuth, Containment as RawContainment, Protocol as RawProtocol,
};
use super::locate::Locator;
use super::protocol::protocol;
use super::raw::{RawConfig, RawService};
use super::sites;
use super::values::SharedKey;
use super::{
    defaults, login, tls, ClientAuth, Config, ConfigError, Containment, Messages, Protocol,
    Service, SharedCommand, StdinMode, Tls, Transfer,
};
use crate::access::Rules;
use crate::cgroup::{Offer, Resources};
use crate::runas::{self, Rlimit, RunAs};

pub fn config(raw: RawConfig, loc: &Locator<'_>) -> Result<Config, ConfigError> {
    if raw.service.is_empty() {
        return Err(ConfigError {
            position: loc.origin.to_owned(),
            key: None,
            message: "no [[service]] is defined; at least one is needed".into(),
        });
    }
    let cgroups = Offer::probe(raw.delegated_cgroup.as_ref().map(|p| p.0.as_path()));
    let mut names = HashSet::new();
    let mut built = Vec::with_capacity(raw.service.len());
    for (i, s) in raw.service.into_iter().enumerate() {
        let watches = match &s.shared {
            Some(SharedKey::Of(name)) => Some(name.clone()),
            _ => None,
        };
        let service = service(s, &cgroups, &|key, message| {
            loc.error(Some(i), key, message)
        })?;
        if !names.insert(service.name.clone()) {
            return Err(loc.error(
                Some(i),
                "name",
                "duplicate name: another service above has the same one",
            ));
        }
        let (line, col) = loc
            .span_of(Some(i), "name")
            .map_or((0, 0), |r| loc.line_col(r.start));
        let position = format!("{}:{line}:{col}: service {:?}", loc.origin, service.name);
        built.push((
            Service {
                position,
                ..service
            },
            watches,
        ));
    }
    let services = watchers(built, &|i, message| loc.error(Some(i), "shared", message))?;
    sites::check(&services).map_err(|(i, key, message)| loc.error(Some(i), key, message))?;
    Ok(Config {
        origin: loc.origin.to_owned(),
        log_level: raw
            .log_level
            .map_or_else(|| defaults::LOG_LEVEL.to_owned(), |l| l.0),
        max_connections: raw
            .max_connections
            .map_or(defaults::MAX_CONNECTIONS, |m| m.0),
        shutdown_timeout: raw
            .shutdown_timeout
            .map_or(defaults::SHUTDOWN_TIMEOUT, |s| s.0),
        cgroups,
        services,
    })
}

/// Links each service with `shared = "NAME"` to NAME's shared command, and
/// makes the services what the daemon runs on, in the file's order.
fn watchers(
    built: Vec<(Service, Option<String>)>,
    err: &dyn Fn(usize, String) -> ConfigError,
) -> Result<Vec<Arc<Service>>, ConfigError> {
    // A service whose command is its own (or none's), or one that watches
    // the shared command of the service it names.
    type Slot = Result<Arc<Service>, (Box<Service>, String)>;
    let slots: Vec<Slot> = built
        .into_iter()
        .map(|(service, watches)| match watches {
            None => Ok(Arc::new(service)),
            Some(name) => Err((Box::new(service), name)),
        })
        .collect();
    let owners: Vec<Arc<Service>> = slots
        .iter()
        .filter_map(|s| s.as_ref().ok().cloned())
        .collect();
    let mut services = Vec::with_capacity(slots.len());
    for (i, slot) in slots.into_iter().enumerate() {
        let (service, name) = match slot {
            Ok(service) => {
                services.push(service);
                continue;
            }
            Err(watcher) => watcher,
        };
        let owner = owners.iter().find(|o| o.name == name).ok_or_else(|| {
            err(
                i,
                format!("{name:?}: no service of that name has shared = true"),
            )
        })?;
        if owner.shared.is_none() {
            return Err(err(
                i,
                format!("{name:?}: that service does not have shared = true"),
            ));
        }
        services.push(Arc::new(Service {
            program: owner.program.clone(),
            argv: owner.argv.clone(),
            shared_from: Some(Arc::clone(owner)),
            ..*service
        }));
    }
    Ok(services)
}

/// An error about one key of the service being checked.
type KeyError<'a> = &'a dyn Fn(&str, String) -> ConfigError;

fn service(s: RawService, cgroups: &Offer, err: KeyError<'_>) -> Result<Service, ConfigError> {
    let (program, argv) = command(&s).map_err(|(key, m)| err(key, m))?;
    let containment = containment(&s, cgroups).map_err(|(key, m)| err(key, m))?;
    let transfer = transfer(&s);
    let protocol = protocol(&s, transfer).map_err(|(key, m)| err(key, m))?;
    let tls = encryption(&s).map_err(|(key, m)| err(key, m))?;
    let login = login::load(
        s.htpasswd.as_ref().map(|p| p.0.as_str()),
        s.bearer_tokens.as_ref().map(|p| p.0.as_str()),
    )
    .map_err(|(key, m)| err(key, m))?
    .map(Arc::new);
    let handshake_timeout =
        handshake_timeout(&s, &protocol, tls.is_some()).map_err(|m| err("handshake_timeout", m))?;
    let working_directory = s.working_directory.as_ref().map_or_else(
        || PathBuf::from(defaults::WORKING_DIRECTORY),
        |p| p.0.clone(),
    );
    is_directory(&working_directory).map_err(|m| err("working_directory", m))?;
    let shared = shared(&s).map_err(|(key, m)| err(key, m))?;
    // A WebSocket client's messages are the command's input, as with
    // websocketd, and an HTTP request's body; a shared command has no one
    // client to read.
    let stdin = match (s.stdin, &protocol) {
        (None, Protocol::WebSocket(_) | Protocol::Http(_)) if !is_shared(&s) => StdinMode::Client,
        (given, _) => stdin(given, transfer).map_err(|m| err("stdin", m))?,
    };
    let max_bytes = max_bytes(&s, transfer).map_err(|m| err("max_bytes", m))?;
    let banner = s.banner.as_ref().and_then(|m| m.0.as_deref());
    banner_fits(banner, max_bytes).map_err(|m| err("banner", m))?;
    let proxy_protocol = proxy_protocol(&s).map_err(|m| err("proxy_from", m))?;
    let run_as = run_as(&s).map_err(|e| err(e.key, e.message))?;
    let access = access(&s);

    Ok(Service {
        position: String::new(),
        socket_name: s.socket_name.map_or_else(|| s.name.0.clone(), |n| n.0),
        name: s.name.0,
        listen: s.listen.0,
        program,
        argv,
        shared_from: None,
        env: s.env.0,
        working_directory,
        stdin,
        transfer,
        max_connections: s
            .max_connections
            .map_or(defaults::SERVICE_MAX_CONNECTIONS, |m| m.0),
        kill_grace: s.kill_grace.map_or(defaults::KILL_GRACE, |d| d.0),
        pipe_size: s.pipe_size.map_or(defaults::PIPE_SIZE, |p| p.0),
        access,
        proxy_protocol,
        proxy_from: s.proxy_from.map(|r| r.0).unwrap_or_default(),
        forwarded_from: s.forwarded_from.map(|r| r.0).unwrap_or_default(),
        login,
        timeout: s.timeout.map(|t| t.0),
        idle_timeout: s.idle_timeout.map(|t| t.0),
        max_bytes,
        banner: s.banner.and_then(|m| m.0),
        busy_message: s.busy_message.and_then(|m| m.0),
        run_as,
        containment,
        protocol,
        tls,
        handshake_timeout,
        shared,
    })
}

/// The transfer as given; else binary WebSocket messages are spliced from a
/// pipe, each behind its header, and everything else takes the default.
fn transfer(s: &RawService) -> Transfer {
    s.transfer.unwrap_or(match (s.protocol, s.messages) {
        _ if is_shared(s) => defaults::SHARED_TRANSFER,
        (Some(RawProtocol::WebSocket), Some(Messages::Binary)) => Transfer::Splice,
        _ => defaults::TRANSFER,
    })
}

/// The handshake timeout applies to a TLS handshake, a WebSocket upgrade
/// or an HTTP request.
fn handshake_timeout(s: &RawService, protocol: &Protocol, tls: bool) -> Result<Duration, String> {
    match (&s.handshake_timeout, protocol, tls) {
        (Some(_), Protocol::Raw, false) => {
            Err(r#"applies only with protocol = "websocket" or "http", or tls_certificate"#.into())
        }
        (t, _, _) => Ok(t.as_ref().map_or(defaults::HANDSHAKE_TIMEOUT, |t| t.0)),
    }
}

/// Whether the service's clients watch a shared command (its own, or
/// another service's).
fn is_shared(s: &RawService) -> bool {
    matches!(s.shared, Some(SharedKey::Own(true) | SharedKey::Of(_)))
}

/// The program and its arguments: the service's own, or, with `shared =
/// "NAME"`, none (NAME's command is the one its clients watch).
fn command(s: &RawService) -> Result<(PathBuf, Vec<String>), (&'static str, String)> {
    let watches = matches!(s.shared, Some(SharedKey::Of(_)));
    match (&s.command, watches) {
        (Some(command), false) => {
            let program = resolve_program(&command.0[0]).map_err(|m| ("command", m))?;
            Ok((program, command.0.clone()))
        }
        (None, true) => Ok((PathBuf::new(), Vec::new())),
        (Some(_), true) => Err((
            "command",
            r#"a service with shared = "NAME" has no command of its own: its clients watch NAME's"#
                .into(),
        )),
        (None, false) => Err((
            "command",
            r#"missing: every service needs one, except one with shared = "NAME", whose clients watch NAME's"#.into(),
        )),
    }
}

/// The largest `replay`: what a shared command keeps of its latest output.
const MAX_REPLAY: u64 = 256 << 20;

/// `shared = true` and the keys that go with it. A shared command's one
/// stdin is /dev/null, and its output passes through the daemon.
fn shared(s: &RawService) -> Result<Option<SharedCommand>, (&'static str, String)> {
    let watches = matches!(s.shared, Some(SharedKey::Of(_)));
    if !matches!(s.shared, Some(SharedKey::Own(true))) {
        let message = if watches {
            "set it on the service whose command is shared"
        } else {
            "applies only with shared = true"
        };
        let given = [
            ("start", s.start.is_some()),
            ("linger", s.linger.is_some()),
            ("max_lag", s.max_lag.is_some()),
            ("replay", s.replay.is_some()),
            ("lagging", s.lagging.is_some()),
        ];
        if let Some((key, _)) = given.into_iter().find(|(_, given)| *given) {
            return Err((key, message.into()));
        }
        if !watches {
            return Ok(None);
        }
    }
    if s.stdin == Some(StdinMode::Client) {
        return Err((
            "stdin",
            r#""client" does not apply to a shared command: the one command of all the clients reads /dev/null"#.into(),
        ));
    }
    if s.transfer == Some(Transfer::Direct) {
        return Err((
            "transfer",
            r#""direct" does not apply to a shared command: its output is fanned out by the daemon"#.into(),
        ));
    }
    if s.cgi_headers == Some(true) {
        return Err((
            "cgi_headers",
            "does not apply to a shared command: its clients join after its first bytes".into(),
        ));
    }
    if watches {
        return Ok(None);
    }
    let max_lag = s.max_lag.as_ref().map_or(defaults::MAX_LAG, |m| m.0);
    if max_lag < 4096 {
        return Err((
            "max_lag",
            format!("{max_lag}: must be at least 4096 (a page)"),
        ));
    }
    let replay = s.replay.unwrap_or(defaults::REPLAY);
    if replay > MAX_REPLAY {
        return Err((
            "replay",
            format!("{replay}: must be at most {MAX_REPLAY} (256 MiB)"),
        ));
    }
    Ok(Some(SharedCommand {
        start: s.start.unwrap_or(defaults::START),
        linger: s.linger.as_ref().map_or(Some(defaults::LINGER), |l| l.0),
        max_lag,
        replay,
        lagging: s.lagging.unwrap_or(defaults::LAGGING),
    }))
}

/// With `transfer = "direct"` the output does not pass through the daemon,
/// so it cannot count it.
fn max_bytes(s: &RawService, transfer: Transfer) -> Result<Option<u64>, String> {
    let max_bytes = s.max_bytes.as_ref().map(|m| m.0);
    if max_bytes.is_some() && transfer == Transfer::Direct {
        return Err(
            r#"does not apply with transfer = "direct": the output does not pass through the daemon"#.into(),
        );
    }
    Ok(max_bytes)
}

/// `proxy_from` names the peers that may send the PROXY header, so it
/// needs the header on.
fn proxy_protocol(s: &RawService) -> Result<bool, String> {
    let proxy_protocol = s.proxy_protocol.unwrap_or(defaults::PROXY_PROTOCOL);
    if s.proxy_from.is_some() && !proxy_protocol {
        return Err("applies only with proxy_protocol = true".into());
    }
    Ok(proxy_protocol)
}

/// Who may connect, and how many and how often. Without `max_per_source`,
/// one address may hold half the service's places (see
/// [`defaults::max_per_source`]); loopback clients are not counted then.
fn access(s: &RawService) -> Rules {
    let max_connections = s
        .max_connections
        .as_ref()
        .map_or(defaults::SERVICE_MAX_CONNECTIONS, |m| m.0);
    let (max_per_source, loopback_counted) = match &s.max_per_source {
        Some(m) => (Some(m.0), true),
        None => (Some(defaults::max_per_source(max_connections)), false),
    };
    Rules {
        allow: s.allow.as_ref().map(|r| r.0.clone()).unwrap_or_default(),
        deny: s.deny.as_ref().map(|r| r.0.clone()).unwrap_or_default(),
        max_per_source,
        loopback_counted,
        source_prefix_v6: s
            .ipv6_source_prefix
            .as_ref()
            .map_or(defaults::IPV6_SOURCE_PREFIX, |p| p.0),
        rate: s.rate.as_ref().map(|r| r.0),
        rate_per_source: s.rate_per_source.as_ref().map(|r| r.0),
    }
}

/// The user, group, resource limits and nice value the command runs with.
fn run_as(s: &RawService) -> Result<RunAs, runas::KeyError> {
    let rlimits: Vec<(Rlimit, u64)> = [s.rlimit_as, s.rlimit_nofile, s.rlimit_nproc, s.rlimit_cpu]
        .into_iter()
        .zip(Rlimit::ALL)
        .filter_map(|(v, (limit, _))| v.map(|v| (limit, v)))
        .collect();
    runas::resolve(
        s.user.as_deref(),
        s.group.as_deref(),
        &rlimits,
        s.nice.as_ref().map(|n| n.0),
    )
}

/// TLS, where the service has a certificate: the other TLS keys need one.
fn encryption(s: &RawService) -> Result<Option<Arc<Tls>>, (&'static str, String)> {
    let Some(certificate) = &s.tls_certificate else {
        let given = [
            ("tls_key", s.tls_key.is_some()),
            ("tls_client_ca", s.tls_client_ca.is_some()),
            ("tls_client_auth", s.tls_client_auth.is_some()),
        ];
        return match given.iter().find(|(_, g)| *g) {
            Some((key, _)) => Err((key, "applies only with tls_certificate".into())),
            None => Ok(None),
        };
    };
    let Some(key) = &s.tls_key else {
        return Err((
            "tls_certificate",
            "needs tls_key, the certificate's private key".into(),
        ));
    };
    // A CA for client certificates means they are asked for, unless said otherwise.
    let client_auth = match (s.tls_client_auth, s.tls_client_ca.is_some()) {
        (Some(RawClientAuth::None), _) | (None, false) => ClientAuth::None,
        (Some(RawClientAuth::Optional), _) => ClientAuth::Optional,
        (Some(RawClientAuth::Required), _) | (None, true) => ClientAuth::Required,
    };
    let sources = tls::Sources {
        certificate: &certificate.0,
        key: &key.0,
        client_ca: s.tls_client_ca.as_ref().map(|c| c.0.as_str()),
        client_auth,
    };
    tls::load(&sources).map(|t| Some(Arc::new(t)))
}

/// A process group or a cgroup: what the service asks for, what its limits
/// need, and what the daemon was given. A limit is never silently not
/// applied: one that cannot be enforced is an error.
fn containment(s: &RawService, cgroups: &Offer) -> Result<Containment, (&'static str, String)> {
    let limits = Resources {
        memory_max: s.memory_max.as_ref().and_then(|b| b.0),
        memory_high: s.memory_high.as_ref().and_then(|b| b.0),
        cpu_quota: s.cpu_quota.as_ref().map(|q| q.0),
        cpu_weight: s.cpu_weight.as_ref().map(|w| w.0),
        tasks_max: s.tasks_max.as_ref().and_then(|t| t.0),
        io_weight: s.io_weight.as_ref().map(|w| w.0),
    };
    let set = limits_set(&limits);
    let wanted = s.containment.unwrap_or(defaults::CONTAINMENT);
    let (root, controllers) = match (wanted, cgroups) {
        (RawContainment::ProcessGroup, _) => {
            return match set.first() {
                Some((key, _)) => Err((
                    key,
                    r#"does not apply with containment = "process-group": limits are set on a connection's cgroup"#.into(),
                )),
                None => Ok(Containment::ProcessGroup),
            };
        }
        (RawContainment::Auto, Offer::None(_)) if set.is_empty() => {
            return Ok(Containment::ProcessGroup)
        }
        (RawContainment::Cgroup, Offer::None(why)) => {
            return Err((
                "containment",
                format!(r#""cgroup" needs a delegated cgroup v2 subtree, and the daemon has none: {why}"#),
            ))
        }
        (RawContainment::Auto, Offer::None(why)) => {
            return Err((
                set[0].0,
                format!("needs a cgroup per connection, and the daemon has no delegated cgroup v2 subtree: {why}"),
            ))
        }
        (_, Offer::Delegated { root, controllers, .. }) => (root, controllers),
    };
    for (key, controller) in set {
        if !controllers.iter().any(|c| c == controller) {
            return Err((
                key,
                format!(
                    "needs the {controller} controller, which {} does not offer (cgroup.controllers: {:?}); see \"containment\" in splice-relay.toml(5)",
                    root.display(),
                    controllers.join(" ")
                ),
            ));
        }
    }
    Ok(Containment::Cgroup(limits))
}

/// The limits set, each as its key and the controller that enforces it.
fn limits_set(limits: &Resources) -> Vec<(&'static str, &'static str)> {
    [
        ("memory_max", "memory", limits.memory_max.is_some()),
        ("memory_high", "memory", limits.memory_high.is_some()),
        ("cpu_quota", "cpu", limits.cpu_quota.is_some()),
        ("cpu_weight", "cpu", limits.cpu_weight.is_some()),
        ("tasks_max", "pids", limits.tasks_max.is_some()),
        ("io_weight", "io", limits.io_weight.is_some()),
    ]
    .into_iter()
    .filter(|(_, _, given)| *given)
    .map(|(key, controller, _)| (key, controller))
    .collect()
}

/// With `transfer = "direct"` the client's socket is the command's stdin.
fn stdin(given: Option<StdinMode>, transfer: Transfer) -> Result<StdinMode, String> {
    match (transfer, given) {
        (Transfer::Direct, Some(StdinMode::Null)) => Err(
            r#""null" does not apply with transfer = "direct": the client's socket is the command's stdin"#.into(),
        ),
        (Transfer::Direct, _) => Ok(StdinMode::Client),
        (_, given) => Ok(given.unwrap_or(defaults::STDIN)),
    }
}

/// A banner must leave room for output under `max_bytes`.
fn banner_fits(banner: Option<&[u8]>, max_bytes: Option<u64>) -> Result<(), String> {
    match (banner, max_bytes) {
        (Some(b), Some(max)) if b.len() as u64 >= max => Err(format!(
            "{} bytes: must be shorter than max_bytes ({max})",
            b.len()
        )),
        _ => Ok(()),
    }
}

fn is_directory(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{}: not a directory", path.display())),
        Err(e) => Err(format!("{}: {}", path.display(), crate::fdio::reason(&e))),
    }
}

/// Resolves a command's program the way execvp would, but once, at load time:
/// a name without `/` is looked up in `PATH`; the result must be an executable file.
fn resolve_program(program: &str) -> Result<PathBuf, String> {
    if program.contains('/') {
        let path = PathBuf::from(program);
        if !path.is_absolute() {
            return Err(format!(
                "{program}: must be an absolute path or a name to look up in PATH"
            ));
        }
        return is_executable(&path).map(|()| path);
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&search) {
        let candidate = dir.join(program);
        if is_executable(&candidate).is_ok() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "{program}: not found in PATH ({})",
        search.to_string_lossy()
    ))
}

fn is_executable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("{}: {}", path.display(), crate::fdio::reason(&e)))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    // access(2) alone is not enough: for root it passes X_OK on any file on
    // some systems; a file with no execute bit at all is never runnable.
    use std::os::unix::fs::PermissionsExt;
    if meta.permissions().mode() & 0o111 == 0
        || nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_err()
    {
        return Err(format!("{}: not executable", path.display()));
    }
    Ok(())
}
