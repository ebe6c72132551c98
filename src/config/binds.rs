//! Which listening addresses collide, and which backends are sluice itself.
//!
//! Two binds overlap when the kernel would refuse the second: the same
//! address and port, a wildcard (`0.0.0.0:P`, `[::]:P`) and any address of
//! its family on `P`, and, unless `net.ipv6.bindv6only` is 1, `[::]:P` and
//! every IPv4 address on `P` (a dual-stack socket takes both families).
//!
//! A backend that one of sluice's own listeners accepts for, in a pool that
//! this listener (or a chain of them) forwards to, makes every client loop
//! through sluice until descriptors run out. Such loops are found here from
//! the addresses alone: IP literals, `localhost`, wildcards covering a local
//! address. Other DNS names are resolved only at run time.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

use super::decode::Decoder;
use super::{AdminSettings, HostPort, ListenerSettings, PoolSettings};

/// Whether two listening addresses cannot both be bound on this machine:
/// the same address and port, a wildcard and an address it covers, or
/// `[::]:P` and any IPv4 address on `P` unless IPv6 sockets are IPv6-only
/// by default (`/proc/sys/net/ipv6/bindv6only`).
pub fn binds_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    overlap(a, b, ipv6_only_by_default())
}

/// `net.ipv6.bindv6only`: whether a socket bound to `[::]` takes IPv6 only.
/// Read once; where it cannot be read, Linux's default (0) is assumed, which
/// reports more overlaps rather than fewer.
pub fn ipv6_only_by_default() -> bool {
    static V6ONLY: OnceLock<bool> = OnceLock::new();
    *V6ONLY.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|s| s.trim() == "1")
    })
}

/// [`binds_overlap`] with the setting given.
pub(super) fn overlap(a: SocketAddr, b: SocketAddr, v6only: bool) -> bool {
    a.port() == b.port()
        && claims(a.ip(), v6only).into_iter().flatten().any(|x| {
            claims(b.ip(), v6only)
                .into_iter()
                .flatten()
                .any(|y| x.meets(y))
        })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Family {
    V4,
    V6,
}

/// Part of a port that a bind takes: one address, or a whole family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Claim {
    family: Family,
    /// `None`: every address of the family.
    ip: Option<IpAddr>,
}

impl Claim {
    fn meets(self, other: Claim) -> bool {
        self.family == other.family
            && (self.ip.is_none() || other.ip.is_none() || self.ip == other.ip)
    }
}

/// What binding `ip` takes (at most two claims).
fn claims(ip: IpAddr, v6only: bool) -> [Option<Claim>; 2] {
    let v4 = |ip: Ipv4Addr| Claim {
        family: Family::V4,
        ip: (!ip.is_unspecified()).then_some(IpAddr::V4(ip)),
    };
    match ip {
        IpAddr::V4(ip) => [Some(v4(ip)), None],
        IpAddr::V6(ip) => {
            let own = Claim {
                family: Family::V6,
                ip: (!ip.is_unspecified()).then_some(IpAddr::V6(ip)),
            };
            // A dual-stack socket on `::` or `::ffff:a.b.c.d` takes IPv4 too.
            let also = if v6only {
                None
            } else if ip.is_unspecified() {
                Some(v4(Ipv4Addr::UNSPECIFIED))
            } else {
                ip.to_ipv4_mapped().map(v4)
            };
            [Some(own), also]
        }
    }
}

/// Who bound an address: a path for messages and, for a listener, its index.
struct Owner {
    path: String,
    listener: Option<usize>,
}

/// The claims on one port and family.
#[derive(Default)]
struct Slot {
    /// Who took every address, if anyone.
    wildcard: Option<usize>,
    /// Who took each single address.
    exact: HashMap<IpAddr, usize>,
    /// Whoever came first, for a wildcard that arrives later.
    first: Option<usize>,
}

/// Every address bound so far, indexed so that each new bind costs a few
/// hash lookups however many came before.
pub(super) struct Binds {
    v6only: bool,
    owners: Vec<Owner>,
    slots: HashMap<(u16, Family), Slot>,
    local: OnceLock<Vec<IpAddr>>,
}

impl Binds {
    fn new(v6only: bool) -> Self {
        Binds {
            v6only,
            owners: Vec::new(),
            slots: HashMap::new(),
            local: OnceLock::new(),
        }
    }

    /// Take `addr` for `owner`, or name whoever holds a part of it.
    fn claim(&mut self, addr: SocketAddr, owner: Owner) -> Result<(), &str> {
        let wanted = claims(addr.ip(), self.v6only);
        for c in wanted.iter().flatten() {
            let Some(slot) = self.slots.get(&(addr.port(), c.family)) else {
                continue;
            };
            let holder = match c.ip {
                None => slot.first,
                Some(ip) => slot.wildcard.or_else(|| slot.exact.get(&ip).copied()),
            };
            if let Some(h) = holder {
                return Err(&self.owners[h].path);
            }
        }
        let id = self.owners.len();
        self.owners.push(owner);
        for c in wanted.iter().flatten() {
            let slot = self.slots.entry((addr.port(), c.family)).or_default();
            match c.ip {
                None => slot.wildcard = Some(id),
                Some(ip) => {
                    slot.exact.insert(ip, id);
                }
            }
            slot.first.get_or_insert(id);
        }
        Ok(())
    }

    /// Who accepts connections to `to` (an address of this machine, or not).
    fn accepting(&self, to: SocketAddr) -> Option<&Owner> {
        let family = if to.is_ipv4() { Family::V4 } else { Family::V6 };
        let slot = self.slots.get(&(to.port(), family))?;
        let id = match slot.exact.get(&to.ip()) {
            Some(id) => *id,
            None if self.is_local(to.ip()) => slot.wildcard?,
            None => return None,
        };
        Some(&self.owners[id])
    }

    /// Whether `ip` is an address of this machine.
    fn is_local(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.local.get_or_init(interface_addresses).contains(&ip)
    }
}

/// The addresses of this machine's interfaces (none where they cannot be
/// listed: then only loopback counts as local).
fn interface_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|s| IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        })
        .collect()
}

/// Report addresses that two listeners (or a listener and the admin) both
/// bind; return every address bound, for [`check_loops`].
pub(super) fn check_conflicts(
    d: &mut Decoder,
    listeners: &[ListenerSettings],
    admin: Option<&AdminSettings>,
) -> Binds {
    let mut binds = Binds::new(ipv6_only_by_default());
    let mut claim = |d: &mut Decoder, addr: SocketAddr, owner: Owner| {
        let path = owner.path.clone();
        if let Err(other) = binds.claim(addr, owner) {
            d.problem(path, format!("{addr} overlaps with {other}"));
        }
    };
    if let Some(a) = admin {
        let path = "admin.bind".to_string();
        claim(
            d,
            a.bind,
            Owner {
                path,
                listener: None,
            },
        );
    }
    for (n, l) in listeners.iter().enumerate() {
        for (i, addr) in l.bind.iter().enumerate() {
            let path = if l.bind.len() == 1 {
                format!("listeners.{}.bind", l.name)
            } else {
                format!("listeners.{}.bind[{i}]", l.name)
            };
            claim(
                d,
                *addr,
                Owner {
                    path,
                    listener: Some(n),
                },
            );
        }
    }
    binds
}

/// Where a connection to `address` may arrive on this machine, when that
/// can be told without a DNS query.
fn destinations(address: &HostPort) -> Vec<SocketAddr> {
    let port = address.port();
    if let Some(a) = address.socket_addr() {
        let ip = match a.ip() {
            // A connect to the unspecified address reaches this machine.
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip.to_canonical(),
        };
        return vec![SocketAddr::new(ip, port)];
    }
    // `localhost` and its subdomains are loopback (RFC 6761), in either family.
    let host = address.host().trim_end_matches('.').to_ascii_lowercase();
    if host == "localhost" || host.ends_with(".localhost") {
        return vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
        ];
    }
    Vec::new()
}

/// Report each backend that is one of sluice's own listeners forwarding,
/// directly or through other listeners, back to the backend's pool.
pub(super) fn check_loops(
    d: &mut Decoder,
    listeners: &[ListenerSettings],
    pools: &[PoolSettings],
    binds: &Binds,
) {
    let index: HashMap<&str, usize> = pools
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.as_str(), i))
        .collect();
    // Pool p -> pool q: a backend of p is a listener that forwards to q.
    struct Edge<'a> {
        from: usize,
        to: usize,
        backend: usize,
        via: &'a Owner,
        listener: &'a ListenerSettings,
    }
    let mut edges = Vec::new();
    for (p, pool) in pools.iter().enumerate() {
        for (b, backend) in pool.backends.iter().enumerate() {
            let reached = destinations(&backend.address)
                .into_iter()
                .find_map(|to| binds.accepting(to));
            let Some(via) = reached else { continue };
            let Some(listener) = via.listener.map(|l| &listeners[l]) else {
                continue;
            };
            if let Some(&to) = index.get(listener.pool.as_str()) {
                edges.push(Edge {
                    from: p,
                    to,
                    backend: b,
                    via,
                    listener,
                });
            }
        }
    }
    if edges.is_empty() {
        return;
    }
    let pairs: Vec<(usize, usize)> = edges.iter().map(|e| (e.from, e.to)).collect();
    let component = strongly_connected(pools.len(), &pairs);
    for e in edges {
        if component[e.from] != component[e.to] {
            continue;
        }
        let pool = &pools[e.from];
        let onward = if e.from == e.to {
            "which forwards to this pool: every connection would loop back into sluice".to_string()
        } else {
            format!(
                "which forwards to pool `{}`, which leads back to this pool: connections would loop",
                pools[e.to].name
            )
        };
        d.problem(
            format!("pools.{}.backends[{}]", pool.name, e.backend),
            format!(
                "`{}` is listener `{}` of this sluice ({}), {onward}",
                pool.backends[e.backend].address, e.listener.name, e.via.path
            ),
        );
    }
}

/// The strongly connected component of each of `n` nodes (Kosaraju's
/// algorithm, without recursion: a file may chain many pools).
fn strongly_connected(n: usize, edges: &[(usize, usize)]) -> Vec<usize> {
    let mut forward = vec![Vec::new(); n];
    let mut backward = vec![Vec::new(); n];
    for &(a, b) in edges {
        forward[a].push(b);
        backward[b].push(a);
    }
    // Nodes in the order their depth-first visits finish.
    let mut finished = Vec::with_capacity(n);
    let mut seen = vec![false; n];
    for start in 0..n {
        if seen[start] {
            continue;
        }
        seen[start] = true;
        let mut stack = vec![(start, 0)];
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&to) = forward[node].get(*next) {
                *next += 1;
                if !seen[to] {
                    seen[to] = true;
                    stack.push((to, 0));
                }
            } else {
                finished.push(node);
                stack.pop();
            }
        }
    }
    let mut component = vec![usize::MAX; n];
    for (c, &start) in finished.iter().rev().enumerate() {
        if component[start] != usize::MAX {
            continue;
        }
        component[start] = c;
        let mut stack = vec![start];
        while let Some(node) = stack.pop() {
            for &from in &backward[node] {
                if component[from] == usize::MAX {
                    component[from] = c;
                    stack.push(from);
                }
            }
        }
    }
    component
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn overlaps_follow_the_kernel() {
        for (x, y, dual, v6only) in [
            ("127.0.0.1:80", "127.0.0.1:80", true, true),
            ("127.0.0.1:80", "127.0.0.1:81", false, false),
            ("127.0.0.1:80", "127.0.0.2:80", false, false),
            ("0.0.0.0:80", "127.0.0.2:80", true, true),
            ("[::]:80", "[::1]:80", true, true),
            ("[::1]:80", "[::2]:80", false, false),
            ("[::]:80", "0.0.0.0:80", true, false),
            ("[::]:80", "10.0.0.1:80", true, false),
            ("[::]:81", "10.0.0.1:80", false, false),
            ("[::1]:80", "0.0.0.0:80", false, false),
            ("[::ffff:10.0.0.1]:80", "10.0.0.1:80", true, false),
            ("[::ffff:10.0.0.1]:80", "0.0.0.0:80", true, false),
            ("[::ffff:10.0.0.1]:80", "10.0.0.2:80", false, false),
        ] {
            for (p, q) in [(x, y), (y, x)] {
                assert_eq!(overlap(a(p), a(q), false), dual, "{p} {q} bindv6only=0");
                assert_eq!(overlap(a(p), a(q), true), v6only, "{p} {q} bindv6only=1");
            }
        }
    }

    #[test]
    fn the_index_agrees_with_the_predicate() {
        let all = [
            "127.0.0.1:80",
            "127.0.0.2:80",
            "0.0.0.0:80",
            "[::]:80",
            "[::1]:80",
            "[::ffff:127.0.0.1]:80",
            "127.0.0.1:81",
            "[::]:81",
        ];
        for v6only in [false, true] {
            for x in all {
                for y in all {
                    let mut binds = Binds::new(v6only);
                    let owner = |path: &str| Owner {
                        path: path.to_string(),
                        listener: None,
                    };
                    binds.claim(a(x), owner("x")).unwrap();
                    let clash = binds.claim(a(y), owner("y")).is_err();
                    assert_eq!(clash, overlap(a(x), a(y), v6only), "{x} then {y}, {v6only}");
                }
            }
        }
    }

    #[test]
    fn components_find_cycles() {
        let c = strongly_connected(5, &[(0, 1), (1, 2), (2, 0), (3, 3), (2, 4)]);
        assert!(c[0] == c[1] && c[1] == c[2]);
        assert!(c[3] != c[0] && c[4] != c[0] && c[3] != c[4]);
    }
}
