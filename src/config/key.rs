//! The VM's signing key (docs/security.md#key-delivery): from `key` in any
//! source or from `key_file`, whichever comes from the higher-precedence
//! source (`key` on a tie), and read again from where it came after the
//! manager refuses a signature or after a snapshot restore.
//!
//! A key file must be mode 0600 (or stricter): a key others in the guest
//! can read is refused, not merely warned about. A key without a `vm_id`
//! signs for nobody: that is a configuration error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Config, Origin, Source, mmds, settings};
use crate::error::{Error, Result};
use crate::sign::{Credentials, Key};

/// Largest key file read: one line `KID HEX` and some white space.
pub const MAX_KEY_FILE: u64 = 1024;

/// Where the key in use came from, so it can be read there again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFrom {
    /// `key` from this source (MMDS is read again; CLI, environment,
    /// cmdline and conf file cannot change while the agent runs).
    Setting(Source),
    /// `key_file` at this path, named by this source.
    File(PathBuf, Source),
}

/// The key the agent signs with, and where it came from.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    /// The VM's key.
    pub key: Key,
    /// Where it came from.
    pub from: KeyFrom,
}

impl KeyConfig {
    /// The source `--print-config` names.
    pub fn source(&self) -> Source {
        match self.from {
            KeyFrom::Setting(s) | KeyFrom::File(_, s) => s,
        }
    }
}

/// Reads a key file: one line `KID HEX`, refused unless only its owner
/// may read it.
pub fn read_key_file(path: &Path) -> std::result::Result<Key, String> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mode = file
        .metadata()
        .map_err(|e| e.to_string())?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "mode {:o} lets others than its owner read the key; refused (chmod 600)",
            mode & 0o777
        ));
    }
    let mut text = String::new();
    file.take(MAX_KEY_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_KEY_FILE {
        return Err(format!("larger than {MAX_KEY_FILE} bytes"));
    }
    Key::parse_line(text.trim())
}

/// The key from the settings' final values. A key file that cannot be used
/// is a usage error on the CLI, and elsewhere an error that falls back to
/// `key`; a key without a `vm_id` likewise.
pub fn resolve(
    origins: &[Origin],
    vm_id: Option<&str>,
    errors: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Result<Option<KeyConfig>> {
    let find = |name: &str| {
        origins
            .iter()
            .find(|o| o.setting.name == name && o.value.is_some())
    };
    let (inline, file) = (find("key"), find("key_file"));
    let inline_key = inline.and_then(|o| {
        let key = Key::parse_line(o.value.as_deref()?).ok()?;
        if o.source == Source::Cmdline {
            warnings.push(
                "key comes from the kernel cmdline, which every process in the guest can read; \
                 prefer MMDS or key_file (mode 0600) (docs/security.md#key-delivery)"
                    .into(),
            );
        }
        Some(KeyConfig {
            key,
            from: KeyFrom::Setting(o.source),
        })
    });
    let chosen = match file.filter(|f| inline.is_none_or(|k| f.source < k.source)) {
        None => inline_key,
        Some(f) => {
            let path = f.value.as_deref().unwrap_or_default();
            match read_key_file(Path::new(path)) {
                Ok(key) => Some(KeyConfig {
                    key,
                    from: KeyFrom::File(PathBuf::from(path), f.source),
                }),
                Err(e) => {
                    let msg = format!("{}: key_file {path:?}: {e}", f.source.as_str());
                    if f.source == Source::Cli {
                        return Err(Error::Usage(msg));
                    }
                    errors.push(msg);
                    inline_key
                }
            }
        }
    };
    let Some(chosen) = chosen else {
        return Ok(None);
    };
    if vm_id.is_none() {
        let msg = format!(
            "{}: a key is set but vm_id is not: a signature speaks for one VM (keyid KID/VM_ID); \
             set vm_id, or the manager refuses every push",
            chosen.source().as_str()
        );
        if chosen.source() == Source::Cli {
            return Err(Error::Usage(msg));
        }
        errors.push(msg);
        return Ok(None);
    }
    Ok(Some(chosen))
}

/// Reads the key again from where it came: the key file, or MMDS (with
/// the `vm_id` MMDS now gives, when it gives one). A key from a source that
/// cannot change while the agent runs is an error saying so.
pub fn reload(
    from: &KeyFrom,
    mmds_addr: Option<SocketAddr>,
) -> std::result::Result<(Key, Option<String>), String> {
    match from {
        KeyFrom::File(path, _) => read_key_file(path)
            .map(|k| (k, None))
            .map_err(|e| format!("key_file {}: {e}", path.display())),
        KeyFrom::Setting(Source::Mmds) => {
            let addr = mmds_addr.ok_or("mmds is off")?;
            let doc = mmds::fetch(addr).map_err(|e| e.to_string())?;
            let check = settings::setting("key").map(|s| s.check);
            let line = doc
                .entries
                .iter()
                .rev()
                .find(|(n, v)| *n == "key" && check.is_some_and(|c| c(v).is_ok()))
                .map(|(_, v)| v.clone())
                .ok_or("mmds: no valid key in the document any more")?;
            let key = Key::parse_line(&line)?;
            Ok((key, doc.vm_id()))
        }
        KeyFrom::Setting(s) => Err(format!(
            "the key comes from {}, which cannot change while the agent runs",
            s.as_str()
        )),
    }
}

/// What a client that talks to the manager needs to sign and to read its
/// key again: the credentials it signs with and where they came from.
#[derive(Debug, Clone)]
pub struct Signing {
    /// The VM id and key every request is signed with.
    pub credentials: Arc<Credentials>,
    from: KeyFrom,
    mmds: Option<SocketAddr>,
    /// Whether a `vm_id` from MMDS may replace the configured one (not
    /// when the CLI or the environment set it: they rank above MMDS).
    vm_id_from_mmds: bool,
}

impl Signing {
    /// Signing for `config`; `None` without a key (nothing is signed).
    pub fn new(config: &Config) -> Option<Signing> {
        let k = config.key.as_ref()?;
        let vm_id = config.vm_id.as_deref()?;
        let vm_id_from_mmds = config
            .origins
            .iter()
            .find(|o| o.setting.name == "vm_id")
            .is_none_or(|o| !matches!(o.source, Source::Cli | Source::Env));
        Some(Signing {
            credentials: Credentials::new(vm_id, k.key.clone()),
            from: k.from.clone(),
            mmds: config.mmds,
            vm_id_from_mmds,
        })
    }

    /// Reads the key again from where it came (after a 401 or a restore)
    /// and puts it in use. `Ok(true)` when the key or the VM id changed.
    pub fn reload(&self) -> std::result::Result<bool, String> {
        let (key, vm_id) = reload(&self.from, self.mmds)?;
        let vm_id = vm_id
            .filter(|_| self.vm_id_from_mmds)
            .unwrap_or_else(|| self.credentials.vm_id());
        Ok(self.credentials.replace(&vm_id, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, mode: u32, text: &str) -> PathBuf {
        let p = dir.join("key");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_key_file_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let line = format!("k1 {}\n", "ab".repeat(32));
        let p = write(dir.path(), 0o600, &line);
        assert_eq!(read_key_file(&p).unwrap().kid(), "k1");
        let p = write(dir.path(), 0o400, &line);
        assert!(read_key_file(&p).is_ok());
        let p = write(dir.path(), 0o644, &line);
        let e = read_key_file(&p).unwrap_err();
        assert!(e.contains("mode 644") && e.contains("refused"), "{e}");
        let p = write(dir.path(), 0o600, "k1 123\n");
        assert!(read_key_file(&p).is_err());
        assert!(read_key_file(&dir.path().join("none")).is_err());
    }

    #[test]
    fn a_key_from_an_unchanging_source_cannot_be_reloaded() {
        let e = reload(&KeyFrom::Setting(Source::Cli), None).unwrap_err();
        assert!(e.contains("cli"), "{e}");
    }
}
