//! `loadavg`: the 1, 5 and 15 minute load averages.

use procfs::{FromRead, LoadAverage, ProcError};

/// Parses the text of `loadavg` into (1 min, 5 min, 15 min), as procfs
/// reads them (`f32`; the kernel prints two decimals).
pub fn parse(text: &[u8]) -> Result<[f32; 3], ProcError> {
    let l = LoadAverage::from_read(text)?;
    let load = [l.one, l.five, l.fifteen];
    // procfs reads `nan`, `inf` and `-1` as numbers; the kernel writes none
    // of them, and a NaN would go out as JSON null.
    if let Some(v) = load.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
        return Err(ProcError::Other(format!("load average {v} is not a count")));
    }
    Ok(load)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_and_rejects() {
        let l = super::parse(b"0.21 0.37 0.39 1/719 19737\n").unwrap();
        assert_eq!(l, [0.21f32, 0.37, 0.39]);
        assert!(super::parse(b"0.21 zero\n").is_err());
        for bad in ["nan 0.1 0.1", "0.1 inf 0.1", "0.1 0.1 -2.00"] {
            let e = super::parse(format!("{bad} 1/719 19737\n").as_bytes()).unwrap_err();
            assert!(e.to_string().contains("is not a count"), "{bad}: {e}");
        }
    }
}
