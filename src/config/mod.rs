//! Configuration (docs/design.md#configuration): each source is collected as written, then the
//! sources are merged by precedence (CLI > environment > MMDS > kernel
//! cmdline > file > default) and validated once into a typed [`Config`].
//! MMDS is opt-in and ranks above the cmdline and the file because clones
//! of one snapshot share those (docs/snapshots.md#mmds-identity-per-clone).
//!
//! A bad value on the CLI is a usage error (exit 2). A bad value from any
//! other source is recorded in [`Config::errors`] (logged, and shown in
//! `/health`) and the next source's value is used: a typo in boot args must
//! not kill monitoring.

pub mod cli;
pub mod cmdline;
pub mod file;
pub mod key;
pub mod mmds;
pub mod settings;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::collect::proc_file::ProcFile;
use crate::collect::{meminfo, route};
use crate::error::{Error, Result};
use crate::net::url::{Target, UrlTemplate};
use settings::{SETTINGS, Setting};

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// A command-line flag.
    Cli,
    /// A `GUEST_AGENT_*` environment variable.
    Env,
    /// Firecracker's metadata service, opted into with `mmds`.
    Mmds,
    /// A `guest_agent.*` kernel parameter.
    Cmdline,
    /// The configuration file.
    File,
    /// The built-in default.
    Default,
}

impl Source {
    /// The name shown by `--print-config` and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cli => "cli",
            Source::Env => "env",
            Source::Mmds => "mmds",
            Source::Cmdline => "cmdline",
            Source::File => "file",
            Source::Default => "default",
        }
    }
}

/// The body format of pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A JSON array of samples (docs/design.md#the-sample).
    Json,
    /// Influx line protocol, measurement `guest`.
    Influx,
    /// OTLP/HTTP, an ExportMetricsServiceRequest in the protobuf JSON
    /// mapping (docs/backends.md#opentelemetry).
    Otlp,
}

impl Format {
    /// Whether its bodies carry the figures behind the sample's totals
    /// (per CPU, interface, disk): the buffer keeps them for it.
    pub fn needs_detail(self) -> bool {
        self == Format::Otlp
    }

    /// The most samples one request carries, whatever `batch` says: an OTLP
    /// sample is about 24 KB (a data point per CPU mode, interface and disk
    /// counter), so 10 keep a body near 250 KB, as a JSON batch of 100 is
    /// near 100 KB. The body buffer grows to the largest body sent.
    pub fn max_batch(self) -> usize {
        match self {
            Format::Otlp => 10,
            Format::Json | Format::Influx => usize::MAX,
        }
    }
}

/// A value that must never be printed: `Debug` shows only whether it is set.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(set)")
    }
}

/// The value a setting ended with and where it came from.
#[derive(Clone)]
pub struct Origin {
    /// The setting.
    pub setting: &'static Setting,
    /// The value as written in its source; `None` when unset (no default).
    pub value: Option<String>,
    /// Its source.
    pub source: Source,
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A secret's value (token, key) is never shown, not even in a
        // debug print of the configuration.
        let value = match (&self.value, self.setting.secret) {
            (Some(_), true) => Some("<hidden>"),
            (v, _) => v.as_deref(),
        };
        f.debug_struct("Origin")
            .field("setting", &self.setting.name)
            .field("value", &value)
            .field("source", &self.source)
            .finish()
    }
}

/// The validated settings of one agent process.
#[derive(Debug, Clone)]
pub struct Config {
    /// Push target; `None` when pushing is off.
    pub url: Option<UrlTemplate>,
    /// Time between samples.
    pub interval: Duration,
    /// Listener address; `None` when the listener is off.
    pub listen: Option<SocketAddr>,
    /// This VM's id.
    pub vm_id: Option<String>,
    /// Deadline of one whole push request.
    pub timeout: Duration,
    /// Samples kept while pushes fail.
    pub buffer: usize,
    /// Bytes those samples may take: [`settings::BUFFER_MAX_BYTES`], or a
    /// share of the guest's memory when that is less.
    pub buffer_max_bytes: usize,
    /// Most samples per POST.
    pub batch: usize,
    /// How long a sample may be held to share a POST with the next ones;
    /// `None`: each is pushed as it comes.
    pub flush: Option<Duration>,
    /// Log level.
    pub log: log::LevelFilter,
    /// Where /proc is.
    pub proc_root: PathBuf,
    /// Where /sys is.
    pub sys_root: PathBuf,
    /// Push body format.
    pub format: Format,
    /// Bearer token for pushes, from `token` or `token_file`.
    pub token: Option<Secret>,
    /// Where the guest's address is reported, for a manager that pulls
    /// (docs/manager.md); `None` when off.
    pub manager_url: Option<UrlTemplate>,
    /// The MMDS address, when MMDS is a source.
    pub mmds: Option<SocketAddr>,
    /// The kernel log watched for snapshot restores; `None` when off.
    pub kmsg: Option<PathBuf>,
    /// The VM's signing key, from `key` or `key_file` (docs/security.md).
    pub key: Option<key::KeyConfig>,
    /// Every setting's final value and source, in table order.
    pub origins: Vec<Origin>,
    /// Bad values from the environment, cmdline or file (each was skipped).
    pub errors: Vec<String>,
    /// Things worth knowing but harmless (unknown keys).
    pub warnings: Vec<String>,
}

/// One value offered for a setting by one source.
struct Offer {
    source: Source,
    key: String,
    value: String,
}

/// Resolves the configuration from CLI values, an environment, and the
/// files they point at (cmdline under the proc root, the config file).
///
/// `cli` holds `(setting name, value)` pairs already split from the flags.
/// Returns a usage error only for bad CLI values.
pub fn resolve(
    cli: &[(&'static str, String)],
    env: &[(String, String)],
    config_path: Option<&Path>,
) -> Result<Config> {
    let mut offers: Vec<(&'static str, Offer)> = Vec::new();
    let mut errors = Vec::new();
    let mut warnings = Vec::new();

    for (name, value) in cli {
        let flag = settings::setting(name).map_or_else(|| name.to_string(), |s| s.flag());
        offers.push((name, offer(Source::Cli, flag, value)));
    }
    for s in SETTINGS {
        let key = s.env();
        if let Some((_, v)) = env.iter().rev().find(|(k, _)| *k == key) {
            offers.push((s.name, offer(Source::Env, key, v)));
        }
    }

    // The cmdline lives under the proc root, which only the CLI, the
    // environment or the default can set.
    let proc_root = settings::setting("proc_root")
        .and_then(|s| first_valid(s, &offers).0)
        .map_or_else(|| PathBuf::from("/proc"), |(v, _)| PathBuf::from(v));
    let cmdline_path = proc_root.join("cmdline");
    match std::fs::read(&cmdline_path) {
        Ok(bytes) => {
            for p in cmdline::params(&String::from_utf8_lossy(&bytes)) {
                match (settings::setting(&p.name), p.value) {
                    (Some(s), Some(v)) if s.on_cmdline => {
                        offers.push((s.name, offer(Source::Cmdline, p.written, &v)))
                    }
                    (Some(s), None) if s.on_cmdline => errors.push(format!(
                        "cmdline: {} has no value; expected {}={}",
                        p.written, p.written, s.value_name
                    )),
                    _ => warnings.push(format!("cmdline: unknown parameter {} ignored", p.written)),
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(format!("cannot read {}: {e}", cmdline_path.display())),
    }

    let path = config_path.unwrap_or(Path::new(file::DEFAULT_PATH));
    match file::read(path) {
        Ok(f) => {
            for (key, name, value) in f.implied.into_iter().chain(f.entries) {
                offers.push((name, offer(Source::File, key, &value)));
            }
            errors.extend(f.errors);
            warnings.extend(f.warnings);
        }
        Err(e) => errors.push(e),
    }

    // MMDS is asked only when a source above opted into it.
    let mmds_addr = settings::setting("mmds")
        .and_then(|s| first_valid(s, &offers).0)
        .and_then(|(v, _)| settings::parse_mmds(&v).ok().flatten());
    if let Some(addr) = mmds_addr {
        match mmds::fetch(addr) {
            Ok(doc) => {
                for (name, value) in doc.entries {
                    let key = format!("{}.{name}", mmds::KEY);
                    offers.push((name, offer(Source::Mmds, key, &value)));
                }
                warnings.extend(doc.warnings);
            }
            Err(e) => errors.push(format!("{e}; going on without MMDS settings")),
        }
    }

    let mut origins = Vec::new();
    for s in SETTINGS {
        let (chosen, rejected) = first_valid(s, &offers);
        for (src, msg) in rejected {
            if src == Source::Cli {
                return Err(Error::Usage(msg));
            }
            errors.push(msg);
        }
        let (value, source) = match chosen {
            Some((v, src)) => (Some(v), src),
            None => (s.default.map(str::to_string), Source::Default),
        };
        origins.push(Origin {
            setting: s,
            value,
            source,
        });
    }
    build(origins, errors, warnings)
}

fn offer(source: Source, key: String, value: &str) -> Offer {
    Offer {
        source,
        key,
        value: value.to_string(),
    }
}

/// A chosen `(value, source)`, if any, and the `(source, message)` of every
/// offer rejected on the way.
type Choice = (Option<(String, Source)>, Vec<(Source, String)>);

/// The highest-precedence offer for `s` that passes its check (within one
/// source the last offer wins, as on a kernel cmdline), and a message for
/// every rejected offer above it.
fn first_valid(s: &'static Setting, offers: &[(&'static str, Offer)]) -> Choice {
    let mut rejected = Vec::new();
    for src in [
        Source::Cli,
        Source::Env,
        Source::Mmds,
        Source::Cmdline,
        Source::File,
    ] {
        let Some((_, o)) = offers
            .iter()
            .rev()
            .find(|(n, o)| *n == s.name && o.source == src)
        else {
            continue;
        };
        match (s.check)(&o.value) {
            Ok(()) => return (Some((o.value.clone(), src)), rejected),
            Err(expected) => {
                let shown = if s.secret {
                    "<hidden>"
                } else {
                    o.value.as_str()
                };
                rejected.push((
                    src,
                    format!(
                        "{}: invalid {} value {shown:?}: expected {expected}",
                        src.as_str(),
                        o.key
                    ),
                ));
            }
        }
    }
    (None, rejected)
}

/// Turns checked values into typed ones. The checks already passed, so a
/// failure here is a bug in the table; it is still reported, not panicked.
fn build(origins: Vec<Origin>, errors: Vec<String>, warnings: Vec<String>) -> Result<Config> {
    let get = |name: &str| -> Option<&str> {
        origins
            .iter()
            .find(|o| o.setting.name == name)
            .and_then(|o| o.value.as_deref())
    };
    let internal = |name: &str, e: String| Error::Usage(format!("setting {name}: {e}"));
    let dur = |name: &str, min, max| {
        settings::parse_duration(get(name).unwrap_or(""), min, max).map_err(|e| internal(name, e))
    };
    let count = |name: &str, max| {
        settings::parse_count(get(name).unwrap_or(""), max).map_err(|e| internal(name, e))
    };
    let url = match get("url") {
        None | Some("off") => None,
        Some(u) => Some(UrlTemplate::parse(u).map_err(|e| internal("url", e))?),
    };
    let mut errors = errors;
    let mut warnings = warnings;
    let token = token(&origins, &mut errors, &mut warnings)?;
    let key = key::resolve(&origins, get("vm_id"), &mut errors, &mut warnings)?;
    let proc_root = PathBuf::from(get("proc_root").unwrap_or("/proc"));
    Ok(Config {
        buffer_max_bytes: buffer_max_bytes(&proc_root),
        url,
        interval: dur("interval", settings::MIN_INTERVAL, settings::MAX_INTERVAL)?,
        listen: settings::parse_listen(get("listen").unwrap_or("off"))
            .map_err(|e| internal("listen", e))?,
        vm_id: get("vm_id").map(str::to_string),
        timeout: dur("timeout", settings::MIN_TIMEOUT, settings::MAX_TIMEOUT)?,
        buffer: count("buffer", settings::MAX_BUFFER)?,
        batch: count("batch", settings::MAX_BATCH)?,
        flush: settings::parse_flush(get("flush").unwrap_or("off"))
            .map_err(|e| internal("flush", e))?,
        log: settings::parse_log(get("log").unwrap_or("info")).map_err(|e| internal("log", e))?,
        proc_root,
        sys_root: PathBuf::from(get("sys_root").unwrap_or(crate::collect::DEFAULT_SYS_ROOT)),
        format: match get("format") {
            Some("influx") => Format::Influx,
            Some("otlp") => Format::Otlp,
            _ => Format::Json,
        },
        token,
        manager_url: match get("manager_url") {
            None | Some("off") => None,
            Some(u) => Some(UrlTemplate::parse(u).map_err(|e| internal("manager_url", e))?),
        },
        mmds: settings::parse_mmds(get("mmds").unwrap_or("off"))
            .map_err(|e| internal("mmds", e))?,
        kmsg: get("kmsg").filter(|k| *k != "off").map(PathBuf::from),
        key,
        origins: origins.clone(),
        errors,
        warnings,
    })
}

/// The token: from `token` or `token_file`, whichever comes from the
/// higher-precedence source (`token` on a tie). A token file that cannot be
/// read is a usage error on the CLI, and elsewhere an error that falls back
/// to `token`. A token on the kernel cmdline is readable by every process
/// in the guest (`/proc/cmdline`): that is worth a warning.
fn token(
    origins: &[Origin],
    errors: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Result<Option<Secret>> {
    let find = |name: &str| {
        origins
            .iter()
            .find(|o| o.setting.name == name && o.value.is_some())
    };
    let (inline, file) = (find("token"), find("token_file"));
    if let Some(t) = inline
        && t.source == Source::Cmdline
    {
        warnings.push(
            "token comes from the kernel cmdline, which every process in the guest can read; \
             prefer token_file (mode 0600) or GUEST_AGENT_TOKEN in the service's conf.d"
                .into(),
        );
    }
    let inline_token = inline.and_then(|o| o.value.clone()).map(Secret);
    let Some(f) = file.filter(|f| inline.is_none_or(|t| f.source < t.source)) else {
        return Ok(inline_token);
    };
    let path = f.value.as_deref().unwrap_or_default();
    match read_token_file(Path::new(path)) {
        Ok((token, warning)) => {
            warnings.extend(warning);
            Ok(Some(token))
        }
        Err(e) => {
            let msg = format!("{}: token_file {path:?}: {e}", f.source.as_str());
            if f.source == Source::Cli {
                return Err(Error::Usage(msg));
            }
            errors.push(msg);
            Ok(inline_token)
        }
    }
}

/// Reads a token file: its content without surrounding white space, which
/// must be a valid token. Warns when others than the owner may read it.
fn read_token_file(path: &Path) -> std::result::Result<(Secret, Option<String>), String> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mode = file
        .metadata()
        .map_err(|e| e.to_string())?
        .permissions()
        .mode();
    let mut text = String::new();
    file.take(settings::MAX_TOKEN_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > settings::MAX_TOKEN_FILE {
        return Err(format!("larger than {} bytes", settings::MAX_TOKEN_FILE));
    }
    let token = text.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("expected one token of printable ASCII without spaces".into());
    }
    let warning = (mode & 0o077 != 0).then(|| {
        format!(
            "token_file {}: mode {:o} lets others than its owner read the token; chmod 600",
            path.display(),
            mode & 0o777
        )
    });
    Ok((Secret(token.to_string()), warning))
}

/// The byte bound of the buffer at start, from MemTotal
/// ([`settings::buffer_bound`], docs/design.md#delivery); the running agent
/// follows the guest's memory from its samples. Without a readable
/// `meminfo` the absolute bound holds.
fn buffer_max_bytes(proc_root: &Path) -> usize {
    let total_kb = ProcFile::new(proc_root, "meminfo")
        .parse(meminfo::parse)
        .map(|m| m.total_kb)
        .unwrap_or(u64::MAX / 1024);
    settings::buffer_bound(total_kb)
}

impl Config {
    /// How many samples fit in the buffer's byte bound, at a typical
    /// sample's size: less than `buffer` when the bound clamps it.
    pub fn buffer_fits(&self) -> usize {
        (self.buffer_max_bytes / crate::sample::TYPICAL_SAMPLE_BYTES).min(self.buffer)
    }

    /// The `--print-config` object: `{"interval": {"value": "5s", "source":
    /// "cmdline"}, …}`; `url` also has `resolved` (null without a default
    /// route); the token shows only `set` or `unset`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for o in &self.origins {
            let value = match (&o.value, o.setting.secret) {
                (Some(_), true) => serde_json::Value::from("set"),
                (None, true) => serde_json::Value::from("unset"),
                (v, false) => serde_json::to_value(v).unwrap_or_default(),
            };
            let mut entry = serde_json::Map::new();
            entry.insert("value".into(), value);
            entry.insert("source".into(), o.source.as_str().into());
            if o.setting.name == "buffer" {
                entry.insert("max_bytes".into(), self.buffer_max_bytes.into());
                if self.buffer_fits() < self.buffer {
                    entry.insert(
                        "clamped".into(),
                        format!(
                            "about {} samples fit in {} bytes (at most 2% of MemTotal, 16 MiB)",
                            self.buffer_fits(),
                            self.buffer_max_bytes
                        )
                        .into(),
                    );
                }
            }
            // The key in use (key or key_file): its id and source, never
            // its digits.
            if o.setting.name == "key"
                && let Some(k) = &self.key
            {
                entry.insert("value".into(), "set".into());
                entry.insert("source".into(), k.source().as_str().into());
                entry.insert("kid".into(), k.key.kid().into());
                if let key::KeyFrom::File(path, _) = &k.from {
                    entry.insert("key_file".into(), path.display().to_string().into());
                }
            }
            if o.setting.name == "url" {
                entry.insert(
                    "resolved".into(),
                    self.resolved_target().map(|t| t.url).into(),
                );
            }
            map.insert(o.setting.name.into(), entry.into());
        }
        map.into()
    }

    /// The push target with `{gateway}` filled in from the proc root's
    /// route table; `None` when pushing is off or no default route exists.
    pub fn resolved_target(&self) -> Option<Target> {
        let url = self.url.as_ref()?;
        let gateway = if url.needs_gateway() {
            route::default_gateway(&self.proc_root)
                .map_err(|e| log::warn!("{e}"))
                .ok()
                .flatten()
        } else {
            None
        };
        url.resolve(gateway)
    }
}
