//! Containment by cgroup v2: each connection's command in a cgroup of its own,
//! under a subtree delegated to the daemon.
//!
//! Whose subtree: the cgroup systemd delegated to the unit (`Delegate=yes`
//! marks it with the `user.delegate` and `trusted.delegate` attributes), or
//! one an operator names with `delegated_cgroup`. The daemon never takes over
//! a cgroup nobody delegated: run by hand from the root cgroup, it uses
//! process groups. In its subtree it lives in a leaf of its own, `daemon/`
//! (cgroup v2 lets a cgroup with processes have no controllers enabled for
//! its children), and makes `slot-N/` cgroups beside it for the commands.
//! systemd runs `ExecReload=` in `.control/`, which the daemon leaves alone.
//!
//! A command's cgroup is taken from a pool of ready ones (made with the
//! service's limits written in, the first time they are needed); the command
//! starts in it (see `sys::spawn`); it is emptied by SIGTERM to every
//! process, then `cgroup.kill`; its usage is read for the record, and it goes
//! back to the pool for the next command with the same limits (or is
//! removed, where the next record could not tell its command's usage apart).
//!
//! The parts:
//! - `offer`: [`Offer`], the subtree found at start, or why there is none.
//! - `tree`: [`Tree`], the daemon's leaf, the controllers, stale cgroups, and
//!   taking a command's cgroup.
//! - `pool`: the ready cgroups, and [`Slot`], one taken for a command.
//! - `connection`: [`Cgroup`], one command's cgroup, and its [`Usage`].
//! - `resources`: [`Resources`], what a service sets in each connection's cgroup.

mod connection;
mod offer;
mod pool;
mod resources;
mod tree;

pub use connection::{Cgroup, Usage};
pub use offer::Offer;
pub use pool::Slot;
pub use resources::Resources;
pub use tree::{set_up, SetupError, Tree, DAEMON_LEAF};
