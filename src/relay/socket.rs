//! Sockets as sluice holds them, and the only `unsafe` code in sluice:
//! owning the descriptors that `accept4(2)`, `recvmsg(2)` (the upgrade
//! handover) and pingora's listener-fd table hand over, and registering owned
//! sockets with the runtime.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::SockFlag;
use pingora::server::ListenFds;
use tokio::io::unix::AsyncFd;

/// A non-blocking TCP socket registered with the runtime. Its readiness comes
/// with guards that can be cleared without a system call.
pub type Socket = AsyncFd<std::net::TcpStream>;

/// Register an owned, non-blocking socket with the runtime.
#[allow(unsafe_code)]
pub fn register(socket: std::net::TcpStream) -> io::Result<Socket> {
    // SAFETY: `socket` owns its descriptor for as long as the `AsyncFd`
    // holds it, and sluice never swaps the inner socket (`get_mut`).
    unsafe { AsyncFd::register(socket) }.map_err(|e| e.into_parts().1)
}

/// Accept a client: non-blocking, close-on-exec, registered with the
/// runtime, with `TCP_NODELAY` from its listener (Linux copies it to each
/// accepted socket: one system call less per client), and its address as
/// `accept4(2)` gives it (sparing a `getpeername(2)` wherever an edge rule,
/// a PROXY header, `source_hash` or a log needs it). `WouldBlock` means no
/// client is waiting.
#[allow(unsafe_code)]
pub fn accept(listener: &std::net::TcpListener) -> io::Result<(Socket, Option<SocketAddr>)> {
    let flags = nix::libc::SOCK_NONBLOCK | nix::libc::SOCK_CLOEXEC;
    // SAFETY: `try_init` hands over storage and length sized for any
    // address; accept4 writes at most that much and sets the length.
    let (fd, peer) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            match nix::libc::accept4(listener.as_raw_fd(), storage.cast(), len, flags) {
                -1 => Err(io::Error::last_os_error()),
                fd => Ok(fd),
            }
        })
    }?;
    // SAFETY: accept4 just returned this descriptor; nothing else owns it.
    let client = std::net::TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok((register(client)?, peer.as_socket()))
}

/// Register a listening socket with the runtime, with `TCP_NODELAY` set for
/// the clients it accepts (every listener, inherited ones too, comes here).
#[allow(unsafe_code)]
pub fn register_listener(
    listener: std::net::TcpListener,
) -> io::Result<AsyncFd<std::net::TcpListener>> {
    listener.set_nonblocking(true)?;
    socket2::SockRef::from(&listener).set_tcp_nodelay(true)?;
    // SAFETY: as in `register`: the listener owns its descriptor and is never swapped.
    unsafe { AsyncFd::register_with_interest(listener, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Accept a connection on a listening Unix socket (sluice's upgrade
/// handover): close-on-exec, blocking. `WouldBlock`: nobody is waiting.
#[allow(unsafe_code)]
pub fn accept_unix(listener: &OwnedFd) -> io::Result<OwnedFd> {
    let fd = nix::sys::socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
        .map_err(io::Error::from)?;
    // SAFETY: accept4 just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Own the descriptors that one `SCM_RIGHTS` message just brought
/// (`recvmsg(2)` on sluice's upgrade handover), so that every path out of
/// the receiver closes the ones it does not keep.
#[allow(unsafe_code)]
pub fn own_received(fds: Vec<RawFd>) -> Vec<OwnedFd> {
    fds.into_iter()
        // SAFETY: recvmsg(2) installed each of these descriptors in this
        // process for this one message and returned its number only here;
        // nothing else has it, so each gets exactly one owner.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// Take the listening socket for `key` out of pingora's listener-fd table,
/// where a sluice from before its own handover put its listeners (at most 32
/// fit): our own copy, with the table's closed and its entry removed under
/// the same lock, so the next upgrade does not send it through pingora again.
#[allow(unsafe_code)]
pub fn take_from_table(fds: &ListenFds, key: &str) -> io::Result<Option<std::net::TcpListener>> {
    let mut table = fds.lock();
    let Some(&fd) = table.get(key) else {
        return Ok(None);
    };
    // SAFETY: the table keeps `fd` open until `close_unclaimed` closes it,
    // and that only runs under the table's lock, which we hold until after
    // the copy is made. pingora's own listeners take entries only for
    // pingora's services' addresses (admin), never a sluice listener's:
    // validation keeps `admin.bind` apart from every listener address.
    let copy = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
    let keep = table
        .serialize()
        .0
        .into_iter()
        .filter(|k| k != key)
        .collect();
    table.close_unclaimed(&keep);
    Ok(Some(std::net::TcpListener::from(copy)))
}

/// How many sockets pingora's listener-fd table holds (pingora hands them
/// over itself on SIGQUIT).
pub fn table_len(fds: &ListenFds) -> usize {
    fds.lock().serialize().0.len()
}

/// A non-blocking connect to `addr`, registered with the runtime.
pub async fn connect(addr: SocketAddr) -> io::Result<Socket> {
    Outgoing::new(addr, false)?.connect(addr).await
}

/// An outgoing socket before its connect, and whether it took a port yet.
pub struct Outgoing(socket2::Socket, bool);

impl Outgoing {
    /// A socket for a connect to `addr`. With `bind_first`, it takes its
    /// local port now (bound to the unspecified address), so the port is
    /// known before a single packet leaves.
    pub fn new(addr: SocketAddr, bind_first: bool) -> io::Result<Outgoing> {
        let kind = socket2::Type::STREAM.nonblocking().cloexec();
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), kind, None)?;
        socket.set_tcp_nodelay(true)?;
        if bind_first {
            let any: SocketAddr = match addr {
                SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            socket.bind(&any.into())?;
        }
        Ok(Outgoing(socket, bind_first))
    }

    /// The local port, once bound (no system call when it is not).
    pub fn local_port(&self) -> Option<u16> {
        if !self.1 {
            return None;
        }
        self.0
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map(|a| a.port())
            .filter(|&p| p != 0)
    }

    /// Connect, registered with the runtime.
    pub async fn connect(self, addr: SocketAddr) -> io::Result<Socket> {
        let socket = self.0;
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let socket = register(std::net::TcpStream::from(socket))?;
        // Writable means the handshake is over: done, or failed with SO_ERROR set.
        let _ready = socket.writable().await?;
        match socket.get_ref().take_error()? {
            Some(e) => Err(e),
            None => Ok(socket),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Connect a client to `listener` and accept it as sluice does.
    async fn connect_and_accept(
        listener: std::net::TcpListener,
    ) -> (std::net::TcpStream, Socket, Option<SocketAddr>) {
        let addr = listener.local_addr().unwrap();
        let registered = register_listener(listener).unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        loop {
            match accept(registered.get_ref()) {
                Ok((accepted, peer)) => return (client, accepted, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => tokio::task::yield_now().await,
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Accepted clients get `TCP_NODELAY` from their listener (no system
    /// call of their own), inherited listeners included, and come with the
    /// client's address.
    #[tokio::test]
    async fn accepted_clients_have_nodelay_from_their_listener_and_their_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (client, accepted, peer) = connect_and_accept(listener).await;
        assert!(accepted.get_ref().nodelay().unwrap());
        assert_eq!(peer, Some(client.local_addr().unwrap()));
        assert_eq!(peer, accepted.get_ref().peer_addr().ok());
    }

    /// An IPv6 client's address comes whole from accept.
    #[tokio::test]
    async fn an_ipv6_clients_address_comes_from_accept() {
        let Ok(listener) = std::net::TcpListener::bind("[::1]:0") else {
            return; // No IPv6 loopback on this machine.
        };
        let (client, _, peer) = connect_and_accept(listener).await;
        assert_eq!(peer, Some(client.local_addr().unwrap()));
    }

    /// Only a socket bound before its connect has a port to tell.
    #[test]
    fn only_a_socket_bound_first_knows_its_port() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(Outgoing::new(addr, false).unwrap().local_port(), None);
        assert!(Outgoing::new(addr, true).unwrap().local_port().is_some());
    }
}
