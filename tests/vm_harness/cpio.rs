//! A writer for the "newc" cpio format the kernel unpacks as an initramfs.
//!
//! The archive is left uncompressed on purpose: under TCG the kernel's gunzip
//! of a few MiB costs more boot time than QEMU's copy of the raw bytes.

/// An archive being built in memory.
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;
const S_IFLNK: u32 = 0o120000;

impl Cpio {
    pub fn new() -> Cpio {
        Cpio {
            out: Vec::new(),
            ino: 1,
        }
    }

    pub fn dir(&mut self, path: &str) {
        self.entry(path, S_IFDIR | 0o755, 2, (0, 0), &[]);
    }

    /// A directory with its own permissions (`0o1777` for `/tmp`).
    #[allow(dead_code)] // used by the systemd image only
    pub fn dir_mode(&mut self, path: &str, perm: u32) {
        self.entry(path, S_IFDIR | perm, 2, (0, 0), &[]);
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.entry(path, S_IFREG | perm, 1, (0, 0), data);
    }

    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.entry(path, S_IFCHR | perm, 1, (major, minor), &[]);
    }

    /// A symbolic link at `path` pointing to `target`.
    #[allow(dead_code)] // used by the OpenRC image only
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes());
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        // The kernel reads archives in 512-byte blocks like cpio(1) writes them.
        while !self.out.len().is_multiple_of(512) {
            self.out.push(0);
        }
        self.out
    }

    fn entry(&mut self, path: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        let name = path.trim_start_matches('/');
        let ino = self.ino;
        self.ino += 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so the archive is reproducible
            u32::try_from(data.len()).expect("file under 4 GiB"),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).expect("short name"),
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad4();
        self.out.extend_from_slice(data);
        self.pad4();
    }

    fn pad4(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
}

#[test]
fn newc_entries_are_aligned_and_terminated() {
    let mut c = Cpio::new();
    c.file("/init", 0o755, b"#!/bin/sh\n");
    let bytes = c.finish();
    let field = |entry: usize, n: usize| {
        let at = entry + 6 + 8 * n;
        u32::from_str_radix(std::str::from_utf8(&bytes[at..at + 8]).unwrap(), 16).unwrap()
    };
    // First entry: header (110 bytes), "init\0" padded to 116, 10 data bytes
    // padded to 128, where the trailer's header starts.
    assert_eq!(&bytes[..6], b"070701");
    assert_eq!(field(0, 1), 0o100755);
    assert_eq!(field(0, 6), 10);
    assert_eq!(field(0, 11), 5);
    assert_eq!(&bytes[110..115], b"init\0");
    assert_eq!(&bytes[116..126], b"#!/bin/sh\n");
    assert_eq!(&bytes[128..134], b"070701");
    assert_eq!(&bytes[238..249], b"TRAILER!!!\0");
    assert_eq!(bytes.len() % 512, 0);
}
