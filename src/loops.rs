//! Proxy loops: sluice connecting to itself.
//!
//! Validation rejects a backend that is plainly a listener's own address,
//! but a DNS name, a wildcard bind or two listeners that forward to each
//! other can still lead a connection back into sluice. Such a chain is
//! followed hop by hop: a backend connection to one of sluice's own ports is
//! registered under its local address with the hop count of the client it
//! serves, plus one; a client accepted from a registered address inherits
//! that count. A client [`MAX_HOPS`] deep is a loop and is refused. Chains
//! through sluice that end somewhere (a listener forwarding to another
//! listener on purpose) stay short and are left alone.
//!
//! The cost is kept off the common path: deciding whether a backend port is
//! one of sluice's is one atomic load, and a client's origin is looked up
//! only while some connection to sluice itself is registered.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{LazyLock, Mutex};

/// Hops through sluice itself after which a client is refused.
pub const MAX_HOPS: u8 = 8;

/// The ports sluice listens on, one bit each.
static LISTEN_PORTS: [AtomicU64; 1024] = [const { AtomicU64::new(0) }; 1024];

/// Backend connections into sluice itself: local port -> hop count. The
/// port alone identifies them: they are bound to the unspecified address,
/// so no other socket of this host has that port.
static HOPS: LazyLock<Mutex<HashMap<u16, u8>>> = LazyLock::new(|| Mutex::new(HashMap::new()));
static REGISTERED: AtomicUsize = AtomicUsize::new(0);

/// Record the ports of the configuration in force.
pub fn set_listen_ports(ports: impl IntoIterator<Item = u16>) {
    let mut words = [0u64; 1024];
    for p in ports {
        words[usize::from(p / 64)] |= 1 << (p % 64);
    }
    for (slot, word) in LISTEN_PORTS.iter().zip(words) {
        slot.store(word, Relaxed);
    }
}

/// Whether sluice listens on `port`.
pub fn is_listen_port(port: u16) -> bool {
    LISTEN_PORTS[usize::from(port / 64)].load(Relaxed) & (1 << (port % 64)) != 0
}

/// How many hops through sluice a client has made: 0 unless it is one of
/// sluice's own backend connections. `ends` gives the client's address and
/// the local address it reached, asked for only while any is registered.
pub fn hops_of(ends: impl FnOnce() -> Option<(SocketAddr, SocketAddr)>) -> u8 {
    if REGISTERED.load(Relaxed) == 0 {
        return 0;
    }
    let Some((peer, local)) = ends() else {
        return 0;
    };
    // From this host: a loopback address, or the address it reached.
    if !(peer.ip().is_loopback() || peer.ip() == local.ip()) {
        return 0;
    }
    crate::sys::lock(&HOPS)
        .get(&peer.port())
        .copied()
        .unwrap_or(0)
}

/// A backend connection into sluice itself, registered while it lives.
pub struct Registration(u16);

/// Register a backend connection from local `port` into sluice, `hops`
/// deep, before it connects (so its peer can never be accepted first).
pub fn register(port: u16, hops: u8) -> Registration {
    crate::sys::lock(&HOPS).insert(port, hops);
    REGISTERED.fetch_add(1, Relaxed);
    Registration(port)
}

impl Drop for Registration {
    fn drop(&mut self) {
        crate::sys::lock(&HOPS).remove(&self.0);
        REGISTERED.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_hops() {
        set_listen_ports([80, 8080, 65535]);
        assert!(is_listen_port(80) && is_listen_port(8080) && is_listen_port(65535));
        assert!(!is_listen_port(81) && !is_listen_port(0));
        set_listen_ports([81]);
        assert!(!is_listen_port(80) && is_listen_port(81));
        let a: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let here: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let far: SocketAddr = "10.1.2.3:40000".parse().unwrap();
        let near: SocketAddr = "10.9.9.9:80".parse().unwrap();
        assert_eq!(hops_of(|| Some((a, here))), 0);
        let r = register(40000, 3);
        assert_eq!(hops_of(|| Some((a, here))), 3);
        assert_eq!(
            hops_of(|| Some((far, near))),
            0,
            "another host's port 40000"
        );
        drop(r);
        assert_eq!(hops_of(|| Some((a, here))), 0);
    }
}
