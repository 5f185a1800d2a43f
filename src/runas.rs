//! What a command runs as: another user and group, resource limits and a nice
//! value. Resolved and checked when the config is loaded (a name that does not
//! exist, or a change the daemon has no privilege for, is a config error with
//! its position); applied in the child between clone and exec by `sys`.

use std::ffi::CString;
use std::fmt;

use nix::unistd::{getegid, geteuid, getgroups, Gid, Group, Uid, User};

/// The resources a service may limit (`rlimit_as`, … in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rlimit {
    /// Address space, bytes.
    As,
    /// Open descriptors.
    Nofile,
    /// Processes of the user the command runs as (all of them, not only its own).
    Nproc,
    /// CPU time, seconds.
    Cpu,
}

impl Rlimit {
    pub const ALL: [(Rlimit, &'static str); 4] = [
        (Rlimit::As, "rlimit_as"),
        (Rlimit::Nofile, "rlimit_nofile"),
        (Rlimit::Nproc, "rlimit_nproc"),
        (Rlimit::Cpu, "rlimit_cpu"),
    ];

    pub fn resource(self) -> nix::sys::resource::Resource {
        use nix::sys::resource::Resource;
        match self {
            Rlimit::As => Resource::RLIMIT_AS,
            Rlimit::Nofile => Resource::RLIMIT_NOFILE,
            Rlimit::Nproc => Resource::RLIMIT_NPROC,
            Rlimit::Cpu => Resource::RLIMIT_CPU,
        }
    }
}

/// The identity to switch to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: Uid,
    pub gid: Gid,
    /// Supplementary groups: the user's (from the group database), or just
    /// `gid` when only `group` is set.
    pub groups: Vec<Gid>,
    /// `user "name" (uid N)` for messages.
    pub label: String,
}

/// Everything applied in the child before exec; empty for most services.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunAs {
    pub credentials: Option<Credentials>,
    /// Each sets the soft and the hard limit.
    pub rlimits: Vec<(Rlimit, u64)>,
    pub nice: Option<i32>,
}

impl RunAs {
    pub fn is_empty(&self) -> bool {
        self.credentials.is_none() && self.rlimits.is_empty() && self.nice.is_none()
    }
}

/// A problem with one key, for config.rs to locate.
#[derive(Debug)]
pub struct KeyError {
    pub key: &'static str,
    pub message: String,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

fn key_error(key: &'static str, message: impl Into<String>) -> KeyError {
    KeyError {
        key,
        message: message.into(),
    }
}

/// How much lower the launchers' priority is than the event loop's, where
/// it may be (see [`lowered_launchers`]).
pub const LAUNCHER_NICE_STEP: i32 = 10;

/// The launchers' priority, lowered below the event loop's, and what the
/// commands they start get back before their exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lowered {
    /// The launcher threads' nice value.
    pub launchers: i32,
    /// The daemon's own nice value: a command's, unless its service sets one.
    pub own: i32,
    /// The daemon's RLIMIT_NICE (soft): what lets a command get `own` back.
    rlimit_nice: u64,
}

impl Lowered {
    /// A command's nice value, and the RLIMIT_NICE it gets where the
    /// daemon's would let it raise its priority above that value (so that,
    /// as before, a command cannot go above the priority it started with).
    pub fn command(&self, service_nice: Option<i32>) -> (i32, Option<u64>) {
        let nice = service_nice.unwrap_or(self.own);
        let limit = (20 - nice).max(0) as u64;
        (nice, (limit < self.rlimit_nice).then_some(limit))
    }
}

/// Where the launchers may run below the event loop: a command they start
/// must get the daemon's own priority back before its exec, which needs
/// CAP_SYS_NICE or an RLIMIT_NICE that allows it (`LimitNICE=+0` in the
/// shipped unit). None where it cannot, or the daemon is at nice 19 already.
pub fn lowered_launchers() -> Option<Lowered> {
    let own = current_nice();
    let launchers = (own + LAUNCHER_NICE_STEP).min(19);
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NICE).ok()?;
    let lowered = Lowered {
        launchers,
        own,
        rlimit_nice: soft,
    };
    (launchers > own && (has_capability(CAP_SYS_NICE) || may_lower_to(own, soft)))
        .then_some(lowered)
}

/// RLIMIT_NICE's rule: a process may lower its nice value to 20 − the soft
/// limit, and no further.
fn may_lower_to(nice: i32, rlimit_nice: u64) -> bool {
    20 - rlimit_nice.min(40) as i32 <= nice
}

/// Capabilities checked here, by bit number in /proc/self/status's CapEff.
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SYS_NICE: u32 = 23;
const CAP_SYS_RESOURCE: u32 = 24;

/// True when this process has `cap` in its effective set.
fn has_capability(cap: u32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|bits| bits & (1 << cap) != 0)
}

/// Resolves and checks `user`, `group`, the `rlimit_*` values and `nice`.
pub fn resolve(
    user: Option<&str>,
    group: Option<&str>,
    rlimits: &[(Rlimit, u64)],
    nice: Option<i32>,
) -> Result<RunAs, KeyError> {
    let credentials = credentials(user, group)?;
    for &(limit, value) in rlimits {
        let key = Rlimit::ALL
            .iter()
            .find(|(l, _)| *l == limit)
            .map_or("rlimit", |(_, k)| k);
        if limit == Rlimit::Cpu && value == 0 {
            return Err(key_error(key, "must be at least 1 second"));
        }
        let (_, hard) = nix::sys::resource::getrlimit(limit.resource()).map_err(|e| {
            key_error(
                key,
                format!("cannot read the daemon's own limit: {}", e.desc()),
            )
        })?;
        if value > hard && !has_capability(CAP_SYS_RESOURCE) {
            return Err(key_error(
                key,
                format!(
                    "{value} is above the daemon's own hard limit ({hard}); raising it needs CAP_SYS_RESOURCE, which the daemon does not have"
                ),
            ));
        }
    }
    if let Some(n) = nice {
        // The range (-20 to 19) is the config type's rule.
        let own = current_nice();
        if n < own && !has_capability(CAP_SYS_NICE) {
            return Err(key_error(
                "nice",
                format!(
                    "{n} is below the daemon's own nice value ({own}); that needs CAP_SYS_NICE, which the daemon does not have"
                ),
            ));
        }
    }
    Ok(RunAs {
        credentials,
        rlimits: rlimits.to_vec(),
        nice,
    })
}

fn current_nice() -> i32 {
    // The 19th field of /proc/self/stat; reading it avoids getpriority's
    // ambiguous -1 return.
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            rest.split(' ').nth(16)?.parse().ok()
        })
        .unwrap_or(0)
}

/// `user` and `group`: a name or a number. None when they name the identity
/// the daemon already has (nothing to change, no privilege needed).
fn credentials(user: Option<&str>, group: Option<&str>) -> Result<Option<Credentials>, KeyError> {
    let user = user.map(|u| lookup_user(u, group.is_some())).transpose()?;
    let gid = group.map(lookup_group).transpose()?;
    let (uid, gid, groups, label) = match (user, gid) {
        (Some((entry, uid, primary)), gid) => {
            let gid = gid.unwrap_or(primary);
            let groups = match &entry {
                Some(e) => CString::new(e.name.as_str())
                    .ok()
                    .and_then(|name| nix::unistd::getgrouplist(&name, gid).ok())
                    .unwrap_or_else(|| vec![gid]),
                None => vec![gid],
            };
            let label = match &entry {
                Some(e) => format!("user {:?} (uid {uid})", e.name),
                None => format!("uid {uid}"),
            };
            (uid, gid, groups, label)
        }
        (None, Some(gid)) => (geteuid(), gid, vec![gid], format!("group {gid}")),
        (None, None) => return Ok(None),
    };
    if is_own_identity(uid, gid, &groups) {
        return Ok(None);
    }
    may_switch(uid, &label)?;
    Ok(Some(Credentials {
        uid,
        gid,
        groups,
        label,
    }))
}

/// A user by name or number: its passwd entry (None for a bare number that
/// has none), uid and primary group.
fn lookup_user(u: &str, group_given: bool) -> Result<(Option<User>, Uid, Gid), KeyError> {
    let number = u.parse::<u32>().ok();
    let found = match number {
        Some(n) => User::from_uid(Uid::from_raw(n)),
        None => User::from_name(u),
    };
    match (found, number) {
        (Ok(Some(entry)), _) => {
            let (uid, gid) = (entry.uid, entry.gid);
            Ok((Some(entry), uid, gid))
        }
        // A bare number with no passwd entry has no primary group: `group`
        // must say it, or the command would keep the daemon's.
        (Ok(None), Some(n)) if group_given => Ok((None, Uid::from_raw(n), getegid())),
        (Ok(None), Some(_)) => Err(key_error(
            "user",
            format!("{u:?}: no user has this number, so it has no primary group; set `group` too"),
        )),
        (Ok(None), None) => Err(key_error("user", format!("{u:?}: no such user"))),
        (Err(e), _) => Err(key_error(
            "user",
            format!("{u:?}: cannot look it up: {}", e.desc()),
        )),
    }
}

/// A group by name or number.
fn lookup_group(g: &str) -> Result<Gid, KeyError> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(Gid::from_raw(n));
    }
    match Group::from_name(g) {
        Ok(Some(entry)) => Ok(entry.gid),
        Ok(None) => Err(key_error("group", format!("{g:?}: no such group"))),
        Err(e) => Err(key_error(
            "group",
            format!("{g:?}: cannot look it up: {}", e.desc()),
        )),
    }
}

/// Whether the daemon already runs as this identity. Supplementary groups
/// are compared as sets, each with its primary group (the kernel's list may
/// or may not repeat it).
fn is_own_identity(uid: Uid, gid: Gid, groups: &[Gid]) -> bool {
    let set = |mut v: Vec<Gid>, primary: Gid| {
        v.push(primary);
        v.sort_unstable_by_key(|g| g.as_raw());
        v.dedup();
        v
    };
    uid == geteuid()
        && gid == getegid()
        && set(getgroups().unwrap_or_default(), getegid()) == set(groups.to_vec(), gid)
}

/// The daemon has the capabilities the switch to `uid` needs.
fn may_switch(uid: Uid, label: &str) -> Result<(), KeyError> {
    let need_uid = uid != geteuid();
    if (!need_uid || has_capability(CAP_SETUID)) && has_capability(CAP_SETGID) {
        return Ok(());
    }
    let (key, caps) = if need_uid {
        ("user", "CAP_SETUID and CAP_SETGID")
    } else {
        ("group", "CAP_SETGID")
    };
    Err(key_error(
        key,
        format!(
            "running commands as {label} needs {caps}, which the daemon (uid {}) does not have; see \"user\" in splice-relay.toml(5)",
            geteuid()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rlimit_nice_lets_a_process_lower_its_nice_to_20_minus_the_limit() {
        assert!(!may_lower_to(0, 0), "the default: never lower");
        assert!(may_lower_to(0, 20), "LimitNICE=+0");
        assert!(!may_lower_to(-5, 20));
        assert!(may_lower_to(5, 15));
        assert!(may_lower_to(-20, 40));
    }

    #[test]
    fn a_command_of_lowered_launchers_gets_its_priority_and_no_more() {
        let lowered = Lowered {
            launchers: 10,
            own: 0,
            rlimit_nice: 20,
        };
        assert_eq!(
            lowered.command(None),
            (0, None),
            "the daemon's own; the limit as it was"
        );
        assert_eq!(
            lowered.command(Some(5)),
            (5, Some(15)),
            "its service's nice, and no way back above it"
        );
        let privileged = Lowered {
            rlimit_nice: 0,
            ..lowered
        };
        assert_eq!(
            privileged.command(Some(5)),
            (5, None),
            "a lower limit is kept"
        );
    }

    #[test]
    fn own_identity_needs_no_change() {
        let me = geteuid().to_string();
        assert_eq!(credentials(Some(&me), None).unwrap(), None);
        assert!(resolve(None, None, &[], None).unwrap().is_empty());
    }

    #[test]
    fn unknown_names_are_errors() {
        let e = credentials(Some("no-such-user-here"), None).unwrap_err();
        assert_eq!(e.to_string(), r#"user: "no-such-user-here": no such user"#);
        let e = credentials(None, Some("no-such-group-here")).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"group: "no-such-group-here": no such group"#
        );
    }

    #[test]
    fn a_number_without_a_user_needs_a_group() {
        let e = credentials(Some("54321"), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"user: "54321": no user has this number, so it has no primary group; set `group` too"#
        );
    }
}
