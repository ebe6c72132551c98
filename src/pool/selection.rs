//! Spreading clients over a pool's serving set with pingora-load-balancing.
//!
//! Each pool owns one `LoadBalancer` whose discovery returns exactly the
//! serving set the pool last published, so pingora's selectors see only the
//! backends that may take traffic and their weights are honoured exactly
//! (3:1 weights give 75/25). Every `Backend` carries its [`Member`] in
//! `ext`, so a pick leads straight to its metrics and counters.
//!
//! `round_robin`, `random` and `source_hash` (ketama) are pingora's own
//! selectors; `least_connections`, which pingora lacks, is
//! [`LeastConnections`] below.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::FutureExt;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora_load_balancing::discovery::ServiceDiscovery;
use pingora_load_balancing::selection::{
    BackendIter, BackendSelection, Consistent, Random, RoundRobin,
};
use pingora_load_balancing::{Backend, Backends, LoadBalancer};

use super::Member;
use crate::config::Algorithm;

/// The serving set, as handed to pingora's discovery.
#[derive(Default)]
struct Membership(Mutex<Arc<BTreeSet<Backend>>>);

struct Discovery(Arc<Membership>);

#[async_trait]
impl ServiceDiscovery for Discovery {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let set = crate::sys::lock(&self.0.0).clone();
        Ok(((*set).clone(), HashMap::new()))
    }
}

enum Balancer {
    RoundRobin(LoadBalancer<RoundRobin>),
    Random(LoadBalancer<Random>),
    SourceHash(LoadBalancer<Consistent>),
    LeastConnections(LoadBalancer<LeastConnections>),
}

/// A pool's load balancer over its serving set.
pub(super) struct Selector {
    membership: Arc<Membership>,
    /// Size of the serving set, read per client without a lock.
    size: AtomicUsize,
    balancer: Balancer,
}

/// The member a pingora `Backend` was built for.
fn member_of(b: &Backend) -> Option<&Arc<Member>> {
    b.ext.get::<Arc<Member>>()
}

impl Selector {
    pub(super) fn new(algorithm: Algorithm) -> Self {
        let membership = Arc::new(Membership::default());
        let backends = || Backends::new(Box::new(Discovery(Arc::clone(&membership))));
        let balancer = match algorithm {
            Algorithm::RoundRobin => Balancer::RoundRobin(LoadBalancer::from_backends(backends())),
            Algorithm::Random => Balancer::Random(LoadBalancer::from_backends(backends())),
            Algorithm::SourceHash => Balancer::SourceHash(LoadBalancer::from_backends(backends())),
            Algorithm::LeastConnections => {
                Balancer::LeastConnections(LoadBalancer::from_backends(backends()))
            }
        };
        Selector {
            membership,
            size: AtomicUsize::new(0),
            balancer,
        }
    }

    /// Replace the serving set. Callers serialise this (the pool's lock), as
    /// pingora requires of `update`.
    pub(super) fn publish(&self, members: Vec<(SocketAddr, Arc<Member>, u32)>) {
        let set: BTreeSet<Backend> = members
            .into_iter()
            .map(|(addr, member, weight)| {
                let mut b = Backend {
                    addr: PingoraAddr::Inet(addr),
                    weight: weight.max(1) as usize,
                    ext: Default::default(),
                };
                b.ext.insert(member);
                b
            })
            .collect();
        self.size.store(set.len(), Relaxed);
        *crate::sys::lock(&self.membership.0) = Arc::new(set);
        // Our discovery never waits, so the update completes in one poll.
        let done = match &self.balancer {
            Balancer::RoundRobin(lb) => lb.update().now_or_never(),
            Balancer::Random(lb) => lb.update().now_or_never(),
            Balancer::SourceHash(lb) => lb.update().now_or_never(),
            Balancer::LeastConnections(lb) => lb.update().now_or_never(),
        };
        if !matches!(done, Some(Ok(()))) {
            log::error!("load balancer update did not complete; keeping the previous serving set");
        }
    }

    /// A serving backend not in `tried`, by the pool's algorithm.
    pub(super) fn select(&self, key: &[u8], tried: &[usize]) -> Option<(Arc<Member>, SocketAddr)> {
        let accept = |b: &Backend, _healthy: bool| {
            member_of(b).is_some_and(|m| !tried.contains(&m.backend.id()))
        };
        // Fallback picks may repeat a backend; allow enough steps to see all.
        let steps = 4 * self.size.load(Relaxed) + 8;
        let b = match &self.balancer {
            Balancer::RoundRobin(lb) => lb.select_with(key, steps, accept),
            Balancer::Random(lb) => lb.select_with(key, steps, accept),
            Balancer::SourceHash(lb) => lb.select_with(key, steps, accept),
            Balancer::LeastConnections(lb) => lb.select_with(key, steps, accept),
        }?;
        let addr = match b.addr {
            PingoraAddr::Inet(a) => a,
            #[allow(unreachable_patterns)]
            _ => return None,
        };
        member_of(&b).map(|m| (Arc::clone(m), addr))
    }
}

/// Least connections: the backend with the fewest open connections relative
/// to its weight; ties go round robin so equal backends share evenly.
pub struct LeastConnections {
    backends: Box<[Backend]>,
    rotation: AtomicUsize,
}

impl BackendSelection for LeastConnections {
    type Iter = LeastConnectionsIter;
    type Config = ();

    fn build(backends: &BTreeSet<Backend>) -> Self {
        LeastConnections {
            backends: backends.iter().cloned().collect(),
            rotation: AtomicUsize::new(0),
        }
    }

    fn iter(self: &Arc<Self>, _key: &[u8]) -> Self::Iter {
        LeastConnectionsIter {
            sel: Arc::clone(self),
            start: self.rotation.fetch_add(1, Relaxed),
            yielded: Vec::new(),
        }
    }
}

/// Yields backends from least to most loaded.
pub struct LeastConnectionsIter {
    sel: Arc<LeastConnections>,
    start: usize,
    yielded: Vec<bool>,
}

fn load(b: &Backend) -> (u64, u64) {
    let open = member_of(b).map_or(0, |m| m.backend.open_connections().max(0) as u64);
    (open, b.weight.max(1) as u64)
}

impl BackendIter for LeastConnectionsIter {
    fn next(&mut self) -> Option<&Backend> {
        let n = self.sel.backends.len();
        if n == 0 {
            return None;
        }
        if self.yielded.is_empty() {
            self.yielded = vec![false; n];
        }
        let mut best: Option<(usize, (u64, u64))> = None;
        for k in 0..n {
            let i = (self.start + k) % n;
            if self.yielded[i] {
                continue;
            }
            let (open, weight) = load(&self.sel.backends[i]);
            // open/weight < best_open/best_weight, without division.
            let better = best.is_none_or(|(_, (bo, bw))| open * bw < bo * weight);
            if better {
                best = Some((i, (open, weight)));
            }
        }
        let (i, _) = best?;
        self.yielded[i] = true;
        Some(&self.sel.backends[i])
    }
}
