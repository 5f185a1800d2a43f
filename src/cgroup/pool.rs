//! The daemon's ready cgroups. A command starts in one taken from here, and
//! the cgroup comes back once it is empty and its usage is read: made once
//! with its limits written, it serves command after command, so that a
//! connection's path has no mkdir, no limit writes and no rmdir.
//!
//! A cgroup comes back only where the next record can still say what its
//! own command alone used (see [`Cgroup::renew`]); one made before a reload
//! (whose controllers or limits may have changed) is removed when it comes
//! back, and at the stop every ready one is removed.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::ops::Deref;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use super::connection::{describe, Cgroup, Usage};
use super::resources::Resources;

/// The prefix of the cgroups' names (`slot-1`, `slot-2`, ...).
pub(super) const SLOT: &str = "slot-";

/// Most ready cgroups kept for one set of limits. Beyond it, cgroups are
/// made on a connection's path, as when the pool is empty, and removed once
/// their command has ended.
const READY_MAX: usize = 64;

#[derive(Debug, Default)]
pub(super) struct Pool {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Empty cgroups with their limits written, by those limits.
    ready: HashMap<Resources, Vec<Cgroup>>,
    /// Counts reloads: a cgroup made before the last one is not kept.
    generation: u64,
    /// The daemon is stopping: nothing is kept.
    closed: bool,
    /// The last slot number given.
    numbered: u64,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ready cgroup with `limits`, or a new one in `root`.
    pub(super) fn take(self: &Arc<Self>, root: &Path, limits: &Resources) -> io::Result<Slot> {
        let (ready, generation, number) = {
            let mut state = self.lock();
            let ready = state.ready.get_mut(limits).and_then(Vec::pop);
            if ready.is_none() {
                state.numbered += 1;
            }
            (ready, state.generation, state.numbered)
        };
        let cgroup = match ready {
            Some(cgroup) => cgroup,
            None => make(&root.join(format!("{SLOT}{number}")), limits)?,
        };
        Ok(Slot {
            cgroup,
            pool: Arc::clone(self),
            limits: limits.clone(),
            generation,
        })
    }

    /// Keeps an empty cgroup for the next command with the same limits, or
    /// removes it.
    fn give_back(&self, mut cgroup: Cgroup, used: &Usage, limits: Resources, generation: u64) {
        let room = |state: &State| {
            !state.closed
                && state.generation == generation
                && state.ready.get(&limits).map_or(0, Vec::len) < READY_MAX
        };
        if room(&self.lock()) && cgroup.renew(used) {
            let mut state = self.lock();
            if room(&state) {
                state.ready.entry(limits).or_default().push(cgroup);
            }
        }
        // Dropped unless kept: removed.
    }

    /// Removes every ready cgroup; those in use are removed when they come
    /// back. For a reload, whose limits and controllers may differ.
    pub(super) fn retire(&self) {
        let ready = {
            let mut state = self.lock();
            state.generation += 1;
            std::mem::take(&mut state.ready)
        };
        // Dropped: removed.
        drop(ready);
    }

    /// At the stop: removes every ready cgroup, and keeps none from now on.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.retire();
    }
}

/// Makes a cgroup at `path` with `limits` written in.
fn make(path: &Path, limits: &Resources) -> io::Result<Cgroup> {
    fs::create_dir(path).map_err(|e| describe(e, "cannot create", path))?;
    let cgroup = Cgroup::open(path.to_owned())?;
    for (_, file, value) in limits.files() {
        let at = path.join(file);
        fs::write(&at, &value)
            .map_err(|e| describe(e, &format!("cannot write {value:?} to"), &at))?;
    }
    Ok(cgroup)
}

/// A cgroup taken from the pool, its command's until [`Slot::release`]
/// gives it back. Dropped instead, the cgroup is killed and removed.
#[derive(Debug)]
pub struct Slot {
    cgroup: Cgroup,
    pool: Arc<Pool>,
    limits: Resources,
    generation: u64,
}

impl Deref for Slot {
    type Target = Cgroup;

    fn deref(&self) -> &Cgroup {
        &self.cgroup
    }
}

impl Slot {
    /// Gives the cgroup back to the pool once it is empty (what is still in
    /// it is killed first), with what its command used (its record's
    /// [`Usage`], read once it was empty).
    pub async fn release(self, used: &Usage) {
        let Slot {
            cgroup,
            pool,
            limits,
            generation,
        } = self;
        if cgroup.populated() {
            cgroup.kill();
            cgroup.emptied().await;
        }
        pool.give_back(cgroup, used, limits, generation);
    }
}
