//! Files added to the shared initramfs for one test: a second "newc"
//! archive appended to the first, which the kernel unpacks over it (as it
//! does early microcode), so the base image stays built once.
// Used by some of the test crates that include the harness, not all.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use super::assets::Assets;
use super::cpio::Cpio;

/// The base initramfs with `files` (`(path, mode, content)`) added; written
/// to the asset cache, named by content.
pub fn with_files(
    assets: &Assets,
    base: &Path,
    files: &[(&str, u32, &[u8])],
) -> Result<PathBuf, String> {
    let mut bytes =
        std::fs::read(base).map_err(|e| format!("cannot read {}: {e}", base.display()))?;
    let mut c = Cpio::new();
    for (path, mode, content) in files {
        c.file(path, *mode, content);
    }
    bytes.extend_from_slice(&c.finish());
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let image = assets.cache.join(format!("initramfs-{hash:016x}.cpio"));
    if !image.is_file() {
        let tmp = image.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &image)
            .map_err(|e| format!("cannot write {}: {e}", image.display()))?;
    }
    Ok(image)
}
