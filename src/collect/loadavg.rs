//! `loadavg`: the 1, 5 and 15 minute load averages.

use procfs::{FromRead, LoadAverage, ProcError};

use super::round2;

/// Parses the text of `loadavg` into (1 min, 5 min, 15 min).
pub fn parse(text: &[u8]) -> Result<[f64; 3], ProcError> {
    let l = LoadAverage::from_read(text)?;
    Ok([round2(l.one), round2(l.five), round2(l.fifteen)])
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_and_rejects() {
        let l = super::parse(b"0.21 0.37 0.39 1/719 19737\n").unwrap();
        assert_eq!(l, [0.21, 0.37, 0.39]);
        assert!(super::parse(b"0.21 zero\n").is_err());
    }
}
