//! `loadavg`: the 1, 5 and 15 minute load averages.

use procfs::{FromRead, LoadAverage, ProcError};

/// Parses the text of `loadavg` into (1 min, 5 min, 15 min), as procfs
/// reads them (`f32`; the kernel prints two decimals).
pub fn parse(text: &[u8]) -> Result<[f32; 3], ProcError> {
    let l = LoadAverage::from_read(text)?;
    Ok([l.one, l.five, l.fifteen])
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_and_rejects() {
        let l = super::parse(b"0.21 0.37 0.39 1/719 19737\n").unwrap();
        assert_eq!(l, [0.21f32, 0.37, 0.39]);
        assert!(super::parse(b"0.21 zero\n").is_err());
    }
}
