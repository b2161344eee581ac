//! `uptime`: seconds since boot.

use procfs::{FromRead, ProcError, Uptime};

/// Parses the text of `uptime` into whole seconds since boot.
pub fn parse(text: &[u8]) -> Result<u64, ProcError> {
    Ok(Uptime::from_read(text)?.uptime as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_and_rejects() {
        assert_eq!(super::parse(b"12345.67 40000.10\n").unwrap(), 12345);
        assert!(super::parse(b"soon\n").is_err());
    }
}
