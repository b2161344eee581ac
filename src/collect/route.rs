//! `net/route`: the default gateway, which a push URL's `{gateway}` stands
//! for (docs/design.md#configuration).

use std::net::Ipv4Addr;
use std::path::Path;

use procfs::{FromRead, net::RouteEntries};

use super::proc_file::ProcFile;
use crate::error::Result;

const RTF_UP: u16 = 0x1;
const RTF_GATEWAY: u16 = 0x2;

/// The default gateway in `<proc_root>/net/route`: among routes with
/// destination 0, mask 0 and flags UP|GATEWAY, the lowest metric (the first
/// on a tie). `Ok(None)` when there is no default route, a normal state at boot.
pub fn default_gateway(proc_root: &Path) -> Result<Option<Ipv4Addr>> {
    ProcFile::new(proc_root, "net/route").parse(parse_default_gateway)
}

/// Parses a route table's text into its default gateway (see [`default_gateway`]).
pub fn parse_default_gateway(
    text: &[u8],
) -> std::result::Result<Option<Ipv4Addr>, procfs::ProcError> {
    let routes = RouteEntries::from_read(text)?;
    let mut best: Option<(u32, Ipv4Addr)> = None;
    for r in &routes.0 {
        let default = r.destination.is_unspecified() && r.mask.is_unspecified();
        let up_gw = r.flags & (RTF_UP | RTF_GATEWAY) == RTF_UP | RTF_GATEWAY;
        if default && up_gw && best.is_none_or(|(m, _)| r.metrics < m) {
            best = Some((r.metrics, r.gateway));
        }
    }
    Ok(best.map(|(_, g)| g))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";

    fn table(rows: &[&str]) -> String {
        let mut s = HEADER.to_string();
        for r in rows {
            s.push_str(r);
            s.push('\n');
        }
        s
    }

    fn gw(rows: &[&str]) -> Option<Ipv4Addr> {
        parse_default_gateway(table(rows).as_bytes()).unwrap()
    }

    #[test]
    fn qemu_user_network_gateway() {
        let t = [
            "eth0\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\t0\t0\t0",
            "eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0",
        ];
        assert_eq!(gw(&t), Some(Ipv4Addr::new(10, 0, 2, 2)));
    }

    #[test]
    fn lowest_metric_wins_first_on_tie() {
        let t = [
            "eth0\t00000000\t0100007F\t0003\t0\t0\t600\t00000000\t0\t0\t0",
            "eth1\t00000000\t0200007F\t0003\t0\t0\t100\t00000000\t0\t0\t0",
            "eth2\t00000000\t0300007F\t0003\t0\t0\t100\t00000000\t0\t0\t0",
        ];
        assert_eq!(gw(&t), Some(Ipv4Addr::new(127, 0, 0, 2)));
    }

    #[test]
    fn down_routes_host_routes_and_non_gateway_routes_are_skipped() {
        let t = [
            // down (flags lack RTF_UP)
            "eth0\t00000000\t0100007F\t0002\t0\t0\t0\t00000000\t0\t0\t0",
            // default destination but no RTF_GATEWAY
            "eth0\t00000000\t0200007F\t0001\t0\t0\t0\t00000000\t0\t0\t0",
            // host route with a gateway
            "eth0\t0900007F\t0300007F\t0007\t0\t0\t0\tFFFFFFFF\t0\t0\t0",
        ];
        assert_eq!(gw(&t), None);
    }

    #[test]
    fn no_routes_at_all() {
        assert_eq!(gw(&[]), None);
    }

    #[test]
    fn malformed_line_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net")).unwrap();
        std::fs::write(
            dir.path().join("net/route"),
            table(&["eth0\tzz\t0100007F\t0003"]),
        )
        .unwrap();
        let err = default_gateway(dir.path()).unwrap_err();
        assert!(err.to_string().contains("net/route"), "{err}");
    }
}
