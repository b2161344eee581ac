//! The root filesystem: its size and use from statvfs (as `df` computes
//! them), and what is mounted there, from `mounts`.

use std::path::Path;

use procfs::{FromBufRead, MountEntry, ProcError};

/// What statvfs says of the filesystem holding a path, in bytes and inodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Size.
    pub size: u64,
    /// Free, the root-reserved blocks included.
    pub free: u64,
    /// Free for unprivileged users.
    pub avail: u64,
    /// Inodes.
    pub files: u64,
    /// Free inodes.
    pub files_free: u64,
}

impl Usage {
    /// (total, used) KiB; used counts blocks not free, including those
    /// reserved for root, as `df` does.
    pub fn kib(&self) -> (u64, u64) {
        (self.size / 1024, self.size.saturating_sub(self.free) / 1024)
    }
}

/// The statvfs figures of the filesystem holding `path`.
pub fn usage(path: &Path) -> std::io::Result<Usage> {
    let s = rustix::fs::statvfs(path)?;
    let bytes = |blocks: u64| blocks.saturating_mul(s.f_frsize);
    Ok(Usage {
        size: bytes(s.f_blocks),
        free: bytes(s.f_bfree),
        avail: bytes(s.f_bavail),
        files: s.f_files,
        files_free: s.f_ffree,
    })
}

/// The device and type mounted at `/` in the text of `mounts`: the last
/// such line, since a later mount over `/` hides an earlier one. `None`
/// when nothing is.
pub fn root_mount(text: &[u8]) -> Result<Option<(String, String)>, ProcError> {
    let mounts = Vec::<MountEntry>::from_buf_read(text)?;
    Ok(mounts
        .into_iter()
        .rev()
        .find(|m| m.fs_file == "/")
        .map(|m| (m.fs_spec, m.fs_vfstype)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_filesystem_has_a_size() {
        let u = usage(Path::new("/")).unwrap();
        let (total, used) = u.kib();
        assert!(total > 0 && used <= total);
        assert!(u.avail <= u.free && u.free <= u.size);
    }

    #[test]
    fn the_last_mount_over_root_wins() {
        let text =
            b"rootfs / rootfs rw 0 0\n/dev/vda / ext4 rw,relatime 0 0\nproc /proc proc rw 0 0\n";
        assert_eq!(
            root_mount(text).unwrap(),
            Some(("/dev/vda".into(), "ext4".into()))
        );
        assert_eq!(root_mount(b"proc /proc proc rw 0 0\n").unwrap(), None);
        assert!(root_mount(b"/dev/vda / ext4 rw x y\n").is_err());
    }
}
