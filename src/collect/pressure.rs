//! `pressure/{cpu,memory,io}`: PSI "some" avg10, where the kernel has PSI.

use procfs::ProcError;

/// Parses a `pressure/*` file into its "some" avg10 (percent of the last
/// 10 s), as procfs reads it (`f32`; the kernel prints two decimals).
///
/// Only the first line is read: kernels before 5.13 have no "full" line in
/// `pressure/cpu`.
pub fn parse_some_avg10(text: &[u8]) -> Result<f32, ProcError> {
    let text = std::str::from_utf8(text).map_err(|e| ProcError::Other(e.to_string()))?;
    let first = text.lines().next().unwrap_or("");
    if !first.starts_with("some ") {
        return Err(ProcError::Other(format!("no \"some\" line: {first:?}")));
    }
    Ok(procfs::parse_pressure_record(first)?.avg10)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_some_avg10() {
        let text = b"some avg10=1.53 avg60=0.87 avg300=0.20 total=12345\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(super::parse_some_avg10(text).unwrap(), 1.53f32);
        // Linux < 5.13: pressure/cpu has only the "some" line.
        let old = b"some avg10=0.25 avg60=0.87 avg300=0.20 total=12345\n";
        assert_eq!(super::parse_some_avg10(old).unwrap(), 0.25f32);
        assert!(super::parse_some_avg10(b"some avg10=x\n").is_err());
        assert!(super::parse_some_avg10(b"").is_err());
    }
}
