//! Start-up discovery: the daemon's own cgroup from /proc/self/cgroup and
//! mountinfo, or the one the config names, and whether it is delegated.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A cgroup v2 subtree the daemon may use, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    Delegated {
        /// The subtree's root directory, e.g.
        /// `/sys/fs/cgroup/system.slice/splice-relay.service`.
        root: PathBuf,
        /// Who delegated it, for the start-up line.
        by: String,
        /// The controllers it has (its `cgroup.controllers`).
        controllers: Vec<String>,
    },
    None(String),
}

impl Offer {
    /// Finds the subtree: `explicit` (the config's `delegated_cgroup`), or
    /// the daemon's own cgroup if it is marked delegated. Reads only.
    pub fn probe(explicit: Option<&Path>) -> Offer {
        match explicit {
            Some(dir) => Self::explicit(dir),
            None => Self::own(),
        }
    }

    fn explicit(dir: &Path) -> Offer {
        let is_v2 = nix::sys::statfs::statfs(dir)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC);
        if !is_v2 {
            return Offer::None(format!(
                "delegated_cgroup {}: not a cgroup v2 directory",
                dir.display()
            ));
        }
        Offer::Delegated {
            root: dir.to_owned(),
            by: "named by delegated_cgroup".into(),
            controllers: controllers(dir),
        }
    }

    fn own() -> Offer {
        let (mount, path) = match own_cgroup() {
            Ok(found) => found,
            Err(why) => return Offer::None(why),
        };
        let dir = join(&mount, &path);
        // Once the daemon is in its leaf (and `--check`, run by ExecReload=,
        // in `.control`), the subtree is the parent.
        let candidates = match dir.file_name().map(|n| n.as_bytes()) {
            Some(b"daemon" | b".control") => vec![dir.parent().unwrap_or(&dir).to_owned(), dir],
            _ => vec![dir],
        };
        for candidate in &candidates {
            if let Some(by) = delegated_by(candidate) {
                return Offer::Delegated {
                    root: candidate.clone(),
                    by,
                    controllers: controllers(candidate),
                };
            }
        }
        Offer::None(format!(
            "the daemon's cgroup {} is not delegated to it (no user.delegate or trusted.delegate \
             attribute: set Delegate=yes in the unit, or name one with delegated_cgroup)",
            candidates[candidates.len() - 1].display()
        ))
    }

    /// Whether `controller` can be enabled for connections' cgroups.
    pub fn has(&self, controller: &str) -> bool {
        matches!(self, Offer::Delegated { controllers, .. } if controllers.iter().any(|c| c == controller))
    }
}

/// The cgroup v2 mount point and this process's path in it.
fn own_cgroup() -> Result<(PathBuf, String), String> {
    let text = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let Some(path) = text.lines().find_map(|l| l.strip_prefix("0::")) else {
        return Err("no cgroup v2 hierarchy (a cgroup v1 host)".into());
    };
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    // Fields: id parent major:minor root mount-point options … - fstype …
    let mount = mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let fstype = right.split(' ').next()?;
        let mut fields = left.split(' ');
        let root = fields.nth(3)?;
        let point = fields.next()?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape(point)))
    });
    match mount {
        Some(m) => Ok((m, path.to_owned())),
        None => Err("the cgroup v2 hierarchy is not mounted".into()),
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        match u8::from_str_radix(rest.get(i + 1..i + 4).unwrap_or(""), 8) {
            Ok(b) => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            Err(_) => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn join(mount: &Path, path: &str) -> PathBuf {
    mount.join(path.trim_start_matches('/'))
}

/// Who marked `dir` delegated: systemd sets `trusted.delegate` (readable only
/// with CAP_SYS_ADMIN) and, since 251, `user.delegate` (readable by the
/// unit's own user too).
fn delegated_by(dir: &Path) -> Option<String> {
    ["user.delegate", "trusted.delegate"]
        .into_iter()
        .find(|name| crate::sys::getxattr(dir, name).is_some_and(|v| v.trim_ascii() == b"1"))
        .map(|name| format!("delegated by the service manager ({name})"))
}

fn controllers(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/x\"), r"/x\");
    }

    #[test]
    fn a_directory_that_is_not_cgroup2_is_not_offered() {
        let dir = tempfile::tempdir().unwrap();
        match Offer::probe(Some(dir.path())) {
            Offer::None(why) => assert!(why.ends_with("not a cgroup v2 directory"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
