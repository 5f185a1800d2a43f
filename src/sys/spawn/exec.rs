//! The command prepared in the parent: its strings and pointer arrays, the
//! resource limits (with the daemon's original RLIMIT_NOFILE), nice value and
//! ids the child sets before exec.

use std::io;

/// A command ready to start: every string, pointer array and value the child
/// needs, prepared in the parent, so that the child between clone and exec only
/// makes system calls (no allocation, no lock, no Rust runtime).
pub struct Exec {
    pub(super) program: std::ffi::CString,
    // The pointer arrays point into these; they live as long as the Exec.
    _args: Vec<std::ffi::CString>,
    _env: Vec<std::ffi::CString>,
    pub(super) argv: Vec<*const libc::c_char>,
    pub(super) envp: Vec<*const libc::c_char>,
    pub(super) cwd: std::ffi::CString,
    pub(super) rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    pub(super) nice: Option<libc::c_int>,
    pub(super) ids: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    /// The uid changes: drop every capability after the switch (from one
    /// non-root uid to another the kernel keeps them, ambient ones included).
    pub(super) drop_capabilities: bool,
}

/// The soft and hard RLIMIT_NOFILE the daemon started with, restored in every
/// command that does not set `rlimit_nofile` (0: the daemon did not raise it).
static COMMAND_NOFILE: [std::sync::atomic::AtomicU64; 2] = [
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
];

/// Records the soft RLIMIT_NOFILE the daemon had before it raised its own:
/// commands get it back. Call once, at start.
pub fn commands_get_nofile(soft: u64) {
    use std::sync::atomic::Ordering;
    let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(libc::RLIM_INFINITY, |(_, h)| h);
    COMMAND_NOFILE[0].store(soft, Ordering::Relaxed);
    COMMAND_NOFILE[1].store(hard, Ordering::Relaxed);
}

impl Exec {
    /// `args` includes argv[0]; `env` is final (later duplicates are not
    /// removed here). `lowered`: the launchers run below the event loop, and
    /// the command gets its own priority back before its exec.
    pub fn new(
        program: &std::path::Path,
        args: &[String],
        env: &[(std::ffi::OsString, std::ffi::OsString)],
        cwd: &std::path::Path,
        run_as: &crate::runas::RunAs,
        lowered: Option<&crate::runas::Lowered>,
    ) -> io::Result<Exec> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |b: &[u8]| {
            CString::new(b)
                .map_err(|_| io::Error::other("a NUL byte in the command or its environment"))
        };
        let args: Vec<CString> = args
            .iter()
            .map(|a| c(a.as_bytes()))
            .collect::<io::Result<_>>()?;
        let env: Vec<CString> = env
            .iter()
            .map(|(k, v)| {
                let mut kv = Vec::with_capacity(k.len() + v.len() + 1);
                kv.extend_from_slice(k.as_bytes());
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                c(&kv)
            })
            .collect::<io::Result<_>>()?;
        let nul_terminated = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        let mut rlimits = rlimits(run_as);
        let mut nice = run_as.nice;
        if let Some(lowered) = lowered {
            let (own, limit) = lowered.command(run_as.nice);
            nice = Some(own);
            if let Some(limit) = limit {
                let limit = limit as libc::rlim_t;
                rlimits.push((
                    libc::RLIMIT_NICE,
                    libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    },
                ));
            }
        }
        Ok(Exec {
            program: c(program.as_os_str().as_bytes())?,
            argv: nul_terminated(&args),
            envp: nul_terminated(&env),
            _args: args,
            _env: env,
            cwd: c(cwd.as_os_str().as_bytes())?,
            rlimits,
            nice,
            ids: run_as.credentials.as_ref().map(|c| {
                (
                    c.uid.as_raw(),
                    c.gid.as_raw(),
                    c.groups.iter().map(|g| g.as_raw()).collect(),
                )
            }),
            drop_capabilities: run_as
                .credentials
                .as_ref()
                .is_some_and(|c| c.uid != nix::unistd::geteuid()),
        })
    }
}

/// The limits the child sets: the service's `rlimit_*`, and the daemon's
/// original RLIMIT_NOFILE where the service sets none.
fn rlimits(run_as: &crate::runas::RunAs) -> Vec<(libc::__rlimit_resource_t, libc::rlimit)> {
    use crate::runas::Rlimit;
    let both = |soft, hard| libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    let mut rlimits: Vec<_> = run_as
        .rlimits
        .iter()
        .map(|&(limit, value)| {
            let resource = match limit {
                Rlimit::As => libc::RLIMIT_AS,
                Rlimit::Nofile => libc::RLIMIT_NOFILE,
                Rlimit::Nproc => libc::RLIMIT_NPROC,
                Rlimit::Cpu => libc::RLIMIT_CPU,
            };
            (resource, both(value, value))
        })
        .collect();
    let nofile = COMMAND_NOFILE
        .each_ref()
        .map(|a| a.load(std::sync::atomic::Ordering::Relaxed));
    if nofile[0] != 0 && !run_as.rlimits.iter().any(|(l, _)| *l == Rlimit::Nofile) {
        rlimits.push((libc::RLIMIT_NOFILE, both(nofile[0], nofile[1])));
    }
    rlimits
}
