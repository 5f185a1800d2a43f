//! The daemon's subtree: its own leaf, the controllers enabled for
//! connections, what an earlier run left, and each connection's new cgroup.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::connection::remove_when_empty;
use super::offer::Offer;
use super::pool::{Pool, Slot, SLOT};
use super::resources::Resources;

/// The daemon's own leaf in its subtree.
pub const DAEMON_LEAF: &str = "daemon";
/// Where systemd runs a delegated unit's control processes (`ExecReload=`).
const CONTROL: &str = ".control";
/// The prefix of connections' cgroups before they were pooled (`conn-N`):
/// an earlier version's leftovers are removed too.
const CONNECTION: &str = "conn-";

/// Sets up what the configuration asks for: with a delegated subtree
/// (`offer`), the daemon moves into its leaf there and enables the
/// `controllers` the services' limits need. Returns the subtree (None:
/// process groups) and the one start-up line that says which containment
/// the daemon uses, and why.
pub fn set_up(
    offer: &Offer,
    controllers: &[&'static str],
) -> Result<(Option<Tree>, String), SetupError> {
    let (root, by) = match offer {
        Offer::None(why) => return Ok((None, format!("containment: process groups ({why})"))),
        Offer::Delegated { root, by, .. } => (root, by),
    };
    crate::sys::probe_clone3();
    let tree = Tree::set_up(root)?;
    tree.enable(controllers)?;
    let limits = match controllers.is_empty() {
        true => "no limits set".to_owned(),
        false => format!("controllers for limits: {}", controllers.join(" ")),
    };
    let line = format!(
        "containment: a cgroup per connection in {} ({by}); {limits}; commands start in their cgroup by {}",
        root.display(),
        crate::sys::cgroup_spawn_method()
    );
    Ok((Some(tree), line))
}

/// The daemon's subtree, once it lives in its leaf, and its ready cgroups.
#[derive(Debug, Clone)]
pub struct Tree {
    root: PathBuf,
    pool: Arc<Pool>,
}

/// Why the subtree could not be set up; it names the file and the errno.
#[derive(Debug)]
pub struct SetupError(pub String);

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn failed(what: &str, path: &Path, e: impl fmt::Display) -> SetupError {
    SetupError(format!("{what} {}: {e}", path.display()))
}

impl Tree {
    /// Moves the daemon into `ROOT/daemon` and removes what a previous run
    /// left (cgroups of connections it did not end, after a crash). Call
    /// before any thread but the main one exists, and before any command.
    pub fn set_up(root: &Path) -> Result<Tree, SetupError> {
        let leaf = root.join(DAEMON_LEAF);
        // A leaf an earlier run left is made anew where it can be (it is
        // empty once that run is gone): after a cgroup.kill of the subtree,
        // Linux (seen on 6.18) SIGKILLs every child a process in the old
        // leaf clones into a new cgroup, so each command would die at once.
        let _ = fs::remove_dir(&leaf);
        match fs::create_dir(&leaf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(failed("cannot create", &leaf, e)),
        }
        let procs = leaf.join("cgroup.procs");
        fs::write(&procs, std::process::id().to_string())
            .map_err(|e| failed("cannot move the daemon into", &procs, e))?;
        let tree = Tree {
            root: root.to_owned(),
            pool: Arc::default(),
        };
        tree.remove_stale();
        Ok(tree)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Enables `controllers` for the connections' cgroups (they must be in
    /// the root's `cgroup.controllers`, which the config's check proved).
    pub fn enable(&self, controllers: &[&str]) -> Result<(), SetupError> {
        let path = self.root.join("cgroup.subtree_control");
        let enabled = fs::read_to_string(&path).unwrap_or_default();
        let missing: Vec<String> = controllers
            .iter()
            .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
            .map(|c| format!("+{c}"))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        fs::write(&path, missing.join(" ")).map_err(|e| {
            failed(
                &format!("cannot write {:?} to", missing.join(" ")),
                &path,
                e,
            )
        })
    }

    /// Ends and removes the connections' cgroups a previous run left.
    fn remove_stale(&self) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let ours = [CONNECTION, SLOT]
                .iter()
                .any(|p| name.as_bytes().starts_with(p.as_bytes()));
            if !ours || name == CONTROL {
                continue;
            }
            let dir = entry.path();
            let _ = fs::write(dir.join("cgroup.kill"), "1");
            match remove_when_empty(&dir) {
                Ok(()) => {
                    tracing::warn!(cgroup = %dir.display(), "removed a connection's cgroup left by an earlier run, after ending its processes")
                }
                Err(e) => {
                    tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove a connection's cgroup left by an earlier run")
                }
            }
        }
    }

    /// A cgroup with `limits` written in, for one command: a ready one, or
    /// one made now (see `pool`).
    pub fn take(&self, limits: &Resources) -> io::Result<Slot> {
        self.pool.take(&self.root, limits)
    }

    /// After a reload: the ready cgroups are removed, and those in use are
    /// when their commands end, so that each new command's cgroup has the
    /// limits and controllers the configuration now gives.
    pub fn retire_ready(&self) {
        self.pool.retire();
    }

    /// At the stop, once every command has ended: removes the ready
    /// cgroups, and keeps none from now on.
    pub fn close(&self) {
        self.pool.close();
    }
}
