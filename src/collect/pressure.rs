//! `pressure/{cpu,memory,io}`: PSI, where the kernel has it.

use procfs::{PressureRecord, ProcError};

use crate::sample::detail::{Pressure, Stall};

/// Parses a `pressure/*` file: its `some` line, and its `full` line when
/// there is one (kernels before 5.13 have none in `pressure/cpu`).
pub fn parse(text: &[u8]) -> Result<Pressure, ProcError> {
    let text = std::str::from_utf8(text).map_err(|e| ProcError::Other(e.to_string()))?;
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("");
    if !first.starts_with("some ") {
        return Err(ProcError::Other(format!("no \"some\" line: {first:?}")));
    }
    let some = stall(procfs::parse_pressure_record(first)?)?;
    let full = match lines.next() {
        Some(l) if l.starts_with("full ") => Some(stall(procfs::parse_pressure_record(l)?)?),
        _ => None,
    };
    Ok(Pressure { some, full })
}

/// A stall line whose averages are shares of time, 0–100: anything else
/// (procfs reads `nan`, `inf` or `630` as a number) is not the kernel's
/// and would reach every output as a percentage.
fn stall(r: PressureRecord) -> Result<Stall, ProcError> {
    let avg = [r.avg10, r.avg60, r.avg300].map(f64::from);
    if let Some(v) = avg.iter().find(|v| !(0.0..=100.0).contains(*v)) {
        return Err(ProcError::Other(format!("average {v} is not a percentage")));
    }
    Ok(Stall {
        avg,
        total_us: r.total,
    })
}

#[cfg(test)]
mod tests {
    // Found by the fuzz target `proc` (docs/testing.md#fuzzing).
    #[test]
    fn an_average_that_is_no_percentage_is_an_error() {
        for bad in ["630.00", "nan", "inf", "-1.00"] {
            let text = format!("some avg10=1.21 avg60={bad} avg300=0.06 total=312907\n");
            let e = super::parse(text.as_bytes()).unwrap_err().to_string();
            assert!(e.contains("is not a percentage"), "{bad}: {e}");
        }
    }

    #[test]
    fn parses_some_and_full() {
        let text = b"some avg10=1.53 avg60=0.87 avg300=0.20 total=12345\nfull avg10=0.50 avg60=0.00 avg300=0.00 total=678\n";
        let p = super::parse(text).unwrap();
        assert_eq!(p.some.avg[0] as f32, 1.53);
        assert_eq!(p.some.total_us, 12345);
        assert_eq!(p.full.map(|f| f.total_us), Some(678));
        // Linux < 5.13: pressure/cpu has only the "some" line.
        let old = b"some avg10=0.25 avg60=0.87 avg300=0.20 total=12345\n";
        let p = super::parse(old).unwrap();
        assert_eq!((p.some.avg[0] as f32, p.full), (0.25, None));
        assert!(super::parse(b"some avg10=x\n").is_err());
        assert!(super::parse(b"").is_err());
        assert!(super::parse(b"full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n").is_err());
    }
}
