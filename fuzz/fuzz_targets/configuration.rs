//! The configuration as a whole: the kernel cmdline, the environment and
//! the conf file together, resolved as at start (docs/testing.md#fuzzing).
//!
//! The input is three texts split at NUL bytes: the cmdline, environment
//! lines `KEY=VALUE`, the conf file. The command line fixes what would
//! reach outside the test: the proc root (a directory of the target's
//! own), MMDS off (no network), the token file (one of the target's own,
//! so no input names a path that could block a read).
#![no_main]

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use guest_agent::config::{self, settings};
use guest_agent::internals::{Target, report_url};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d =
            std::env::temp_dir().join(format!("guest-agent-fuzz-config-{}", std::process::id()));
        fs::create_dir_all(d.join("proc")).expect("fuzz directory");
        let token = d.join("token");
        fs::write(&token, "fuzz-token\n").expect("token file");
        fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).expect("token mode");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let cmdline = parts.next().unwrap_or_default();
    let env_text = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let file = parts.next().unwrap_or_default();
    let d = dir();
    fs::write(d.join("proc/cmdline"), cmdline).expect("cmdline");
    fs::write(d.join("conf"), file).expect("conf");
    let env: Vec<(String, String)> = env_text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let cli = [
        ("proc_root", d.join("proc").display().to_string()),
        ("mmds", "off".to_string()),
        ("token_file", d.join("token").display().to_string()),
    ];
    let c = config::resolve(&cli, &env, Some(&d.join("conf")))
        .expect("only the CLI gives usage errors");

    // Whatever was accepted is within the documented bounds.
    assert!((settings::MIN_INTERVAL..=settings::MAX_INTERVAL).contains(&c.interval));
    assert!((settings::MIN_TIMEOUT..=settings::MAX_TIMEOUT).contains(&c.timeout));
    assert!(
        c.buffer >= 1 && c.buffer <= settings::MAX_BUFFER,
        "buffer {}",
        c.buffer
    );
    assert!(
        c.batch >= 1 && c.batch <= settings::MAX_BATCH,
        "batch {}",
        c.batch
    );
    // An accepted URL is one a request can be sent to.
    let gw = Some(Ipv4Addr::new(10, 0, 2, 2));
    for u in [&c.url, &c.manager_url].into_iter().flatten() {
        assert!(
            u.resolve(gw).is_some(),
            "accepted URL {:?} has no target",
            u.as_str()
        );
    }
    // An accepted VM id lands in the address report's path as one segment.
    if let Some(id) = &c.vm_id {
        assert!(id.len() <= settings::MAX_VM_ID);
        let url = report_url("http://127.0.0.1:9000/", id);
        let t =
            Target::http(&url).unwrap_or_else(|e| panic!("vm_id {id:?}: report URL {url:?}: {e}"));
        assert_eq!(
            t.uri.path(),
            format!("/v1/vms/{id}/guest-ip"),
            "vm_id {id:?}"
        );
        assert!(
            !id.contains('/') && id != "." && id != "..",
            "vm_id {id:?} is not one path segment"
        );
        assert!(t.uri.query().is_none(), "vm_id {id:?} starts a query");
    }
    let shown = c.to_json().to_string();
    assert!(!shown.contains("fuzz-token"), "the token shown");
});
