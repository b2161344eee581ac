//! Snapshots of a real VM: QEMU's q35 machine under TCG with a `vmgenid`
//! device, Debian's generic kernel (it has `CONFIG_VMGENID`; the cloud kernel
//! the microvm tests boot does not, and the microvm machine does not show the
//! device to the guest), a busybox initramfs holding the static agent, and
//! HMP on a Unix socket to stop, save (`migrate "exec:cat > STATE"`), and
//! resume clones (`-incoming "exec:cat STATE"`, then `cont`).
//!
//! The guest's network is QEMU user networking: 10.0.2.2:PORT is the host's
//! 127.0.0.1:PORT, and a `guestfwd` makes [`MMDS_ADDR`] inside the guest a
//! connection to an MMDS stand-in on host loopback, one per VM.
//!
//! Environment, beside `tests/vm_harness/assets.rs`'s: `GUEST_AGENT_VM_GENERIC_KERNEL_DIR`,
//! an extracted generic kernel package to use instead of fetching one.

pub mod mmds_stand_in;

use std::fs;
use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::vm_harness::assets;
use crate::vm_harness::initramfs;
use crate::vm_harness::qemu::{Console, spawn_reader};

/// The generic kernel's meta-package.
const KERNEL_META: &str = "linux-image-amd64";
/// PCI virtio network on q35; dependencies come from each module's modinfo.
const ROOT_MODULES: [&str; 2] = ["virtio_pci", "virtio_net"];
/// Where the guest reaches its metadata service (a QEMU user-network
/// address, forwarded to the host; never 169.254.169.254 outside a VM).
pub const MMDS_ADDR: &str = "10.0.2.100:80";
/// The guest's memory: what a snapshot saves.
pub const MEMORY_MIB: u64 = 256;

pub struct Q35Assets {
    pub qemu: PathBuf,
    pub vmlinuz: PathBuf,
    pub kernel_version: String,
    pub busybox: PathBuf,
    pub initrd: PathBuf,
}

/// The assets, or `None` after printing why the test is skipped; with
/// `CI=true` or `GUEST_AGENT_VM_TEST=require` a missing one panics.
pub fn ready(test: &str) -> Option<&'static Q35Assets> {
    static ASSETS: OnceLock<Result<Q35Assets, String>> = OnceLock::new();
    match ASSETS.get_or_init(locate) {
        Ok(a) => Some(a),
        Err(why) if assets::required() => panic!(
            "{test}: VM prerequisites missing (required by CI=true or GUEST_AGENT_VM_TEST=require): {why}"
        ),
        Err(why) => {
            crate::vm_harness::report(format_args!(
                "{test}: SKIPPED, VM prerequisites missing: {why}"
            ));
            None
        }
    }
}

fn locate() -> Result<Q35Assets, String> {
    if std::env::var("GUEST_AGENT_VM_TEST").is_ok_and(|v| v == "skip") {
        return Err("GUEST_AGENT_VM_TEST=skip".into());
    }
    let cache = std::env::var_os("GUEST_AGENT_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/vm-cache"));
    fs::create_dir_all(&cache).map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
    let qemu = assets::find_qemu()?;
    let root = match std::env::var_os("GUEST_AGENT_VM_GENERIC_KERNEL_DIR") {
        Some(d) => PathBuf::from(d),
        None => fetch_generic_kernel(&cache)?,
    };
    let (vmlinuz, modules_dir) = assets::kernel_files(&root)?;
    let kernel_version = modules_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let config = root.join(format!("boot/config-{kernel_version}"));
    let config = fs::read_to_string(&config)
        .map_err(|e| format!("cannot read {}: {e}", config.display()))?;
    if !config.lines().any(|l| l == "CONFIG_VMGENID=y") {
        return Err(format!(
            "kernel {kernel_version} lacks CONFIG_VMGENID=y: no restore signal"
        ));
    }
    let busybox = assets::find_busybox(&cache)?;
    let agent = assets::find_agent()?;
    let initrd = build_initramfs(&cache, &modules_dir, &busybox, &agent)?;
    Ok(Q35Assets {
        qemu,
        vmlinuz,
        kernel_version,
        busybox,
        initrd,
    })
}

/// The cached generic kernel tree, or the image `linux-image-amd64` depends
/// on, fetched with `apt-get download` + `dpkg -x`.
fn fetch_generic_kernel(cache: &Path) -> Result<PathBuf, String> {
    let generic = |n: &str| {
        n.starts_with("linux-image-")
            && n.ends_with("-amd64")
            && !n.ends_with("-cloud-amd64")
            && !n.ends_with("-rt-amd64")
            && n != KERNEL_META
    };
    if let Some(existing) = fs::read_dir(cache)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().and_then(|n| n.to_str()).is_some_and(generic))
        .max()
    {
        return Ok(existing);
    }
    let deps = assets::run(Command::new("apt-cache").args(["depends", KERNEL_META]))
        .map_err(|e| format!("{e} (run apt-get update first)"))?;
    let package = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| generic(p))
        .ok_or_else(|| format!("apt-cache depends {KERNEL_META} names no kernel image"))?
        .to_string();
    assets::fetch_deb(cache, &package, &package)
}

fn build_initramfs(
    cache: &Path,
    modules_dir: &Path,
    busybox: &Path,
    agent: &Path,
) -> Result<PathBuf, String> {
    initramfs::assemble(&initramfs::Image {
        modules_dir,
        root_modules: &ROOT_MODULES,
        busybox,
        agent,
        init: INIT,
        cache,
        name: "initramfs-q35",
    })
}

/// The guest's init: network first (the agent reads MMDS at start), then
/// the agent with its configuration from the kernel command line.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
hostname ga-vm
say() { echo "@@GA $*"; }
for m in @MODULES@; do insmod "/lib/modules/$m.ko" || say insmod-failed "$m"; done
ip link set lo up
ip link set eth0 up || say no-eth0
if [ -e /sys/bus/acpi/devices/QEMUVGID:00/physical_node ] || [ -d /sys/bus/acpi/drivers/vmgenid ]; then
    say vmgenid $(ls /sys/bus/acpi/drivers/vmgenid 2>/dev/null | tr '\n' ' ')
fi
if udhcpc -i eth0 -n -q -t 20 -T 1 -s /etc/udhcpc.script >/tmp/udhcpc.log 2>&1; then
    say net-up $(ip -4 -o addr show eth0 | awk '{print $4}')
else
    say net-failed; cat /tmp/udhcpc.log
fi
/usr/bin/guest-agent &
say agent-started
while :; do sleep 3600; done
"#;

/// One VM to start: a fresh boot, or a clone of a saved state.
pub struct Spec<'a> {
    pub name: &'a str,
    /// The VMGenID the hypervisor gives this VM.
    pub vmgenid: &'a str,
    /// Host loopback port of this VM's MMDS stand-in.
    pub mmds_port: u16,
    /// Kernel command line beyond the console and clock settings.
    pub cmdline: Vec<String>,
    /// A saved state to resume (the VM starts paused).
    pub incoming: Option<&'a Path>,
}

/// A q35 VM under TCG, its console read line by line, HMP on a Unix socket;
/// killed on drop.
pub struct Q35 {
    pub name: String,
    child: Child,
    console: Console,
    hmp: Option<BufReader<UnixStream>>,
    hmp_path: PathBuf,
    pub log: PathBuf,
}

impl Q35 {
    pub fn start(assets: &Q35Assets, spec: Spec<'_>) -> Q35 {
        let mut append = vec![
            "console=ttyS0".to_string(),
            "reboot=k".into(),
            "panic=1".into(),
            format!("tsc_early_khz={}", crate::vm_harness::qemu::host_tsc_khz()),
        ];
        append.extend(spec.cmdline);
        let log_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/vm-logs");
        fs::create_dir_all(&log_dir).expect("create target/vm-logs");
        let log = log_dir.join(format!("{}.log", spec.name));
        // Unix socket paths are short (108 bytes): the temp folder, not target/.
        let hmp_path =
            std::env::temp_dir().join(format!("ga-hmp-{}-{}.sock", std::process::id(), spec.name));
        let _ = fs::remove_file(&hmp_path);
        let (ip, port) = MMDS_ADDR.split_once(':').expect("MMDS_ADDR is ip:port");
        let netdev = format!(
            "user,id=n0,guestfwd=tcp:{ip}:{port}-cmd:{} nc 127.0.0.1 {}",
            assets.busybox.display(),
            spec.mmds_port
        );
        let mut cmd = Command::new(&assets.qemu);
        cmd.args(["-M", "q35", "-accel", "tcg", "-cpu", "max"])
            .args(["-m", &MEMORY_MIB.to_string(), "-smp", "1"])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args(["-serial", "stdio"])
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", hmp_path.display()))
            .arg("-kernel")
            .arg(&assets.vmlinuz)
            .arg("-initrd")
            .arg(&assets.initrd)
            .args(["-append", &append.join(" ")])
            .args(["-netdev", &netdev])
            // No option ROM: the kernel is loaded directly.
            .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
            .args(["-device", &format!("vmgenid,guid={}", spec.vmgenid)]);
        if let Some(state) = spec.incoming {
            cmd.arg("-S")
                .arg("-incoming")
                .arg(format!("exec:cat {}", state.display()));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", assets.qemu.display()));
        let console: Console = Arc::default();
        let file = Arc::new(Mutex::new(
            fs::File::create(&log).expect("create console log"),
        ));
        spawn_reader(
            child.stdout.take().expect("stdout"),
            "",
            console.clone(),
            file.clone(),
            true,
        );
        spawn_reader(
            child.stderr.take().expect("stderr"),
            "qemu: ",
            console.clone(),
            file,
            false,
        );
        Q35 {
            name: spec.name.to_string(),
            child,
            console,
            hmp: None,
            hmp_path,
            log,
        }
    }

    /// Runs one HMP command and returns its output (up to the next prompt).
    pub fn hmp(&mut self, command: &str) -> String {
        if self.hmp.is_none() {
            let deadline = Instant::now() + Duration::from_secs(60);
            let stream = loop {
                match UnixStream::connect(&self.hmp_path) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => panic!("{}: HMP socket: {e}", self.name),
                }
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(120)))
                .expect("HMP read timeout");
            let mut r = BufReader::new(stream);
            read_prompt(&mut r, &self.name);
            self.hmp = Some(r);
        }
        let r = self.hmp.as_mut().expect("HMP connected");
        r.get_mut()
            .write_all(format!("{command}\n").as_bytes())
            .unwrap_or_else(|e| panic!("{}: HMP {command:?}: {e}", self.name));
        read_prompt(r, &self.name)
    }

    /// Stops the VM and saves its state to `state`; QEMU then quits.
    /// Returns how long the save took.
    pub fn save(&mut self, state: &Path, deadline: Instant) -> Duration {
        let t = Instant::now();
        self.hmp("stop");
        self.hmp(&format!("migrate \"exec:cat > {}\"", state.display()));
        loop {
            let info = self.hmp("info migrate");
            if info.contains("Migration status: completed") {
                break;
            }
            assert!(
                !info.contains("Migration status: failed"),
                "{}: migration failed: {info}",
                self.name
            );
            assert!(
                Instant::now() < deadline,
                "{}: save not done: {info}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let took = t.elapsed();
        self.hmp_quit();
        took
    }

    /// Waits for the incoming state to be loaded, then resumes the VM;
    /// returns when `cont` was sent.
    pub fn resume(&mut self, deadline: Instant) -> Instant {
        loop {
            let status = self.hmp("info status");
            if status.contains("paused") && !status.contains("inmigrate") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: not loaded: {status}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let at = Instant::now();
        self.hmp("cont");
        at
    }

    fn hmp_quit(&mut self) {
        if let Some(mut r) = self.hmp.take() {
            let _ = r.get_mut().write_all(b"quit\n");
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
        }
        let _ = self.child.wait();
    }

    /// Waits for a console line containing `needle` (after the first
    /// `skip` lines); returns when it was read.
    pub fn wait_console(&self, needle: &str, skip: usize, deadline: Instant) -> (Instant, String) {
        let (lock, cond) = &*self.console;
        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some((at, l)) = st.lines.iter().skip(skip).find(|(_, l)| l.contains(needle)) {
                return (*at, l.clone());
            }
            let now = Instant::now();
            if st.closed || now >= deadline {
                let why = if st.closed {
                    "before QEMU exited"
                } else {
                    "before the deadline"
                };
                drop(st);
                panic!("{}: no console line with {needle:?} {why}", self.name);
            }
            st = cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Console lines so far.
    pub fn lines(&self) -> Vec<String> {
        let st = self.console.0.lock().unwrap_or_else(|p| p.into_inner());
        st.lines.iter().map(|(_, l)| l.clone()).collect()
    }
}

impl Drop for Q35 {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.hmp_path);
        if std::thread::panicking() {
            let lines = self.lines();
            let tail = lines.len().saturating_sub(60);
            eprintln!(
                "---- {} console (whole log {}) ----",
                self.name,
                self.log.display()
            );
            for l in &lines[tail..] {
                eprintln!("{l}");
            }
            eprintln!("---- end of {} console ----", self.name);
        }
    }
}

/// Reads HMP output up to the `(qemu) ` prompt.
fn read_prompt(r: &mut BufReader<UnixStream>, name: &str) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while !out.ends_with(b"(qemu) ") {
        match r.read(&mut byte) {
            Ok(1) => out.push(byte[0]),
            Ok(_) => break,
            Err(e) => panic!("{name}: HMP read: {e}"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
