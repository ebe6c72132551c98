//! TCP sockets as the TCP engine holds them, and the only `unsafe` code in
//! sluice: taking a client socket out of pingora's stream and registering
//! owned sockets with the runtime.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use pingora::protocols::Stream;
use pingora::protocols::l4::stream::Stream as L4Stream;
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

/// Take the socket of a plain TCP stream out of pingora's wrapper: the
/// descriptor is duplicated and pingora's copy closed, so the socket stays
/// open through the returned one alone. The duplicate shares the open file
/// description, so it is already non-blocking. `Err` gives back any other kind of
/// stream (or a plain one when no descriptor is left for the duplicate).
#[allow(unsafe_code)]
pub fn take_from_pingora(stream: Stream) -> Result<std::net::TcpStream, Stream> {
    let Some(l4) = stream.as_any().downcast_ref::<L4Stream>() else {
        return Err(stream);
    };
    // SAFETY: the descriptor belongs to `l4`, which keeps it open until
    // `stream` is dropped below, after the duplicate has been made.
    let fd = unsafe { BorrowedFd::borrow_raw(l4.as_raw_fd()) };
    let Ok(owned) = fd.try_clone_to_owned() else {
        return Err(stream);
    };
    drop(stream);
    Ok(std::net::TcpStream::from(owned))
}

/// A non-blocking connect to `addr`, registered with the runtime.
pub async fn connect(addr: SocketAddr) -> io::Result<Socket> {
    let kind = socket2::Type::STREAM.nonblocking().cloexec();
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), kind, None)?;
    socket.set_tcp_nodelay(true)?;
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
