//! What happens to a client before it gets a backend: the source firewall
//! ([`acl`]), limits per client address ([`limits`]) and the PROXY
//! protocol ([`proxy`]), both the header sluice accepts from a trusted
//! proxy in front and the one it sends to backends.
//!
//! Every check here runs in the accept loop or at the very start of a
//! client's task, before a backend is picked; a listener without any of
//! these keys pays nothing for them (no `getpeername`, no lookup).

pub mod acl;
pub mod limits;
pub mod proxy;
