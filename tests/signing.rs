//! Pushes signed with the VM's own key (docs/security.md), end to end on
//! 127.0.0.1: the agent in-process against the reference manager
//! (`examples/manager.rs --key-file`) as a process, forged and tampered
//! requests written on raw sockets, key rotation through a key file and
//! through MMDS (a stand-in on loopback), and the configuration checks.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Mode, Receiver, config, example_binary, fixture_root, wait_until};
use guest_agent::ingest::Verifier;
use guest_agent::sign::{self, Key};
use guest_agent::{Collector, agent};

#[path = "snapshot_harness/mmds_stand_in.rs"]
mod mmds_stand_in;
use mmds_stand_in::MmdsStandIn;

/// Generous: a loaded CI machine may be slow to start a process.
const DEADLINE: Duration = Duration::from_secs(30);

fn master(kid: &str, byte: u8) -> Key {
    Key::new(kid, [byte; 32]).unwrap()
}

/// Writes `text` to `path` with `mode`.
fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The reference manager as a process; killed when dropped.
struct Manager {
    child: Child,
    addr: String,
    ndjson: PathBuf,
}

impl Manager {
    /// Starts it on `listen` (`127.0.0.1:0`, or a port to come back on)
    /// with master keys from `keys`, storing into `ndjson`.
    fn start(listen: &str, keys: &Path, ndjson: &Path, extra: &[&str]) -> Manager {
        let mut child = Command::new(example_binary("manager"))
            .args(["--ndjson"])
            .arg(ndjson)
            .arg("--key-file")
            .arg(keys)
            .args(extra)
            .args(if extra.contains(&"--unix") {
                vec![]
            } else {
                vec!["--listen", listen]
            })
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the manager example");
        let mut first = String::new();
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        out.read_line(&mut first).expect("first stdout line");
        // Drained so the manager never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let addr = first
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        Manager {
            child,
            addr,
            ndjson: ndjson.to_path_buf(),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/v1/guest-metrics", self.addr)
    }

    /// The stored samples.
    fn rows(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.ndjson)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-sample body claiming `vm_id`, from the fixture proc root.
fn body(vm_id: &str, seq: u64) -> Vec<u8> {
    let mut c = Collector::new(Path::new(&fixture_root()), Some(vm_id.to_string())).unwrap();
    let mut s = c.collect();
    s.seq = seq;
    serde_json::to_vec(&[s]).unwrap()
}

/// One request on a fresh connection; the status and body of the answer.
fn post(
    stream: &mut dyn ReadWrite,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, String) {
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nHost: manager\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (n, v) in headers {
        raw.push_str(&format!("{n}: {v}\r\n"));
    }
    raw.push_str("\r\n");
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(body);
    stream.write_all(&raw).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn tcp(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr.parse::<SocketAddr>().unwrap()).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

fn signed(h: &sign::Headers) -> Vec<(&'static str, String)> {
    vec![
        ("Content-Digest", h.content_digest.clone()),
        ("Signature-Input", h.signature_input.clone()),
        ("Signature", h.signature.clone()),
    ]
}

#[test]
fn a_signing_agent_is_stored_under_its_own_vm_in_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("masters");
    write(&keys, &format!("{}\n", master("k1", 1).to_line()), 0o600);
    let m = Manager::start("127.0.0.1:0", &keys, &dir.path().join("rows"), &[]);
    let key_file = dir.path().join("vm.key");
    write(&key_file, &master("k1", 1).derive("vm-a").to_line(), 0o600);
    let path = key_file.to_str().unwrap();
    let a = agent::start(config(&[
        ("url", &m.url()),
        ("interval", "100ms"),
        ("vm_id", "vm-a"),
        ("key_file", path),
    ]))
    .unwrap();
    wait_until(30, "three stored samples", || m.rows().len() >= 3);
    let h = a.stop();
    assert_eq!(h.last_error, None);
    for row in m.rows() {
        assert_eq!(row["vm_id"], "vm-a");
    }

    // Every format, and the guest-address report, carry a signature the
    // kit verifies.
    let verifier = Verifier::from_lines(&master("k1", 1).to_line()).unwrap();
    for format in ["json", "influx", "otlp"] {
        let rx = Receiver::start(Mode::Samples);
        let base = format!("http://{}", rx.addr);
        let a = agent::start(config(&[
            ("url", &rx.url()),
            ("format", format),
            ("interval", "100ms"),
            ("vm_id", "vm-a"),
            ("key_file", path),
            ("manager_url", &base),
        ]))
        .unwrap();
        rx.wait_for(30, "a push and a guest-address report", |r| {
            let reqs = r.requests();
            reqs.iter().any(|q| q.path.ends_with("/guest-ip"))
                && reqs.iter().any(|q| q.path == "/v1/guest-metrics")
        });
        a.stop();
        for q in rx.requests() {
            let headers: Vec<(&str, &[u8])> = q
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_bytes()))
                .collect();
            let signer = verifier
                .verify(&q.method, &q.path, &headers, &q.body)
                .unwrap_or_else(|e| panic!("{format} {}: {e}", q.path));
            assert_eq!((signer.kid.as_str(), signer.vm_id.as_str()), ("k1", "vm-a"));
        }
    }
}

#[test]
fn forged_tampered_and_unsigned_requests_are_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("masters");
    write(&keys, &format!("{}\n", master("k1", 1).to_line()), 0o600);
    let m = Manager::start("127.0.0.1:0", &keys, &dir.path().join("rows"), &[]);
    let key_a = master("k1", 1).derive("vm-a");
    let path = "/v1/guest-metrics";
    let now = sign::now();

    // vm-a's valid signature over a body claiming vm-b: 403.
    let forged = body("vm-b", 1);
    let h = sign::sign(&key_a, "vm-a", "POST", path, &forged, now);
    let (status, why) = post(&mut tcp(&m.addr), path, &signed(&h), &forged);
    assert_eq!(status, 403, "{why}");
    assert!(why.contains("vm-b"), "{why}");

    // A body changed after signing: 401.
    let mine = body("vm-a", 1);
    let h = sign::sign(&key_a, "vm-a", "POST", path, &mine, now);
    let changed = body("vm-a", 2);
    let (status, why) = post(&mut tcp(&m.addr), path, &signed(&h), &changed);
    assert_eq!(status, 401, "{why}");
    assert!(why.contains("content digest"), "{why}");

    // The digest and signature of one body moved onto another whose digest
    // header is its own: the signature does not cover it.
    let other = sign::sign(&key_a, "vm-a", "POST", path, &changed, now);
    let mut moved = signed(&other);
    moved[1] = signed(&h)[1].clone();
    moved[2] = signed(&h)[2].clone();
    let (status, why) = post(&mut tcp(&m.addr), path, &moved, &changed);
    assert_eq!((status, why.contains("signature")), (401, true), "{why}");

    // A signature made for another path.
    let elsewhere = sign::sign(&key_a, "vm-a", "POST", "/v1/other", &mine, now);
    let (status, why) = post(&mut tcp(&m.addr), path, &signed(&elsewhere), &mine);
    assert_eq!(status, 401, "{why}");

    // No signature at all.
    let (status, why) = post(&mut tcp(&m.addr), path, &[], &mine);
    assert_eq!(status, 401, "{why}");
    assert!(why.contains("signature: none"), "{why}");

    // A master key the manager does not hold.
    let stranger = sign::sign(
        &master("k9", 9).derive("vm-a"),
        "vm-a",
        "POST",
        path,
        &mine,
        now,
    );
    let (status, why) = post(&mut tcp(&m.addr), path, &signed(&stranger), &mine);
    assert_eq!(status, 401, "{why}");
    assert!(m.rows().is_empty(), "{:?}", m.rows());

    // The same signed request twice: stored once. A created from long ago
    // (a VM restored from an old snapshot) is no reason to refuse.
    let old = sign::sign(&key_a, "vm-a", "POST", path, &mine, 1_000_000_000);
    let (status, why) = post(&mut tcp(&m.addr), path, &signed(&old), &mine);
    assert_eq!(status, 200, "{why}");
    let (status, why) = post(&mut tcp(&m.addr), path, &signed(&old), &mine);
    assert_eq!(status, 200, "{why}");
    assert!(why.contains("\"duplicates\":1"), "{why}");
    assert_eq!(m.rows().len(), 1);
}

#[test]
fn a_vms_own_socket_refuses_other_vms_samples_signed_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.vsock_1024");
    // Without --key-file: the socket alone names the VM.
    let mut child = Command::new(example_binary("manager"))
        .arg("--unix")
        .arg(&sock)
        .args(["--vm-id", "vm-a", "--ndjson"])
        .arg(dir.path().join("rows"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("listening on unix:"), "{first}");
    let unix = || {
        let s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s
    };
    let (status, why) = post(&mut unix(), "/v1/guest-metrics", &[], &body("vm-b", 1));
    assert_eq!(status, 403, "{why}");
    let (status, why) = post(&mut unix(), "/v1/guest-metrics", &[], &body("vm-a", 1));
    assert_eq!(status, 200, "{why}");
    let rows = std::fs::read_to_string(dir.path().join("rows")).unwrap();
    assert_eq!(rows.lines().count(), 1);
    let _ = child.kill();
    let _ = child.wait();

    // With master keys too: a signature for vm-b on vm-a's socket is 403.
    let keys = dir.path().join("masters");
    write(&keys, &master("k1", 1).to_line(), 0o600);
    let sock_arg = sock.to_str().unwrap();
    let m = Manager::start(
        "",
        &keys,
        &dir.path().join("rows2"),
        &["--unix", sock_arg, "--vm-id", "vm-a"],
    );
    let b = body("vm-b", 1);
    let h = sign::sign(
        &master("k1", 1).derive("vm-b"),
        "vm-b",
        "POST",
        "/v1/guest-metrics",
        &b,
        sign::now(),
    );
    let (status, why) = post(&mut unix(), "/v1/guest-metrics", &signed(&h), &b);
    assert_eq!(status, 403, "{why}");
    assert!(m.rows().is_empty());
}

/// Seqs stored, sorted, without repeats (a manager restarted in the middle
/// forgets what it de-duplicated, so a resent batch may be stored twice).
fn seqs(rows: &[serde_json::Value]) -> Vec<u64> {
    let mut s: Vec<u64> = rows.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    s.sort_unstable();
    s.dedup();
    s
}

fn assert_no_gap(seqs: &[u64]) {
    let expected: Vec<u64> = (1..=*seqs.last().unwrap()).collect();
    assert_eq!(seqs, expected, "a sample was lost");
}

#[test]
fn a_key_rotated_in_the_key_file_resumes_pushes_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("masters");
    let rows = dir.path().join("rows");
    write(&keys, &master("k1", 1).to_line(), 0o600);
    let m = Manager::start("127.0.0.1:0", &keys, &rows, &[]);
    let key_file = dir.path().join("vm.key");
    write(&key_file, &master("k1", 1).derive("vm-a").to_line(), 0o600);
    let a = agent::start(config(&[
        ("url", &m.url()),
        ("interval", "100ms"),
        ("vm_id", "vm-a"),
        ("key_file", key_file.to_str().unwrap()),
    ]))
    .unwrap();
    wait_until(30, "stored samples", || m.rows().len() >= 2);

    // The manager rotates k1 out; the VM still has a k1 key: 401, kept.
    let addr = m.addr.clone();
    drop(m);
    write(&keys, &master("k2", 2).to_line(), 0o600);
    let m = Manager::start(&addr, &keys, &rows, &[]);
    wait_until(30, "a 401 in /health", || {
        a.health()
            .last_error
            .is_some_and(|e| e.contains("HTTP 401: signature"))
    });
    let buffered = a.health().buffered;
    assert!(buffered > 0, "the refused samples are kept");

    // The VM's key file gets the k2 key: read again after the next 401.
    write(&key_file, &master("k2", 2).derive("vm-a").to_line(), 0o600);
    let delivered = a.health().delivered;
    wait_until(60, "pushes resuming", || {
        a.health().delivered > delivered + 3
    });
    let h = a.stop();
    assert_eq!(h.rejected, 0);
    assert_eq!(h.dropped, 0);
    assert_no_gap(&seqs(&m.rows()));
}

#[test]
fn a_key_rotated_in_mmds_resumes_pushes_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("masters");
    let rows = dir.path().join("rows");
    // A rotation the documented way: k2 added first (both accepted), the
    // VM's MMDS given its k2 key, then k1 removed.
    write(&keys, &master("k1", 1).to_line(), 0o600);
    let m = Manager::start("127.0.0.1:0", &keys, &rows, &[]);
    let doc = |key: &Key| {
        format!(
            r#"{{"guest_agent": {{"vm_id": "vm-m", "key": "{}"}}}}"#,
            key.derive("vm-m").to_line()
        )
    };
    let mmds = MmdsStandIn::start(&doc(&master("k1", 1)));
    let a = agent::start(config(&[
        ("url", &m.url()),
        ("interval", "100ms"),
        ("mmds", &mmds.addr().to_string()),
    ]))
    .unwrap();
    wait_until(30, "stored samples", || m.rows().len() >= 2);
    let addr = m.addr.clone();
    drop(m);
    // The manager forgets k1 before the VM learns k2: pushes fail with 401
    // until MMDS has the new key, then resume.
    write(&keys, &format!("{}\n", master("k2", 2).to_line()), 0o600);
    let m = Manager::start(&addr, &keys, &rows, &[]);
    wait_until(30, "a 401 in /health", || {
        a.health()
            .last_error
            .is_some_and(|e| e.contains("HTTP 401: signature"))
    });
    mmds.set_document(&doc(&master("k2", 2)));
    let delivered = a.health().delivered;
    wait_until(60, "pushes resuming", || {
        a.health().delivered > delivered + 3
    });
    let h = a.stop();
    assert_eq!((h.rejected, h.dropped), (0, 0));
    let rows = m.rows();
    assert!(rows.iter().all(|r| r["vm_id"] == "vm-m"));
    assert_no_gap(&seqs(&rows));
}

#[test]
fn key_settings_are_checked_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let key = master("k1", 1).derive("vm-a");
    let hex = &key.to_line()[3..];
    let open_file = dir.path().join("open.key");
    write(&open_file, &key.to_line(), 0o644);
    let cli = |pairs: &[(&'static str, &str)]| {
        guest_agent::config::resolve(
            &pairs
                .iter()
                .map(|(k, v)| (*k, v.to_string()))
                .collect::<Vec<_>>(),
            &[],
            Some(Path::new("/nonexistent/guest-agent.conf")),
        )
    };
    // A key file others may read: refused (exit 2 on the CLI).
    let e = cli(&[("vm_id", "vm-a"), ("key_file", open_file.to_str().unwrap())])
        .unwrap_err()
        .to_string();
    assert!(e.contains("mode 644") && e.contains("refused"), "{e}");
    // From the environment: an error in /health, and no key.
    let c = guest_agent::config::resolve(
        &[("vm_id", "vm-a".into())],
        &[(
            "GUEST_AGENT_KEY_FILE".into(),
            open_file.to_str().unwrap().into(),
        )],
        Some(Path::new("/nonexistent/guest-agent.conf")),
    )
    .unwrap();
    assert!(c.key.is_none());
    assert!(
        c.errors.iter().any(|e| e.contains("mode 644")),
        "{:?}",
        c.errors
    );

    // A key without a vm_id is a configuration error.
    let e = cli(&[("key", &key.to_line())]).unwrap_err().to_string();
    assert!(e.contains("vm_id"), "{e}");

    // --print-config: set, its KID and source, never the digits.
    let private = dir.path().join("vm.key");
    write(&private, &key.to_line(), 0o600);
    let c = cli(&[("vm_id", "vm-a"), ("key_file", private.to_str().unwrap())]).unwrap();
    let shown = c.to_json();
    assert_eq!(shown["key"]["value"], "set");
    assert_eq!(shown["key"]["kid"], "k1");
    assert_eq!(shown["key"]["source"], "cli");
    assert_eq!(shown["key"]["key_file"], private.to_str().unwrap());
    let c = cli(&[("vm_id", "vm-a"), ("key", &key.to_line())]).unwrap();
    let text = c.to_json().to_string();
    assert!(!text.contains(hex), "{text}");
    assert!(!format!("{c:?}").contains(hex));

    // The binary says the same.
    let out = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .args([
            "--print-config",
            "--url",
            "off",
            "--vm-id",
            "vm-a",
            "--proc-root",
        ])
        .arg(fixture_root())
        .args(["--config", "/nonexistent/guest-agent.conf", "--key-file"])
        .arg(&open_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("key_file") && err.contains("chmod 600"),
        "{err}"
    );
}

#[test]
fn the_vm_key_example_prints_the_derived_key() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("masters");
    write(
        &keys,
        &format!(
            "{}\n{}\n",
            master("k2", 2).to_line(),
            master("k1", 1).to_line()
        ),
        0o600,
    );
    let out = Command::new(example_binary("vm_key"))
        .arg(&keys)
        .arg("vm-a")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        master("k2", 2).derive("vm-a").to_line()
    );
    let out = Command::new(example_binary("vm_key"))
        .arg(&keys)
        .arg("a/b")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// The PyPI package the interoperability test runs, at the version it was
/// written against.
const PYHMS: &str = "http-message-signatures==3.0.0";

/// Python with [`PYHMS`], in a venv made once under `target/`; `None`
/// (after saying why) when it cannot be made here, which fails under
/// `CI=true`.
fn pyhms() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/signing-venv");
    let python = venv.join("bin/python");
    let ready = venv.join(format!(".ready-{PYHMS}"));
    let made = (|| -> Result<(), String> {
        if ready.exists() {
            return Ok(());
        }
        let run = |cmd: &mut Command| -> Result<(), String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{cmd:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            PYHMS,
        ]))?;
        std::fs::write(&ready, "").map_err(|e| e.to_string())
    })();
    match made {
        Ok(()) => Some(python),
        Err(why) => {
            let why = format!("the interoperability test needs python3-venv and PyPI: {why}");
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
            eprintln!("skipping: {why}");
            None
        }
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/signing_interop/pyhms.py")
}

#[test]
fn http_message_signatures_verifies_the_agent_and_signs_for_the_kit() {
    use base64::Engine as _;
    let Some(python) = pyhms() else { return };
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("masters");
    write(
        &keys,
        &format!(
            "{}\n{}\n",
            master("k2", 2).to_line(),
            master("k1", 1).to_line()
        ),
        0o600,
    );

    // The agent's requests (a push and a guest-address report), verified by
    // the Python package with keys it derives itself.
    let key_file = dir.path().join("vm.key");
    write(&key_file, &master("k1", 1).derive("vm-a").to_line(), 0o600);
    let rx = Receiver::start(Mode::Samples);
    let a = agent::start(config(&[
        ("url", &rx.url()),
        ("interval", "100ms"),
        ("vm_id", "vm-a"),
        ("key_file", key_file.to_str().unwrap()),
        ("manager_url", &format!("http://{}", rx.addr)),
    ]))
    .unwrap();
    rx.wait_for(30, "a push and a guest-address report", |r| {
        let reqs = r.requests();
        reqs.iter().any(|q| q.path.ends_with("/guest-ip"))
            && reqs
                .iter()
                .filter(|q| q.path == "/v1/guest-metrics")
                .count()
                >= 2
    });
    a.stop();
    let mut lines = String::new();
    let mut requests = rx.requests();
    // One request changed after signing: the package must refuse it.
    let mut tampered = requests[0].clone();
    tampered.body.push(b' ');
    requests.push(tampered);
    for q in &requests {
        let line = serde_json::json!({
            "method": q.method,
            "url": format!("http://{}{}", rx.addr, q.path),
            "headers": q.headers,
            "body_b64": base64::engine::general_purpose::STANDARD.encode(&q.body),
        });
        lines.push_str(&format!("{line}\n"));
    }
    let mut child = Command::new(&python)
        .arg(script())
        .arg("verify")
        .arg(&keys)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let verdicts = String::from_utf8_lossy(&out.stdout);
    let verdicts: Vec<&str> = verdicts.lines().collect();
    assert_eq!(
        verdicts.len(),
        requests.len(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (last, agents) = verdicts.split_last().unwrap();
    for v in agents {
        assert_eq!(*v, "ok k1/vm-a");
    }
    assert!(last.starts_with("refused"), "{last}");

    // A request the package signs, accepted by the kit in the reference
    // manager and stored.
    let m = Manager::start("127.0.0.1:0", &keys, &dir.path().join("rows"), &[]);
    let b = body("vm-p", 1);
    let body_file = dir.path().join("body");
    std::fs::write(&body_file, &b).unwrap();
    let out = Command::new(&python)
        .arg(script())
        .arg("sign")
        .arg(master("k2", 2).derive("vm-p").to_line())
        .arg("vm-p")
        .arg(m.url())
        .arg(&body_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let headers: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&out.stdout).unwrap();
    let headers: Vec<(&str, String)> = headers
        .iter()
        .filter(|(n, _)| !n.eq_ignore_ascii_case("content-type"))
        .map(|(n, v)| (n.as_str(), v.clone()))
        .collect();
    let (status, why) = post(&mut tcp(&m.addr), "/v1/guest-metrics", &headers, &b);
    assert_eq!(status, 200, "{why}");
    let rows = m.rows();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["vm_id"], "vm-p");
}

#[test]
fn a_clone_drops_its_parents_buffered_samples_and_signs_its_own() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("masters");
    let rows = dir.path().join("rows");
    write(&keys, &master("k1", 1).to_line(), 0o600);
    let m = Manager::start("127.0.0.1:0", &keys, &rows, &[]);
    let doc = |vm: &str| {
        format!(
            r#"{{"guest_agent": {{"vm_id": "{vm}", "key": "{}"}}}}"#,
            master("k1", 1).derive(vm).to_line()
        )
    };
    let mmds = MmdsStandIn::start(&doc("parent"));
    // The kernel log, as a plain file the test appends the VMGenID reseed to.
    let kmsg = dir.path().join("kmsg");
    std::fs::write(&kmsg, "").unwrap();
    let a = agent::start(config(&[
        ("url", &m.url()),
        ("interval", "100ms"),
        ("mmds", &mmds.addr().to_string()),
        ("kmsg", kmsg.to_str().unwrap()),
    ]))
    .unwrap();
    wait_until(30, "the parent's samples stored", || m.rows().len() >= 2);
    // The manager goes away: the parent's samples pile up in the buffer.
    let addr = m.addr.clone();
    drop(m);
    wait_until(30, "parent samples buffered", || a.health().buffered >= 3);
    // Restored as a clone with its own id and key in MMDS.
    mmds.set_document(&doc("clone-a"));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&kmsg)
        .unwrap();
    writeln!(
        f,
        "5,3,300,-;random: crng reseeded due to virtual machine fork"
    )
    .unwrap();
    let m = Manager::start(&addr, &keys, &rows, &[]);
    wait_until(60, "the clone's samples stored", || {
        m.rows().iter().filter(|r| r["vm_id"] == "clone-a").count() >= 3
    });
    let h = a.stop();
    // The parent's buffered samples could not be signed by the clone:
    // dropped and counted, never sent as the clone's, never blocking it.
    assert!(h.rejected >= 3, "{h:?}");
    assert!(
        h.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("\"parent\""),
        "{h:?}"
    );
    let clone_rows: Vec<serde_json::Value> = m
        .rows()
        .into_iter()
        .filter(|r| r["vm_id"] == "clone-a")
        .collect();
    assert_no_gap(&seqs(&clone_rows));
}
