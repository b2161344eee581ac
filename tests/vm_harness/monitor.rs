//! QEMU's human monitor on a Unix socket, for what the command line of
//! [`super::Vm::start`] does not set: a port forward from host loopback to
//! the guest (`hostfwd_add`), added to the running user-mode network.
// Used by some of the test crates that include the harness, not all.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A monitor socket path under `target/vm-logs`, unique per test name.
pub fn socket_path(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/vm-logs");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{name}.monitor"));
    let _ = std::fs::remove_file(&path);
    path
}

/// The QEMU arguments that open the monitor on `path`.
pub fn args(path: &Path) -> Vec<String> {
    vec![
        "-monitor".into(),
        format!("unix:{},server=on,wait=off", path.display()),
    ]
}

/// Forwards host `127.0.0.1:host_port` to the guest's `guest_port` on the
/// user-mode network `n0` (the guest's DHCP address, 10.0.2.15).
pub fn hostfwd(path: &Path, host_port: u16, guest_port: u16) -> Result<(), String> {
    let cmd = format!("hostfwd_add n0 tcp:127.0.0.1:{host_port}-:{guest_port}");
    // Nothing is printed on success; an error is.
    let answer = command(path, &cmd)?;
    if answer.to_ascii_lowercase().contains("could not") || answer.contains("rror") {
        return Err(format!("{cmd}: {answer:?}"));
    }
    Ok(())
}

/// Runs one human-monitor command (`balloon 128`, `info balloon`) and
/// returns what QEMU printed for it, between the echoed command and the
/// next prompt.
pub fn command(path: &Path, cmd: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut conn = loop {
        match UnixStream::connect(path) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("monitor {}: {e}", path.display())),
        }
    };
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    conn.write_all(format!("{cmd}\n").as_bytes())
        .map_err(|e| format!("monitor: {e}"))?;
    let mut out = String::new();
    let mut chunk = [0u8; 1024];
    while out.matches("(qemu)").count() < 2 {
        match conn.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.push_str(&String::from_utf8_lossy(&chunk[..n])),
            Err(e) => return Err(format!("monitor: {cmd}: {e}; so far {out:?}")),
        }
    }
    // The monitor's line editing writes escape sequences (ESC [ … letter)
    // around the echo.
    let mut clean = String::new();
    let mut chars = out.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for e in chars.by_ref() {
                if e.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if !c.is_control() || c == '\n' {
            clean.push(c);
        }
    }
    // Banner, prompt, the echoed command and its answer, prompt.
    let answer = clean.split("(qemu)").nth(1).unwrap_or("");
    let answer = answer.split_once('\n').map_or("", |(_echo, rest)| rest);
    Ok(answer.trim().to_string())
}
