//! HTTP over a stream socket that is not TCP: AF_VSOCK for `vsock://` URLs
//! (docs/vsock.md), and a Unix socket, which is what a Firecracker host side
//! is and what the in-process tests listen on.
//!
//! This is the glue between those sockets and ureq's connector extension
//! point (`ureq::unversioned::transport`): a [`StreamConnector`] opens the
//! socket, a [`StreamTransport`] moves ureq's buffers through it. The HTTP
//! itself (framing, keep-alive, pooling) stays ureq's. TCP is ureq's own
//! connector, wrapped only so that a failed connection names its address
//! ([`TcpConnect`]).
//!
//! The socket calls go through `socket2`: rustix (1.1) has no safe vsock
//! address type, and building a `sockaddr_vm` by hand would need `unsafe`,
//! which this crate forbids.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::RecvFlags;
use socket2::{Domain, SockAddr, Socket, Type};
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, TcpConnector, Transport,
};

/// ureq's TCP connector; its errors name the address tried.
#[derive(Debug, Default)]
pub struct TcpConnect(TcpConnector);

impl Connector<()> for TcpConnect {
    type Out = <TcpConnector as Connector<()>>::Out;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<()>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        self.0.connect(details, chained).map_err(|e| match e {
            ureq::Error::Io(io) => {
                let addr = details
                    .addrs
                    .iter()
                    .next()
                    .map_or_else(|| details.uri.to_string(), |a| a.to_string());
                ureq::Error::Io(io::Error::new(
                    io.kind(),
                    format!("connect to {addr}: {io}"),
                ))
            }
            e => e,
        })
    }
}

/// Opens a stream socket to one fixed address for every connection ureq
/// asks for, whatever the request's URI says.
#[derive(Clone)]
pub struct StreamConnector {
    domain: Domain,
    addr: SockAddr,
    peer: String,
}

impl StreamConnector {
    /// A connector to vsock `cid`:`port`.
    pub fn vsock(cid: u32, port: u32) -> StreamConnector {
        StreamConnector {
            domain: Domain::VSOCK,
            addr: SockAddr::vsock(cid, port),
            peer: format!("vsock CID {cid} port {port}"),
        }
    }

    /// A connector to the Unix stream socket at `path`.
    pub fn unix(path: &Path) -> io::Result<StreamConnector> {
        Ok(StreamConnector {
            domain: Domain::UNIX,
            addr: SockAddr::unix(path)?,
            peer: format!("unix socket {}", path.display()),
        })
    }

    /// A connected socket, within `timeout`.
    fn open(&self, timeout: Option<Duration>) -> io::Result<Socket> {
        // socket2 opens it close-on-exec.
        let socket = Socket::new(self.domain, Type::STREAM, None).map_err(|e| {
            let why = if e.raw_os_error() == Some(Errno::AFNOSUPPORT.raw_os_error()) {
                "this kernel has no vsock support; load the vsock and \
                 vmw_vsock_virtio_transport modules"
            } else {
                "cannot create the socket"
            };
            io::Error::new(e.kind(), format!("{why} ({e})"))
        })?;
        let connected = match timeout {
            Some(t) => socket.connect_timeout(&self.addr, t),
            None => socket.connect(&self.addr),
        };
        connected.map_err(|e| {
            // ENODEV: the vsock core is there but no transport is (no vsock
            // device, or vmw_vsock_virtio_transport not loaded).
            let hint = if e.raw_os_error() == Some(Errno::NODEV.raw_os_error()) {
                "; does the VM have a vsock device and vmw_vsock_virtio_transport?"
            } else {
                ""
            };
            io::Error::new(e.kind(), format!("connect to {}: {e}{hint}", self.peer))
        })?;
        log::debug!("connected to {}", self.peer);
        Ok(socket)
    }
}

impl fmt::Debug for StreamConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamConnector")
            .field("peer", &self.peer)
            .finish()
    }
}

impl Connector<()> for StreamConnector {
    type Out = StreamTransport;

    fn connect(
        &self,
        details: &ConnectionDetails,
        _chained: Option<()>,
    ) -> Result<Option<StreamTransport>, ureq::Error> {
        let timeout = details.timeout.not_zero().map(|t| *t);
        let socket = self.open(timeout).map_err(|e| {
            if is_timeout(&e) {
                ureq::Error::Timeout(details.timeout.reason)
            } else {
                ureq::Error::Io(e)
            }
        })?;
        let config = details.config;
        Ok(Some(StreamTransport {
            socket,
            buffers: LazyBuffers::new(config.input_buffer_size(), config.output_buffer_size()),
            read_timeout: None,
            write_timeout: None,
        }))
    }
}

/// One open stream and ureq's buffers for it.
pub struct StreamTransport {
    socket: Socket,
    buffers: LazyBuffers,
    /// The socket timeouts last set, so that an unchanged one costs no call.
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl fmt::Debug for StreamTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamTransport").finish_non_exhaustive()
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The time left, or the timeout error once none is.
fn time_left(timeout: NextTimeout) -> Result<Option<Duration>, ureq::Error> {
    if timeout.after.is_zero() {
        return Err(ureq::Error::Timeout(timeout.reason));
    }
    Ok(timeout.not_zero().map(|t| *t))
}

/// An I/O error as ureq wants it: a timeout as its timeout.
fn io_error(e: io::Error, timeout: NextTimeout) -> ureq::Error {
    if is_timeout(&e) {
        ureq::Error::Timeout(timeout.reason)
    } else {
        ureq::Error::Io(e)
    }
}

impl Transport for StreamTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let timeout = timeout.for_write();
        let left = time_left(timeout)?;
        if left != self.write_timeout {
            self.socket.set_write_timeout(left)?;
            self.write_timeout = left;
        }
        let output = &self.buffers.output()[..amount];
        (&self.socket)
            .write_all(output)
            .map_err(|e| io_error(e, timeout))
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let timeout = timeout.for_read();
        let left = time_left(timeout)?;
        if left != self.read_timeout {
            self.socket.set_read_timeout(left)?;
            self.read_timeout = left;
        }
        let input = self.buffers.input_append_buf();
        let n = loop {
            match (&self.socket).read(input) {
                Ok(n) => break n,
                // A signal before any byte: the time left is still on the socket.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error(e, timeout)),
            }
        };
        self.buffers.input_appended(n);
        Ok(n > 0)
    }

    /// A kept connection is reused only when nothing is waiting on it: the
    /// peer closed it (a snapshot restore, a host-side restart), or sent
    /// bytes nobody asked for, which would otherwise be read as the answer
    /// to the next request. One non-blocking peek, no mode switch.
    fn is_open(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match rustix::net::recv(
            &self.socket,
            &mut byte,
            RecvFlags::PEEK | RecvFlags::DONTWAIT,
        ) {
            Err(Errno::AGAIN) => true,
            Ok(_) | Err(_) => false,
        }
    }
}
