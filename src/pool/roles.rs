//! The process-wide role view: one role per backend address, whichever
//! pools check it, and where each write pool sends its writes.
//!
//! Two pools over the same database nodes (a write listener's
//! `role: primary` pool and a read listener's `role: replica` pool) must
//! not disagree about who is primary. Every role-reporting check feeds
//! [`RoleBook::observe`], which confirms a role change once for the
//! address (taking `primary` needs `rise` reports in a row from one pool;
//! giving it up is believed at once), and every pool reads the role from
//! here. A read pool that falls back to the primary goes where the write
//! pool over the same addresses sends its writes ([`RoleBook::follow`]),
//! instead of deciding on its own.
//!
//! The book never calls into a pool while it holds its lock; pools read it
//! under their own lock (lock order: pool, then book).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use crate::check::Role;
use crate::sys::lock;

use super::Pool;
use super::core::Key;

/// The role view and write decisions of every pool.
#[derive(Default)]
pub struct RoleBook {
    inner: Mutex<Book>,
}

#[derive(Default)]
struct Book {
    roles: HashMap<Key, RoleRecord>,
    /// Per write pool: its members and where its writes go.
    writes: HashMap<String, (Vec<Key>, Option<Key>)>,
    pools: Vec<Weak<Pool>>,
}

/// One address's role and a change being confirmed, with each pool's streak.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoleRecord {
    role: Option<Role>,
    candidate: Option<(Role, Vec<(String, u32)>)>,
}

impl RoleRecord {
    /// The role in force.
    pub fn role(&self) -> Option<Role> {
        self.role
    }

    /// Record the role `pool` saw reported; whether the role in force
    /// changed. The first report decides; giving up `primary` takes effect
    /// at once (writes must stop); any other change needs `rise` reports in
    /// a row from one pool, so a flapping node cannot grab the writes and
    /// two pools checking one node do not confirm twice as fast.
    pub fn observe(&mut self, pool: &str, reported: Option<Role>, rise: u32) -> bool {
        let Some(reported) = reported else {
            self.candidate = None;
            return self.role.take().is_some();
        };
        if self.role == Some(reported) {
            if let Some((_, streaks)) = &mut self.candidate {
                streaks.retain(|(p, _)| p != pool);
                if streaks.is_empty() {
                    self.candidate = None;
                }
            }
            return false;
        }
        let at_once = self.role.is_none() || self.role == Some(Role::Primary);
        let candidate = match self.candidate.take() {
            Some((r, streaks)) if r == reported => (r, streaks),
            _ => (reported, Vec::new()),
        };
        let (role, mut streaks) = candidate;
        let streak = match streaks.iter_mut().find(|(p, _)| p == pool) {
            Some((_, n)) => {
                *n = n.saturating_add(1);
                *n
            }
            None => {
                streaks.push((pool.to_string(), 1));
                1
            }
        };
        if at_once || streak >= rise {
            self.role = Some(role);
            true
        } else {
            self.candidate = Some((role, streaks));
            false
        }
    }
}

impl RoleBook {
    /// An empty book.
    pub fn new() -> Arc<RoleBook> {
        Arc::new(RoleBook::default())
    }

    /// Note a pool so that changes reach it.
    pub(super) fn register(&self, pool: &Arc<Pool>) {
        let mut book = lock(&self.inner);
        book.pools.retain(|p| p.strong_count() > 0);
        book.pools.push(Arc::downgrade(pool));
    }

    /// Forget a removed pool's write decision.
    pub(super) fn forget(&self, pool: &Pool) {
        let mut book = lock(&self.inner);
        book.writes.remove(&pool.name);
        book.pools
            .retain(|p| p.upgrade().is_some_and(|p| !std::ptr::eq(&*p, pool)));
    }

    /// Record a role `pool` saw `key` report: the role in force before and after.
    pub(super) fn observe(
        &self,
        pool: &str,
        key: &Key,
        reported: Option<Role>,
        rise: u32,
    ) -> (Option<Role>, Option<Role>) {
        let mut book = lock(&self.inner);
        let record = book.roles.entry(Arc::clone(key)).or_default();
        let before = record.role;
        record.observe(pool, reported, rise);
        (before, record.role)
    }

    /// `pool` no longer decides where writes go.
    pub(super) fn forget_writes(&self, pool: &str) {
        lock(&self.inner).writes.remove(pool);
    }

    /// The role in force for `key`.
    pub fn role(&self, key: &str) -> Option<Role> {
        lock(&self.inner).roles.get(key).and_then(RoleRecord::role)
    }

    /// Record where the write pool `pool` (over `members`) sends its writes.
    pub(super) fn set_writes(&self, pool: &str, members: Vec<Key>, to: Option<Key>) {
        lock(&self.inner)
            .writes
            .insert(pool.to_string(), (members, to));
    }

    /// Whom a read pool `pool` over `members` follows: `None` when no write
    /// pool shares an address with it, else where that pool's writes go
    /// (`Some(None)`: nowhere, or to a node this pool does not have).
    pub(super) fn follow(&self, pool: &str, members: &[Key]) -> Option<Option<Key>> {
        let book = lock(&self.inner);
        let mut found = None;
        let mut names: Vec<&String> = book.writes.keys().collect();
        names.sort();
        for name in names {
            let (theirs, to) = &book.writes[name];
            if name == pool || !theirs.iter().any(|k| members.contains(k)) {
                continue;
            }
            match to.as_ref().filter(|t| members.contains(t)) {
                Some(t) => return Some(Some(Arc::clone(t))),
                None => found = Some(None),
            }
        }
        found
    }

    /// Every live pool.
    pub(super) fn pools(&self) -> Vec<Arc<Pool>> {
        lock(&self.inner)
            .pools
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }
}
