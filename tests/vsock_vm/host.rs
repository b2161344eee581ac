//! The host side of a vsock VM as Firecracker offers it: the
//! `vhost-device-vsock` daemon in hybrid mode (a guest connection to CID 2
//! port P arrives on the Unix socket `<uds_path>_P`), the reference manager
//! listening there, and an initramfs overlay with the vsock modules and an
//! init of its own.
//!
//! Environment: `GUEST_AGENT_VHOST_VSOCK`, the daemon's binary (default
//! `target/vhost-device-vsock/bin/vhost-device-vsock`, where `.ci/run`
//! installs it).

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use guest_agent::Sample;

use crate::vm_harness::cpio::Cpio;
use crate::vm_harness::initramfs::{module_bytes, resolve_modules};
use crate::vm_harness::{Assets, assets};

/// The guest's CID (any free one above 2; each daemon has its own VM).
pub const GUEST_CID: u32 = 3;
/// The kernel's vsock stack: the core, then the virtio transport.
const VSOCK_MODULES: [&str; 1] = ["vmw_vsock_virtio_transport"];
/// The virtio-mmio bus the vsock device sits on.
const BUS_MODULES: [&str; 1] = ["virtio_mmio"];

/// The daemon's binary, or why there is none.
pub fn daemon_binary() -> Result<PathBuf, String> {
    let bin = std::env::var_os("GUEST_AGENT_VHOST_VSOCK")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target/vhost-device-vsock/bin/vhost-device-vsock")
        });
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "no vhost-device-vsock at {} (cargo install vhost-device-vsock --version 0.3.0 \
             --root target/vhost-device-vsock, as .ci/run does)",
            bin.display()
        ))
    }
}

/// A process killed (SIGKILL) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One VM's host side: its folder, the daemon, the QEMU arguments that
/// attach a `vhost-user-vsock-device` to it.
pub struct HostSide {
    pub dir: PathBuf,
    pub uds_path: PathBuf,
    _daemon: Killed,
}

impl HostSide {
    pub fn start(name: &str, daemon: &Path) -> HostSide {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/vsock-vm")
            .join(format!("{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the VM's host folder");
        let socket = dir.join("vhost.sock");
        let uds_path = dir.join("vm.vsock");
        let log = fs::File::create(dir.join("daemon.log")).expect("daemon log");
        let child = Command::new(daemon)
            .arg("--vm")
            .arg(format!(
                "guest-cid={GUEST_CID},socket={},uds-path={}",
                socket.display(),
                uds_path.display()
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("daemon log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", daemon.display()));
        let daemon = Killed(child);
        // QEMU connects to the daemon's socket at start: wait for it.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "vhost-device-vsock made no {} (see {})",
                socket.display(),
                dir.join("daemon.log").display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        HostSide {
            dir,
            uds_path,
            _daemon: daemon,
        }
    }

    /// The host socket for guest connections to CID 2 `port`.
    pub fn port_socket(&self, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.uds_path.display()))
    }

    /// QEMU arguments for the vsock device; the guest memory must be
    /// shared with the daemon.
    pub fn qemu_args(&self) -> Vec<String> {
        vec![
            "-M".into(),
            "memory-backend=mem".into(),
            "-object".into(),
            format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                crate::vm_harness::qemu::MEMORY_MIB
            ),
            "-chardev".into(),
            format!(
                "socket,id=vsock0,path={}",
                self.dir.join("vhost.sock").display()
            ),
            "-device".into(),
            "vhost-user-vsock-device,chardev=vsock0".into(),
        ]
    }
}

impl Drop for HostSide {
    /// The folder (sockets, NDJSON files, the daemon's log) is kept when the
    /// test failed, for diagnosis.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The reference manager listening on a Unix socket; killed when dropped.
pub struct Manager {
    _child: Killed,
}

impl Manager {
    pub fn start(socket: &Path, ndjson: &Path) -> Manager {
        let bin = crate::vm_harness::common::example_binary("manager");
        let mut child = Command::new(&bin)
            .arg("--unix")
            .arg(socket)
            .arg("--ndjson")
            .arg(ndjson)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let child = Killed(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // The first line is all the test waits for; keep
                    // draining so the manager never blocks on the pipe.
                    continue;
                }
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the manager's first line");
        assert_eq!(first, format!("listening on unix:{}", socket.display()));
        Manager { _child: child }
    }
}

/// Every sample stored in the NDJSON files so far (a line still being
/// written is left for the next look).
pub fn stored(files: &[&Path]) -> Vec<Sample> {
    let mut out = Vec::new();
    for f in files {
        let Ok(text) = fs::read_to_string(f) else {
            continue;
        };
        for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            let s: Sample = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: a stored line is not a sample: {e}", f.display()));
            out.push(s);
        }
    }
    out
}

/// The standard initramfs with an overlay appended: the vsock modules and
/// this test's `/init` (a later archive's file replaces an earlier one's).
pub fn initrd(assets: &Assets, base: &Path, dir: &Path) -> Result<PathBuf, String> {
    let bus = resolve_modules(&assets.modules_dir, &BUS_MODULES)?;
    let vsock: Vec<_> = resolve_modules(&assets.modules_dir, &VSOCK_MODULES)?
        .into_iter()
        .filter(|(name, _)| !bus.iter().any(|(b, _)| b == name))
        .collect();
    let mut c = Cpio::new();
    c.dir("/lib/modules/vsock");
    let names = |list: &[(String, PathBuf)], sub: &str, c: &mut Cpio| {
        let mut names = Vec::new();
        for (name, path) in list {
            let bytes = module_bytes(path)?;
            c.file(&format!("/lib/modules/{sub}{name}.ko"), 0o644, &bytes);
            names.push(name.clone());
        }
        Ok::<_, String>(names.join(" "))
    };
    let bus_names = names(&bus, "", &mut c)?;
    let vsock_names = names(&vsock, "vsock/", &mut c)?;
    let init = INIT
        .replace("@BUS_MODULES@", &bus_names)
        .replace("@VSOCK_MODULES@", &vsock_names);
    c.file("/init", 0o755, init.as_bytes());
    let mut bytes = fs::read(base).map_err(|e| format!("cannot read {}: {e}", base.display()))?;
    // Each archive starts on a 4-byte boundary; zeros between archives are
    // skipped by the kernel.
    bytes.resize(bytes.len().next_multiple_of(512), 0);
    bytes.extend_from_slice(&c.finish());
    let image = dir.join("initramfs-vsock.cpio");
    fs::write(&image, &bytes).map_err(|e| format!("cannot write {}: {e}", image.display()))?;
    crate::vm_harness::report(format_args!(
        "vsock vm: initramfs overlay with {bus_names} and (loaded per scenario) {vsock_names}"
    ));
    Ok(image)
}

/// Whether a missing prerequisite fails the test (CI) rather than skips it.
pub fn required() -> bool {
    assets::required()
}

/// The guest's init. `ga_vsock=boot` loads the vsock modules before the
/// agent starts; `ga_vsock=late` starts the agent first, reports what its
/// `/health` says on a kernel without vsock, then loads them.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
hostname ga-vsock
say() { echo "@@GA $*"; }
uptime_now() { cut -d' ' -f1 /proc/uptime; }
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}" ;; esac; done; }
(sleep "$(arg ga_watchdog)"; say watchdog; poweroff -f) &
for m in @BUS_MODULES@; do insmod "/lib/modules/$m.ko" || say insmod-failed "$m"; done
ip link set lo up
load_vsock() {
    for m in @VSOCK_MODULES@; do insmod "/lib/modules/vsock/$m.ko" || say insmod-failed "$m"; done
    say vsock-loaded uptime=$(uptime_now)
}
health() { wget -qO- http://127.0.0.1:8080/health 2>/dev/null | tr -d '\n'; }
say boot uptime=$(uptime_now)
say net $(ls /sys/class/net)
say virtio $(cat /sys/bus/virtio/devices/*/device)
[ "$(arg ga_vsock)" = boot ] && load_vsock
/usr/bin/guest-agent &
say agent-started uptime=$(uptime_now)
if [ "$(arg ga_vsock)" = late ]; then
    i=0
    until health | grep -q 'no vsock support' || [ $i -ge 120 ]; do sleep 0.5; i=$((i + 1)); done
    echo "@@GA health-without-vsock $(health)"
    load_vsock
fi
say ready
while read -r cmd; do
    case "$cmd" in
    health) echo "@@GA health $(health)" ;;
    off) break ;;
    esac
done
say poweroff
poweroff -f
"#;
