//! `net/dev`: bytes received and sent, per interface and in all.

use procfs::{FromBufRead, ProcError, net::InterfaceDeviceStatus};

use crate::sample::detail::Interface;

/// What one read of `net/dev` gives.
#[derive(Debug, Clone, PartialEq)]
pub struct NetReading {
    /// Cumulative bytes received, every interface but `lo`, wrapping at
    /// 2^64 as the kernel's counters do, so that differences of two
    /// readings (modulo 2^64) stay right.
    pub rx_bytes: u64,
    /// Cumulative bytes sent, the same way.
    pub tx_bytes: u64,
    /// Every interface, `lo` included, by name.
    pub interfaces: Vec<Interface>,
}

/// Parses the text of `net/dev`.
pub fn parse(text: &[u8]) -> Result<NetReading, ProcError> {
    let devs = InterfaceDeviceStatus::from_buf_read(text)?;
    let (mut rx_bytes, mut tx_bytes) = (0u64, 0u64);
    let mut interfaces: Vec<Interface> = devs
        .0
        .into_values()
        .map(|d| {
            if d.name != "lo" {
                rx_bytes = rx_bytes.wrapping_add(d.recv_bytes);
                tx_bytes = tx_bytes.wrapping_add(d.sent_bytes);
            }
            Interface {
                receive: [d.recv_bytes, d.recv_packets, d.recv_errs, d.recv_drop],
                transmit: [d.sent_bytes, d.sent_packets, d.sent_errs, d.sent_drop],
                name: d.name,
                since_ms: None,
            }
        })
        .collect();
    // procfs hands them over in a hash map: in name order, every
    // exposition lists them the same way each time.
    interfaces.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    Ok(NetReading {
        rx_bytes,
        tx_bytes,
        interfaces,
    })
}

#[cfg(test)]
mod tests {
    const SAMPLE: &str = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 9999999   100    0    0    0     0          0         0  9999999   100    0    0    0     0       0          0
  eth0: 1000      10    1    2    0     0          0         0     2000      20    3    4    0     0       0          0
  eth1:  500       5    0    0    0     0          0         0       70       1    0    0    0     0       0          0
";

    #[test]
    fn sums_all_but_loopback_and_keeps_each() {
        let r = super::parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!((r.rx_bytes, r.tx_bytes), (1500, 2070));
        let names: Vec<&str> = r.interfaces.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["eth0", "eth1", "lo"]);
        assert_eq!(r.interfaces[0].receive, [1000, 10, 1, 2]);
        assert_eq!(r.interfaces[0].transmit, [2000, 20, 3, 4]);
    }

    #[test]
    fn malformed_line_is_an_error() {
        let bad = SAMPLE.replace("eth1:  500", "eth1:  5x0");
        assert!(super::parse(bad.as_bytes()).is_err());
    }
}
