//! `net/dev`: bytes received and sent, all interfaces but loopback.

use procfs::{FromRead, ProcError, net::InterfaceDeviceStatus};

/// Cumulative (rx, tx) bytes summed over every interface except `lo`,
/// wrapping at 2^64 as the kernel's counters do, so that differences of two
/// readings (modulo 2^64) stay right.
pub fn parse(text: &[u8]) -> Result<(u64, u64), ProcError> {
    let devs = InterfaceDeviceStatus::from_read(text)?;
    Ok(devs
        .0
        .values()
        .filter(|d| d.name != "lo")
        .fold((0, 0), |(rx, tx), d| {
            (rx.wrapping_add(d.recv_bytes), tx.wrapping_add(d.sent_bytes))
        }))
}

#[cfg(test)]
mod tests {
    const SAMPLE: &str = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 9999999   100    0    0    0     0          0         0  9999999   100    0    0    0     0       0          0
  eth0: 1000      10    0    0    0     0          0         0     2000      20    0    0    0     0       0          0
  eth1:  500       5    0    0    0     0          0         0       70       1    0    0    0     0       0          0
";

    #[test]
    fn sums_all_but_loopback() {
        assert_eq!(super::parse(SAMPLE.as_bytes()).unwrap(), (1500, 2070));
    }

    #[test]
    fn malformed_line_is_an_error() {
        let bad = SAMPLE.replace("eth1:  500", "eth1:  5x0");
        assert!(super::parse(bad.as_bytes()).is_err());
    }
}
