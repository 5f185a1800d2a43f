//! From what serde read to the configuration the daemon runs on: defaults
//! applied, and the rules that relate keys to each other or to the system
//! (the program exists and is executable, the directory exists, names are
//! unique, the user exists and the daemon may switch to it).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::locate::Locator;
use super::raw::{RawConfig, RawService};
use super::{defaults, Config, ConfigError, Service, StdinMode, Transfer};
use crate::access::Rules;
use crate::runas::{self, Limit};

pub fn config(raw: RawConfig, loc: &Locator<'_>) -> Result<Config, ConfigError> {
    if raw.service.is_empty() {
        return Err(ConfigError {
            position: loc.origin.to_owned(),
            key: None,
            message: "no [[service]] is defined; at least one is needed".into(),
        });
    }
    let mut names = HashSet::new();
    let mut services = Vec::with_capacity(raw.service.len());
    for (i, s) in raw.service.into_iter().enumerate() {
        let service = service(s, &|key, message| loc.error(Some(i), key, message))?;
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
        services.push(Arc::new(Service {
            position,
            ..service
        }));
    }
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
        services,
    })
}

/// An error about one key of the service being checked.
type KeyError<'a> = &'a dyn Fn(&str, String) -> ConfigError;

fn service(s: RawService, err: KeyError<'_>) -> Result<Service, ConfigError> {
    let program = resolve_program(&s.command.0[0]).map_err(|m| err("command", m))?;
    let working_directory = s
        .working_directory
        .map_or_else(|| PathBuf::from(defaults::WORKING_DIRECTORY), |p| p.0);
    is_directory(&working_directory).map_err(|m| err("working_directory", m))?;
    let transfer = s.transfer.unwrap_or(defaults::TRANSFER);
    let stdin = stdin(s.stdin, transfer).map_err(|m| err("stdin", m))?;
    let max_bytes = s.max_bytes.map(|m| m.0);
    if max_bytes.is_some() && transfer == Transfer::Direct {
        return Err(err(
            "max_bytes",
            r#"does not apply with transfer = "direct": the output does not pass through the daemon"#.into(),
        ));
    }
    let banner = s.banner.and_then(|m| m.0);
    banner_fits(banner.as_deref(), max_bytes).map_err(|m| err("banner", m))?;
    let proxy_protocol = s.proxy_protocol.unwrap_or(defaults::PROXY_PROTOCOL);
    if s.proxy_from.is_some() && !proxy_protocol {
        return Err(err(
            "proxy_from",
            "applies only with proxy_protocol = true".into(),
        ));
    }
    let rlimits: Vec<(Limit, u64)> = [s.rlimit_as, s.rlimit_nofile, s.rlimit_nproc, s.rlimit_cpu]
        .into_iter()
        .zip(Limit::ALL)
        .filter_map(|(v, (limit, _))| v.map(|v| (limit, v)))
        .collect();
    let run_as = runas::resolve(
        s.user.as_deref(),
        s.group.as_deref(),
        &rlimits,
        s.nice.map(|n| n.0),
    )
    .map_err(|e| err(e.key, e.message))?;

    Ok(Service {
        position: String::new(),
        name: s.name.0,
        listen: s.listen.0,
        program,
        argv: s.command.0,
        env: s.env.0,
        working_directory,
        stdin,
        transfer,
        max_connections: s
            .max_connections
            .map_or(defaults::SERVICE_MAX_CONNECTIONS, |m| m.0),
        kill_grace: s.kill_grace.map_or(defaults::KILL_GRACE, |d| d.0),
        pipe_size: s.pipe_size.map_or(defaults::PIPE_SIZE, |p| p.0),
        access: Rules {
            allow: s.allow.map(|r| r.0).unwrap_or_default(),
            deny: s.deny.map(|r| r.0).unwrap_or_default(),
            max_per_source: s.max_per_source.map(|m| m.0),
            source_prefix_v6: s
                .ipv6_source_prefix
                .map_or(defaults::IPV6_SOURCE_PREFIX, |p| p.0),
            rate: s.rate.map(|r| r.0),
            rate_per_source: s.rate_per_source.map(|r| r.0),
        },
        proxy_protocol,
        proxy_from: s.proxy_from.map(|r| r.0).unwrap_or_default(),
        timeout: s.timeout.map(|t| t.0),
        idle_timeout: s.idle_timeout.map(|t| t.0),
        max_bytes,
        banner,
        busy_message: s.busy_message.and_then(|m| m.0),
        run_as,
    })
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
