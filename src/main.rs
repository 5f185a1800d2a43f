//! The `splice-relay` command: arguments, start-up order, exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use splice_relay::config::{self, Config, ConfigError};
use splice_relay::reload::ReloadError;
use splice_relay::server::Server;
use splice_relay::{cgroup, exit, listen, log, notify};

/// Runs a command for each connection on its sockets and splices the
/// command's output to the client.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file [default: /etc/splice-relay.toml; without it, and
    /// outside socket activation, the built-in example config]
    #[arg(short, long, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Check the configuration and exit: 0 if valid, 78 if not
    #[arg(long, conflicts_with = "reload")]
    check: bool,

    /// Ask the daemon PID to reload its configuration and wait until it has:
    /// 0 when new connections use the new file, 78 when the daemon refused it
    /// (for ExecReload=; needs RuntimeDirectory=)
    #[arg(long, value_name = "PID")]
    reload: Option<i32>,
}

fn main() -> ExitCode {
    // 0. Descriptors 0-2 open, so nothing the daemon opens takes their
    // numbers; default SIGCHLD, so commands stay zombies until reaped.
    if let Err(e) = splice_relay::prepare_process() {
        eprintln!("splice-relay: {e}");
        return ExitCode::from(exit::FAILURE);
    }
    let args = Args::parse();
    if let Some(pid) = args.reload {
        return request_reload(pid);
    }

    // 1. Sockets from systemd, before any other descriptor is opened.
    let (inherited, ignored) = if args.check {
        (Vec::new(), None)
    } else {
        listen::inherited().unwrap_or_else(|e| fail_config(&e.message))
    };
    // Whatever else the daemon inherited is not for its commands.
    splice_relay::cloexec_from_3();

    // 2. Configuration.
    let (config, path) = match load(&args, !inherited.is_empty()) {
        Ok(c) => c,
        Err(e) => fail_config(&e.to_string()),
    };
    if args.check {
        println!(
            "{}: OK, {} service(s)",
            config.origin,
            config.services.len()
        );
        return ExitCode::from(exit::OK);
    }

    // 3. Logging.
    let log_level = log::init(&config.log_level);
    if let Some(warning) = ignored {
        tracing::warn!("{warning}");
    }
    if path.is_none() {
        tracing::warn!(
            "{} not found; running on the built-in example configuration",
            config::DEFAULT_PATH
        );
    }
    raise_fd_limit();

    // 4. Containment: the daemon's own leaf in a delegated cgroup subtree,
    // before any other thread or command exists.
    let cgroups = match cgroup::set_up(&config.cgroups, &config.controllers()) {
        Ok((tree, line)) => {
            tracing::info!("{line}");
            tree
        }
        Err(e) => return fail(&format!("cannot set up the cgroup subtree: {e}")),
    };

    if config.services.iter().any(|s| s.tls.is_some()) {
        tracing::info!("{}", splice_relay::tls::kernel_line());
    }

    // The launchers reserve their descriptors while the table is small.
    splice_relay::command::start_threads();

    // 5. Listeners: adopted or bound (they join the event loop in Server::run).
    let listeners = if inherited.is_empty() {
        listen::bind_all(&config)
    } else {
        listen::adopt(inherited, &config)
    };
    let listeners = match listeners {
        Ok(l) => l,
        Err(e) if e.config => fail_config(&e.message),
        Err(e) => return fail(&e.message),
    };

    // 6. READY=1 and serve.
    let server = Server {
        config,
        config_path: path,
        listeners,
        log_level,
        cgroups,
    };
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the event loop: {e}"))
        .and_then(|runtime| runtime.block_on(server.run()));
    match outcome {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => fail(&e),
    }
}

/// `--reload PID`: the unit's ExecReload=.
fn request_reload(pid: i32) -> ExitCode {
    match splice_relay::reload::request(pid) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(ReloadError::Config(message)) => {
            eprintln!(
                "splice-relay: reload refused; the previous configuration stays in use: {message}"
            );
            ExitCode::from(exit::CONFIG)
        }
        Err(ReloadError::Failed(message)) => {
            eprintln!("splice-relay: reload: {message}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// The config file to use: `--config`, else the default path, else (outside
/// socket activation only) the built-in example.
fn load(args: &Args, activated: bool) -> Result<(Config, Option<PathBuf>), ConfigError> {
    let path = match &args.config {
        Some(p) => p.clone(),
        None => {
            let default = PathBuf::from(config::DEFAULT_PATH);
            if !default.exists() && !activated && !args.check {
                return config::load_str("<built-in>", config::EXAMPLE).map(|c| (c, None));
            }
            default
        }
    };
    config::load(&path).map(|c| (c, Some(path)))
}

/// Reports a configuration error where the operator looks (stderr, which
/// systemd puts in the journal, and the unit's status line) and exits 78.
fn fail_config(message: &str) -> ! {
    eprintln!("splice-relay: {message}");
    notify::status(&format!("configuration error: {message}"));
    std::process::exit(exit::CONFIG.into())
}

fn fail(message: &str) -> ExitCode {
    tracing::error!("{message}");
    notify::status(&format!("failed: {message}"));
    ExitCode::from(exit::FAILURE)
}

/// Each connection holds four or five descriptors; raise the soft limit to the
/// hard one, as systemd recommends for daemons that use epoll. Commands get
/// the original soft limit back (see `sys::spawn`): programs that use
/// select(2) or close every descriptor up to the limit expect a small one.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
            splice_relay::commands_get_nofile(soft);
        }
    }
}
