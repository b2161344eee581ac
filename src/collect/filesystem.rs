//! The root filesystem's size and use, from statvfs (as `df` computes them).

use std::path::Path;

/// (total, used) KiB of the filesystem holding `path`; used counts blocks not
/// free, including those reserved for root, as `df` does.
pub fn usage(path: &Path) -> std::io::Result<(u64, u64)> {
    let s = rustix::fs::statvfs(path)?;
    let kib = |blocks: u64| blocks.saturating_mul(s.f_frsize) / 1024;
    Ok((kib(s.f_blocks), kib(s.f_blocks.saturating_sub(s.f_bfree))))
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_filesystem_has_a_size() {
        let (total, used) = super::usage(std::path::Path::new("/")).unwrap();
        assert!(total > 0 && used <= total);
    }
}
