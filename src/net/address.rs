//! The guest's own address toward a peer: the source address the kernel
//! picks for it, asked of the routing table with a connected UDP socket,
//! which sends no packet.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use crate::error::{Error, Result};

/// The local address the kernel would use toward `target`.
pub fn source_address(target: SocketAddr) -> Result<IpAddr> {
    let any: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let net_err = |e: std::io::Error| Error::Network {
        target: target.to_string(),
        reason: format!("no route for the source address: {e}"),
    };
    let sock = UdpSocket::bind(any).map_err(net_err)?;
    sock.connect(target).map_err(net_err)?;
    Ok(sock.local_addr().map_err(net_err)?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_address_toward_loopback_is_loopback() {
        let ip = source_address("127.0.0.1:9".parse().unwrap()).unwrap();
        assert_eq!(ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
}
