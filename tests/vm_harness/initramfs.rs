//! The guest's initramfs: busybox, the virtio network modules the kernel
//! lacks (in dependency order), the static `guest-agent`, a DHCP script and
//! an `/init` that runs the scenario named on the kernel command line.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::assets::Assets;
use super::cpio::Cpio;

/// The modules a microvm needs for its virtio-mmio network device (and a
/// disk, for the fixture capture); their dependencies are found from each
/// module's `depends=` modinfo.
const ROOT_MODULES: [&str; 3] = ["virtio_mmio", "virtio_net", "virtio_blk"];

/// The initramfs image, built once per test process.
pub fn get(assets: &Assets) -> Result<&'static Path, String> {
    static IMAGE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| build(assets))
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(Clone::clone)
}

fn build(assets: &Assets) -> Result<PathBuf, String> {
    assemble(&Image {
        modules_dir: &assets.modules_dir,
        root_modules: &ROOT_MODULES,
        busybox: &assets.busybox,
        agent: &assets.agent,
        init: INIT_SCRIPT,
        cache: &assets.cache,
        name: "initramfs",
    })
}

/// What goes into a busybox initramfs with the agent.
pub struct Image<'a> {
    pub modules_dir: &'a Path,
    /// Modules to load, their dependencies found and loaded first.
    pub root_modules: &'a [&'a str],
    pub busybox: &'a Path,
    pub agent: &'a Path,
    /// The init script; `@MODULES@` becomes the modules in load order.
    pub init: &'a str,
    pub cache: &'a Path,
    /// The image file's name before its content hash.
    pub name: &'a str,
}

/// Builds the image into the cache, named by its content (written once, so
/// the archive is reproducible and parallel runs share it).
pub fn assemble(spec: &Image<'_>) -> Result<PathBuf, String> {
    let modules = resolve_modules(spec.modules_dir, spec.root_modules)?;
    let mut c = Cpio::new();
    for d in [
        "/bin",
        "/sbin",
        "/usr",
        "/usr/bin",
        "/usr/sbin",
        "/etc",
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/lib",
        "/lib/modules",
    ] {
        c.dir(d);
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    c.char_dev("/dev/console", 0o600, 5, 1);
    let read = |p: &Path| fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    c.file("/bin/busybox", 0o755, &read(spec.busybox)?);
    c.file("/usr/bin/guest-agent", 0o755, &read(spec.agent)?);
    let mut names = Vec::new();
    for (name, path) in &modules {
        c.file(
            &format!("/lib/modules/{name}.ko"),
            0o644,
            &module_bytes(path)?,
        );
        names.push(name.as_str());
    }
    c.file("/etc/udhcpc.script", 0o755, UDHCPC_SCRIPT.as_bytes());
    let init = spec.init.replace("@MODULES@", &names.join(" "));
    c.file("/init", 0o755, init.as_bytes());
    let bytes = c.finish();
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let image = spec.cache.join(format!("{}-{hash:016x}.cpio", spec.name));
    if !image.is_file() {
        let tmp = image.with_extension(format!("tmp{}", std::process::id()));
        fs::write(&tmp, &bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        fs::rename(&tmp, &image).map_err(|e| format!("cannot write {}: {e}", image.display()))?;
    }
    Ok(image)
}

/// The module's bytes, decompressed on the host where the package ships
/// them compressed (`.ko.xz`, `.ko.zst`, `.ko.gz`).
pub fn module_bytes(path: &Path) -> Result<Vec<u8>, String> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else if name.ends_with(".ko.gz") {
        "gzip"
    } else {
        return fs::read(path).map_err(|e| format!("cannot read {name}: {e}"));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(|e| format!("cannot run {tool} to decompress {name}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{tool} -dc {name} failed"));
    }
    Ok(out.stdout)
}

/// A module's name as the kernel knows it: the file stem, `-` as `_`.
fn module_name(file: &str) -> Option<String> {
    let stem = file.split(".ko").next()?;
    (file.len() > stem.len()).then(|| stem.replace('-', "_"))
}

fn walk(dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else if let Some(name) = p.file_name().and_then(|n| n.to_str()).and_then(module_name) {
            out.insert(name, p);
        }
    }
}

/// The `depends=` entry of a module's `.modinfo` section.
fn depends(bytes: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = bytes.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &bytes[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

/// The loadable modules needed for `roots`, dependencies first; built-in
/// ones (listed in `modules.builtin`) are skipped.
pub fn resolve_modules(
    modules_dir: &Path,
    roots: &[&str],
) -> Result<Vec<(String, PathBuf)>, String> {
    let mut files = BTreeMap::new();
    walk(modules_dir, &mut files);
    let builtin: BTreeSet<String> = fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next().and_then(module_name))
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        files: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<(String, PathBuf)>,
    ) -> Result<(), String> {
        if !seen.insert(name.to_string()) || builtin.contains(name) {
            return Ok(());
        }
        let path = files
            .get(name)
            .ok_or_else(|| format!("module {name} is neither built in nor shipped"))?;
        for dep in depends(&module_bytes(path)?) {
            visit(&dep, files, builtin, seen, order)?;
        }
        order.push((name.to_string(), path.clone()));
        Ok(())
    }
    for root in roots {
        visit(root, &files, &builtin, &mut seen, &mut order)?;
    }
    Ok(order)
}

/// busybox udhcpc calls this with the lease in its environment.
pub const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    ;;
esac
exit 0
"#;

/// The guest's init. Lines starting `@@GA ` are markers the test reads from
/// the serial console; commands come back as lines on the console's input.
const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
hostname ga-vm
say() { echo "@@GA $*"; }
uptime_now() { cut -d' ' -f1 /proc/uptime; }
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}" ;; esac; done; }
scenario=$(arg ga_scenario)
# Whatever happens to the test, the VM ends.
(sleep "$(arg ga_watchdog)"; say watchdog; poweroff -f) &
for m in @MODULES@; do insmod "/lib/modules/$m.ko" || say insmod-failed "$m"; done
ip link set lo up
ip link set eth0 up || say no-eth0
say boot scenario=$scenario uptime=$(uptime_now)

net_up() {
    say dhcp-start uptime=$(uptime_now)
    if udhcpc -i eth0 -n -q -t 20 -T 1 -s /etc/udhcpc.script >/tmp/udhcpc.log 2>&1; then
        say net-up uptime=$(uptime_now) ip=$(ip -4 -o addr show eth0 | awk '{print $4}')
    else
        say net-failed; cat /tmp/udhcpc.log
    fi
}
respawn() {
    while :; do
        /usr/bin/guest-agent
        say agent-exited $? uptime=$(uptime_now)
        sleep 1
    done
}
dump() {
    for f in "$@"; do
        [ -f "/proc/$f" ] || continue
        say file "$f"
        cat "/proc/$f"
        say end
    done
}

case "$scenario" in
once)
    net_up
    /usr/bin/guest-agent --once >/tmp/once.json
    say once-exit $?
    echo "@@GA once-json $(tr -d '\n' </tmp/once.json)"
    ;;
capture)
    net_up
    # Some real traffic on the disk, as a Firecracker rootfs would see.
    dd if=/dev/vda of=/dev/null bs=64k count=16 2>/dev/null
    dd if=/dev/zero of=/dev/vda bs=4k count=8 conv=fsync 2>/dev/null
    sleep 2
    dump stat meminfo loadavg uptime diskstats net/dev net/route cmdline \
        sys/kernel/hostname sys/kernel/random/boot_id \
        pressure/cpu pressure/memory pressure/io
    ;;
push)
    net_up
    /usr/bin/guest-agent &
    say agent-started uptime=$(uptime_now)
    ;;
late-net)
    respawn &
    say agent-started uptime=$(uptime_now)
    sleep "$(arg ga_net_delay)"
    net_up
    ;;
esac

say ready
burners=""
while read -r cmd; do
    case "$cmd" in
    burn)
        for i in 1 2; do sh -c 'while :; do :; done' & burners="$burners $!"; done
        say burning uptime=$(uptime_now)
        ;;
    cool)
        kill $burners; burners=""
        say cooled uptime=$(uptime_now)
        ;;
    kill)
        pids=$(pidof guest-agent)
        kill -9 $pids
        say killed $pids uptime=$(uptime_now)
        ;;
    off)
        break
        ;;
    esac
done
say poweroff
poweroff -f
"#;
