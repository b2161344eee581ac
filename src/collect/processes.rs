//! The number of processes: numeric entries of the proc root.

use std::path::Path;

/// Counts the entries of `root` whose names are all digits (one per process).
pub fn count(root: &Path) -> std::io::Result<u64> {
    let mut n = 0;
    for entry in std::fs::read_dir(root)? {
        let name = entry?.file_name();
        let name = name.as_encoded_bytes();
        if !name.is_empty() && name.iter().all(u8::is_ascii_digit) {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_only_numeric_entries() {
        let dir = std::env::temp_dir().join(format!("ga-procs-{}", std::process::id()));
        for d in ["1", "42", "self", "net", "1x"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        assert_eq!(super::count(&dir).unwrap(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
