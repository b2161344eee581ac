//! `/etc/guest-agent.conf`, the file the existing manager installer writes:
//! `VM_ID=…` and `MANAGER_URL=http://host:port` (a base URL; the ingest path
//! is appended). Any setting may also be given by its environment name
//! (`GUEST_AGENT_INTERVAL=10s`), as in the OpenRC conf.d file.

use std::path::Path;

use super::settings::SETTINGS;

/// The default path of the file.
pub const DEFAULT_PATH: &str = "/etc/guest-agent.conf";

/// The ingest path appended to `MANAGER_URL`.
pub const INGEST_PATH: &str = "/v1/guest-metrics";

/// Largest file accepted; anything bigger is not a settings file.
pub const MAX_FILE_SIZE: u64 = 64 * 1024;

/// What the file says: `(key as written, setting name, value)` entries, and
/// the problems found (bad lines, unknown keys) as messages naming the file
/// and line.
#[derive(Debug, Default)]
pub struct FileValues {
    /// Entries in file order.
    pub entries: Vec<(String, &'static str, String)>,
    /// Lines that could not be understood.
    pub errors: Vec<String>,
    /// Keys that are not settings.
    pub warnings: Vec<String>,
    /// What `MANAGER_URL` implies besides the push URL: the pull-model
    /// manager's listener and guest-address report (docs/manager.md). Offered
    /// before [`FileValues::entries`], so a key written in the file wins.
    pub implied: Vec<(String, &'static str, String)>,
}

/// The listener address `MANAGER_URL` implies: where the pull-model
/// manager fetches `/metrics` (docs/manager.md).
pub const MANAGER_LISTEN: &str = "0.0.0.0:9000";

/// Reads the file. A missing file gives no entries and no error (the normal
/// case); an unreadable or oversized one is an error naming it.
pub fn read(path: &Path) -> Result<FileValues, String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileValues::default()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    if meta.len() > MAX_FILE_SIZE {
        return Err(format!(
            "cannot read {}: larger than {MAX_FILE_SIZE} bytes",
            path.display()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(parse(&String::from_utf8_lossy(&bytes), path))
}

/// Parses the file's text (shell-like `KEY=value` lines, `#` comments,
/// optional `export` and quotes).
pub fn parse(text: &str, path: &Path) -> FileValues {
    let mut out = FileValues::default();
    for (n, line) in text.lines().enumerate() {
        let where_ = format!("{}:{}", path.display(), n + 1);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((key, value)) = line.split_once('=') else {
            out.errors
                .push(format!("{where_}: expected KEY=value, found {line:?}"));
            continue;
        };
        let key = key.trim();
        let value = unquote(value.trim());
        let name = match key {
            "VM_ID" => Some("vm_id"),
            "MANAGER_URL" => Some("url"),
            _ => SETTINGS.iter().find(|s| s.env() == key).map(|s| s.name),
        };
        match name {
            Some("url") if key == "MANAGER_URL" => {
                let base = value.trim_end_matches('/');
                out.entries
                    .push((key.to_string(), "url", format!("{base}{INGEST_PATH}")));
                out.implied = vec![
                    (key.to_string(), "listen", MANAGER_LISTEN.to_string()),
                    (key.to_string(), "manager_url", base.to_string()),
                ];
            }
            Some(name) => out.entries.push((key.to_string(), name, value.to_string())),
            None => out
                .warnings
                .push(format!("{where_}: unknown key {key:?} ignored")),
        }
    }
    out
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return &v[1..v.len() - 1];
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installer_file_and_env_names() {
        let text = "# written by the installer\nVM_ID=vm-42\nMANAGER_URL=\"http://127.0.0.9:18080/\"\n\nexport GUEST_AGENT_INTERVAL='10s'\nCOLOR=blue\nnonsense\n";
        let v = parse(text, Path::new("/etc/guest-agent.conf"));
        assert_eq!(
            v.entries,
            vec![
                ("VM_ID".into(), "vm_id", "vm-42".into()),
                (
                    "MANAGER_URL".into(),
                    "url",
                    "http://127.0.0.9:18080/v1/guest-metrics".into()
                ),
                ("GUEST_AGENT_INTERVAL".into(), "interval", "10s".into()),
            ]
        );
        assert_eq!(v.warnings.len(), 1);
        assert!(v.warnings[0].contains("/etc/guest-agent.conf:6"));
        assert_eq!(v.errors.len(), 1);
        assert!(v.errors[0].contains(":7"));
    }

    #[test]
    fn manager_url_implies_the_pull_listener_and_the_address_report() {
        let v = parse(
            "VM_ID=v\nMANAGER_URL=http://10.0.0.1:18080/\n",
            Path::new("f"),
        );
        assert_eq!(
            v.implied,
            vec![
                ("MANAGER_URL".into(), "listen", MANAGER_LISTEN.into()),
                (
                    "MANAGER_URL".into(),
                    "manager_url",
                    "http://10.0.0.1:18080".into()
                ),
            ]
        );
        assert!(parse("VM_ID=v\n", Path::new("f")).implied.is_empty());
    }

    #[test]
    fn missing_file_is_normal_unreadable_is_an_error() {
        let v = read(Path::new("/nonexistent/guest-agent.conf")).unwrap();
        assert!(v.entries.is_empty() && v.errors.is_empty());
        let dir = std::env::temp_dir();
        let err = read(&dir.join(".")).unwrap_err();
        assert!(err.contains(&dir.display().to_string()), "{err}");
    }
}
