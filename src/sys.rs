//! Small pieces several modules need alike, kept in one place: the lock
//! policy, telling this process's own exhaustion from a peer's failure,
//! and the open-file limit for log lines.

use std::io;
use std::sync::{Mutex, MutexGuard};

/// Take a lock, ignoring poisoning: every value behind a lock in sluice is
/// consistent between statements, so a panic elsewhere cannot leave it
/// half-written, and a lock that stayed poisoned would stop the process.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `e` means this process ran out of something (file descriptors,
/// socket buffers, memory): it says nothing about the peer, and any other
/// peer would fail alike.
pub fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE | nix::libc::ENOBUFS | nix::libc::ENOMEM)
    )
}

/// The process's open-file limit, for log lines. Read with `getrlimit`: a
/// process out of descriptors cannot open /proc/self/limits.
pub fn fd_limit() -> String {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) if soft == RLIM_INFINITY => "unlimited".to_string(),
        Ok((soft, _)) => soft.to_string(),
        Err(_) => "?".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhaustion_is_told_from_a_peer_failure() {
        assert!(is_local_exhaustion(&io::Error::from_raw_os_error(
            nix::libc::EMFILE
        )));
        assert!(!is_local_exhaustion(&io::Error::from_raw_os_error(
            nix::libc::ECONNREFUSED
        )));
        assert!(!is_local_exhaustion(&io::Error::other("x")));
        assert!(fd_limit().parse::<u64>().is_ok() || fd_limit() == "unlimited");
    }
}
