//! Loopback port reservations that hold the port for as long as the value lives.
//!
//! A [`Reserved`] is a TCP socket with `SO_REUSEADDR`, bound to `127.0.0.1:0` and never
//! listening. On Linux, while it is held:
//!
//! - no other `bind(0)` (anyone's autobind) is handed that port;
//! - a plain `bind` without `SO_REUSEADDR` to it fails;
//! - a server that sets `SO_REUSEADDR` (std and tokio `TcpListener::bind`, Go's
//!   `net.Listen` as used by Pebble, redis-server, haproxy, nginx) binds and listens on it
//!   normally, so a test can name the port in a config before starting the server;
//! - while nobody listens, a connection is refused: the reservation alone is a dead port.
//!
//! Unlike bind-and-release, nothing else can take the port between choosing it and the
//! server binding it.

use std::net::{Ipv4Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// A loopback TCP port kept from everyone but servers that set `SO_REUSEADDR`.
#[derive(Debug)]
pub struct Reserved {
    _socket: Socket,
    addr: SocketAddr,
}

impl Reserved {
    /// The reserved port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `"127.0.0.1:PORT"`, as a `--listen` style argument.
    pub fn listen(&self) -> String {
        self.addr.to_string()
    }
}

/// Reserves a TCP port on 127.0.0.1 until the returned value is dropped.
pub fn reserve_port() -> Reserved {
    let socket =
        Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("a TCP socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket
        .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .expect("no free port on loopback");
    let addr = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("the reserved address");
    Reserved {
        _socket: socket,
        addr,
    }
}

/// A TCP reservation whose port is also free for UDP, for a DNS server (both protocols).
///
/// Only TCP is held. A UDP reservation does not work: a server that binds UDP without
/// `SO_REUSEADDR` (Go's `ListenPacket`, so challtestsrv) fails with "address in use", and
/// one that sets it shares the port with the reservation (on this kernel the last socket
/// bound gets the datagrams, which is not a promise). So the UDP side is only checked
/// free here; UDP autobind picks among ports free for UDP, so the window left is small.
pub fn reserve_dns_port() -> Reserved {
    loop {
        let reserved = reserve_port();
        if std::net::UdpSocket::bind(reserved.addr()).is_ok() {
            return reserved;
        }
    }
}
