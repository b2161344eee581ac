//! What a VM test needs from the machine, located once per test process:
//! QEMU, a Debian cloud kernel and its virtio modules, a static busybox and
//! the static musl `guest-agent`; packages are fetched with `apt-get download`
//! + `dpkg -x` into a cache folder and reused between runs.
//!
//! Environment:
//! - `GUEST_AGENT_VM_TEST`: `require` makes a missing prerequisite fail (as
//!   does `CI=true`); `skip` skips the VM tests.
//! - `GUEST_AGENT_VM_CACHE`: the cache folder (default `target/vm-cache`).
//! - `GUEST_AGENT_VM_QEMU`: the QEMU binary (default `qemu-system-x86_64`).
//! - `GUEST_AGENT_VM_KERNEL_DIR`: an extracted kernel package (a tree with
//!   `boot/vmlinuz-*` and `lib/modules/*`), instead of fetching one.
//! - `GUEST_AGENT_VM_BUSYBOX`: a static busybox binary.
//! - `GUEST_AGENT_MUSL_BIN`: the static musl `guest-agent`; without it the
//!   test builds one with its own `--target-dir` (`target/vm-musl`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The kernel's meta-package; it depends on the current versioned image.
const KERNEL_META: &str = "linux-image-cloud-amd64";
const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// Everything located and ready.
#[derive(Debug)]
pub struct Assets {
    pub qemu: PathBuf,
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
    pub busybox: PathBuf,
    pub agent: PathBuf,
    pub cache: PathBuf,
}

/// Whether a missing prerequisite fails the test rather than skipping it.
pub fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("GUEST_AGENT_VM_TEST").is_ok_and(|v| v == "require")
}

/// The assets, or why they cannot be had. Located once per process.
pub fn get() -> Result<&'static Assets, String> {
    static ASSETS: OnceLock<Result<Assets, String>> = OnceLock::new();
    ASSETS.get_or_init(locate).as_ref().map_err(Clone::clone)
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn locate() -> Result<Assets, String> {
    if std::env::var("GUEST_AGENT_VM_TEST").is_ok_and(|v| v == "skip") {
        return Err("GUEST_AGENT_VM_TEST=skip".into());
    }
    let cache = std::env::var_os("GUEST_AGENT_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("target/vm-cache"));
    fs::create_dir_all(&cache).map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
    let qemu = find_qemu()?;
    let kernel_root = match std::env::var_os("GUEST_AGENT_VM_KERNEL_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => fetch_kernel(&cache)?,
    };
    let (vmlinuz, modules_dir) = kernel_files(&kernel_root)?;
    let busybox = find_busybox(&cache)?;
    let agent = find_agent()?;
    Ok(Assets {
        qemu,
        vmlinuz,
        modules_dir,
        busybox,
        agent,
        cache,
    })
}

pub fn find_qemu() -> Result<PathBuf, String> {
    let qemu = std::env::var_os("GUEST_AGENT_VM_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
    match Command::new(&qemu).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(qemu),
        Ok(out) => Err(format!(
            "{} --version failed: {}",
            qemu.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!(
            "{} not found ({e}); install the Debian package qemu-system-x86",
            qemu.display()
        )),
    }
}

/// Runs a command, returning its stdout, or an error naming it.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `apt-get download PKG` + `dpkg -x` into `cache/NAME`, unless already
/// there; the extraction is renamed into place only when complete.
pub fn fetch_deb(cache: &Path, package: &str, name: &str) -> Result<PathBuf, String> {
    let dest = cache.join(name);
    if dest.is_dir() {
        return Ok(dest);
    }
    let work = cache.join(format!(".{name}.{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    run(Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(&work))
    .map_err(|e| format!("{e} (is apt-get update done? is the network to Debian up?)"))?;
    let deb = fs::read_dir(&work)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("apt-get download {package} left no .deb"))?;
    let tree = work.join("tree");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&tree))?;
    fs::rename(&tree, &dest).map_err(|e| format!("cannot move into {}: {e}", dest.display()))?;
    let _ = fs::remove_dir_all(&work);
    Ok(dest)
}

/// The cached kernel tree, or the current `linux-image-*-cloud-amd64`
/// (the one the meta-package depends on) fetched into the cache.
fn fetch_kernel(cache: &Path) -> Result<PathBuf, String> {
    if let Some(existing) = fs::read_dir(cache)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-image-") && n.ends_with("-cloud-amd64"))
        })
        .max()
    {
        return Ok(existing);
    }
    let deps = run(Command::new("apt-cache").args(["depends", KERNEL_META]))
        .map_err(|e| format!("{e} (run apt-get update first)"))?;
    let package = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .ok_or_else(|| {
            format!("apt-cache depends {KERNEL_META} names no kernel image (run apt-get update)")
        })?
        .to_string();
    fetch_deb(cache, &package, &package)
}

pub fn kernel_files(root: &Path) -> Result<(PathBuf, PathBuf), String> {
    let pick = |dir: &Path, pred: &dyn Fn(&str) -> bool| -> Option<PathBuf> {
        fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(pred))
            .max()
    };
    let vmlinuz = pick(&root.join("boot"), &|n| n.starts_with("vmlinuz-"))
        .ok_or_else(|| format!("no boot/vmlinuz-* under {}", root.display()))?;
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .find_map(|d| pick(&root.join(d), &|_| true))
        .ok_or_else(|| format!("no lib/modules/* under {}", root.display()))?;
    Ok((vmlinuz, modules))
}

/// True for an ELF executable without a program interpreter (static).
fn is_static_elf(path: &Path) -> bool {
    let Ok(b) = fs::read(path) else {
        return false;
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        // PT_INTERP = 3
        o + 4 <= b.len() && u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) != 3
    })
}

pub fn find_busybox(cache: &Path) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("GUEST_AGENT_VM_BUSYBOX") {
        let p = PathBuf::from(p);
        return if is_static_elf(&p) {
            Ok(p)
        } else {
            Err(format!("{} is not a static ELF binary", p.display()))
        };
    }
    for p in ["/usr/bin/busybox", "/bin/busybox"] {
        if is_static_elf(Path::new(p)) {
            return Ok(PathBuf::from(p));
        }
    }
    let tree = fetch_deb(cache, "busybox-static", "busybox-static")?;
    ["usr/bin/busybox", "bin/busybox"]
        .iter()
        .map(|p| tree.join(p))
        .find(|p| is_static_elf(p))
        .ok_or_else(|| format!("no static busybox in {}", tree.display()))
}

pub fn find_agent() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("GUEST_AGENT_MUSL_BIN") {
        let p = PathBuf::from(p);
        return if is_static_elf(&p) {
            Ok(p)
        } else {
            Err(format!(
                "GUEST_AGENT_MUSL_BIN={} is not a static ELF binary",
                p.display()
            ))
        };
    }
    let target_dir = manifest_dir().join("target/vm-musl");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    super::report(format_args!(
        "vm: building the static guest-agent ({MUSL_TARGET}) into target/vm-musl"
    ));
    run(Command::new(cargo)
        .args([
            "build",
            "--release",
            "--bin",
            "guest-agent",
            "--target",
            MUSL_TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(manifest_dir()))
    .map_err(|e| format!("{e} (is the {MUSL_TARGET} target installed?)"))?;
    let bin = target_dir.join(MUSL_TARGET).join("release/guest-agent");
    if is_static_elf(&bin) {
        Ok(bin)
    } else {
        Err(format!("{} is not a static ELF binary", bin.display()))
    }
}
