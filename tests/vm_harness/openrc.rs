//! A guest whose init is real OpenRC, booted the way Alpine boots: busybox
//! `init` reads `/etc/inittab` and runs `openrc sysinit`, `openrc boot` and
//! `openrc default`. OpenRC itself is Debian's `openrc`, `librc1` and
//! `libeinfo1` (0.45, with supervise-daemon and its health checks, as Alpine
//! ships them), fetched with `apt-get download` + `dpkg -x` into the cache,
//! with the shared libraries its binaries need (found with `ldd`) copied from
//! this machine. The project's `openrc/guest-agent` and
//! `openrc/guest-agent.confd` go in unchanged as `/etc/init.d/guest-agent` and
//! `/etc/conf.d/guest-agent`, the binary as `/usr/local/bin/guest-agent`, and
//! the early script enables the service with `rc-update add guest-agent
//! default`, as an image builder would.
//!
//! Debian's openrc ships none of the small boot services Alpine has
//! (modules, loopback, hostname, networking): two stand-ins here load the
//! virtio modules, bring `lo` up, set the hostname, and run `udhcpc` as the
//! provider of `net`.
//!
//! Lines starting `@@GA ` are markers the test reads from the console; the
//! control script (inittab `once`, after the default runlevel) takes
//! commands from the console's input.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::vm_harness::assets::{self, Assets};
use crate::vm_harness::cpio::Cpio;
use crate::vm_harness::initramfs;

/// The Debian packages that make up OpenRC, and the one `/etc/insserv.conf`
/// (read by OpenRC's dependency scan of LSB headers) comes from.
const OPENRC_PACKAGES: [&str; 3] = ["openrc", "librc1", "libeinfo1"];
const INSSERV_PACKAGE: &str = "insserv";

/// Kernel modules for the virtio-mmio network device.
const ROOT_MODULES: [&str; 2] = ["virtio_mmio", "virtio_net"];

/// Lines appended to the shipped conf.d, as an image builder edits it: a
/// setting the agent must see as coming from its environment, and health
/// checks often enough for a test.
pub const CONFD_ADDITIONS: &str = "
# Added by the image build.
GUEST_AGENT_INTERVAL=1s
healthcheck_delay=5
healthcheck_timer=5
";

/// The assets and an initramfs with OpenRC as init.
pub struct Ready {
    pub assets: &'static Assets,
    pub initrd: &'static Path,
}

/// The prerequisites, or `None` after printing why the test is skipped.
/// With `CI=true` or `GUEST_AGENT_VM_TEST=require` a missing one panics.
pub fn ready(test: &str) -> Option<Ready> {
    static IMAGE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let prepared = assets::get().and_then(|a| {
        IMAGE
            .get_or_init(|| build(a))
            .as_ref()
            .map(|i| (a, i.as_path()))
            .map_err(Clone::clone)
    });
    match prepared {
        Ok((assets, initrd)) => Some(Ready { assets, initrd }),
        Err(why) if assets::required() => panic!(
            "{test}: OpenRC VM prerequisites missing (required by CI=true or \
             GUEST_AGENT_VM_TEST=require): {why}"
        ),
        Err(why) => {
            crate::vm_harness::report(format_args!(
                "{test}: SKIPPED, OpenRC VM prerequisites missing: {why}"
            ));
            None
        }
    }
}

/// The kernel arguments that make busybox init PID 1.
pub fn init_cmdline() -> Vec<String> {
    vec!["rdinit=/sbin/init".into()]
}

/// An archive with the parent directories of every entry made first.
struct Image {
    cpio: Cpio,
    dirs: BTreeSet<String>,
}

impl Image {
    fn dir(&mut self, path: &str) {
        let path = path.trim_end_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.dirs.insert(path.to_string());
        self.cpio.dir(path);
    }

    fn parent(&mut self, path: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.parent(path);
        self.cpio.file(path, mode, data);
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.parent(path);
        self.cpio.symlink(path, target);
    }

    /// Everything under `root` (a `dpkg -x` tree) but the docs, at the same
    /// place in the image.
    fn tree(&mut self, root: &Path, skip: &dyn Fn(&str) -> bool) -> Result<(), String> {
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let mut entries: Vec<PathBuf> = fs::read_dir(&dir)
                .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            for p in entries {
                let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
                if skip(&rel) {
                    continue;
                }
                let meta = fs::symlink_metadata(&p).map_err(|e| e.to_string())?;
                if meta.file_type().is_symlink() {
                    let target = fs::read_link(&p).map_err(|e| e.to_string())?;
                    self.symlink(&rel, &target.to_string_lossy());
                } else if meta.is_dir() {
                    self.dir(&rel);
                    stack.push(p);
                } else {
                    let data = fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                    self.file(&rel, meta.permissions().mode() & 0o7777, &data);
                }
            }
        }
        Ok(())
    }
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// Every ELF file under `dir`.
fn elf_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            elf_files(&p, out);
        } else if meta.is_file() && is_elf(&p) {
            out.push(p);
        }
    }
}

/// The shared libraries (and the loader) the ELF files under `trees` need
/// that the trees themselves do not hold: host paths, as `ldd` resolves them
/// with the trees' own library folders searched first.
fn needed_libraries(trees: &[PathBuf]) -> Result<BTreeSet<PathBuf>, String> {
    let libdir = std::env::join_paths(trees.iter().map(|t| t.join("lib/x86_64-linux-gnu")))
        .map_err(|e| e.to_string())?;
    let mut elves = Vec::new();
    for t in trees {
        elf_files(t, &mut elves);
    }
    if elves.is_empty() {
        return Err("no ELF files in the OpenRC packages".into());
    }
    let mut libs = BTreeSet::new();
    for elf in &elves {
        let out = assets::run(Command::new("ldd").arg(elf).env("LD_LIBRARY_PATH", &libdir))
            .map_err(|e| format!("{e} (is ldd, from libc-bin, installed?)"))?;
        for line in out.lines() {
            let line = line.trim();
            if line.contains("not found") {
                return Err(format!("{}: {line}", elf.display()));
            }
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x…)"; the vDSO has no path.
            let path = match line.split_once(" => ") {
                Some((_, rest)) => rest,
                None => line,
            };
            let path = path.split(" (").next().unwrap_or("").trim();
            if path.starts_with('/') && !trees.iter().any(|t| Path::new(path).starts_with(t)) {
                libs.insert(PathBuf::from(path));
            }
        }
    }
    Ok(libs)
}

fn build(assets: &Assets) -> Result<PathBuf, String> {
    let mut trees = Vec::new();
    for p in OPENRC_PACKAGES {
        trees.push(assets::fetch_deb(&assets.cache, p, &format!("deb-{p}"))?);
    }
    let insserv = assets::fetch_deb(
        &assets.cache,
        INSSERV_PACKAGE,
        &format!("deb-{INSSERV_PACKAGE}"),
    )?;
    let read = |p: &Path| fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let project = Path::new(env!("CARGO_MANIFEST_DIR"));

    let mut img = Image {
        cpio: Cpio::new(),
        dirs: BTreeSet::new(),
    };
    for d in [
        "/bin",
        "/sbin",
        "/usr/bin",
        "/usr/sbin",
        "/usr/local/bin",
        "/etc/conf.d",
        "/etc/init.d",
        "/etc/insserv.conf.d",
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/run",
        "/var/log",
        "/var/lib",
        "/root",
        "/lib/modules",
    ] {
        img.dir(d);
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    img.cpio.char_dev("/dev/console", 0o600, 5, 1);
    img.symlink("/var/run", "/run");

    // busybox: init, the shell and the tools; the rest of its applets are
    // linked by the early script.
    img.file("/bin/busybox", 0o755, &read(&assets.busybox)?);
    for applet in ["/sbin/init", "/bin/sh"] {
        img.symlink(applet, "/bin/busybox");
    }

    // OpenRC, its libraries, and what its scripts expect of /etc.
    let skip_docs = |rel: &str| rel.starts_with("/usr/share");
    let mut libs = BTreeSet::new();
    for t in &trees {
        img.tree(t, &skip_docs)?;
    }
    libs.extend(needed_libraries(&trees)?);
    for lib in &libs {
        let name = lib.to_string_lossy();
        img.file(&name, 0o755, &read(lib)?);
    }
    img.file(
        "/etc/insserv.conf",
        0o644,
        &read(&insserv.join("etc/insserv.conf"))?,
    );
    img.file("/etc/fstab", 0o644, b"");
    img.file("/etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    img.file("/etc/group", 0o644, b"root:x:0:\nuucp:x:10:\n");
    img.file("/etc/inittab", 0o644, INITTAB.as_bytes());

    // The stand-ins for Alpine's boot services.
    let modules = initramfs::resolve_modules(&assets.modules_dir, &ROOT_MODULES)?;
    let mut names = Vec::new();
    for (name, path) in &modules {
        img.file(
            &format!("/lib/modules/{name}.ko"),
            0o644,
            &initramfs::module_bytes(path)?,
        );
        names.push(name.as_str());
    }
    img.file(
        "/etc/init.d/ga-boot",
        0o755,
        GA_BOOT.replace("@MODULES@", &names.join(" ")).as_bytes(),
    );
    img.file("/etc/init.d/ga-net", 0o755, GA_NET.as_bytes());
    img.file(
        "/etc/udhcpc.script",
        0o755,
        initramfs::UDHCPC_SCRIPT.as_bytes(),
    );
    img.file("/etc/ga/early", 0o755, EARLY.as_bytes());
    img.file("/etc/ga/control", 0o755, CONTROL.as_bytes());

    // The project's own service, unchanged, and the binary where it expects it.
    img.file(
        "/etc/init.d/guest-agent",
        0o755,
        &read(&project.join("openrc/guest-agent"))?,
    );
    let mut confd = read(&project.join("openrc/guest-agent.confd"))?;
    confd.extend_from_slice(CONFD_ADDITIONS.as_bytes());
    img.file("/etc/conf.d/guest-agent", 0o644, &confd);
    img.file("/usr/local/bin/guest-agent", 0o755, &read(&assets.agent)?);

    let bytes = img.cpio.finish();
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let image = assets
        .cache
        .join(format!("initramfs-openrc-{hash:016x}.cpio"));
    if !image.is_file() {
        let tmp = image.with_extension(format!("tmp{}", std::process::id()));
        fs::write(&tmp, &bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        fs::rename(&tmp, &image).map_err(|e| format!("cannot write {}: {e}", image.display()))?;
    }
    crate::vm_harness::report(format_args!(
        "vm openrc: initramfs {} ({} bytes): OpenRC from {}, {} host libraries, modules {}",
        image.display(),
        bytes.len(),
        OPENRC_PACKAGES.join(" "),
        libs.len(),
        names.join(" ")
    ));
    Ok(image)
}

/// Alpine's inittab, plus the early mounts its initramfs does before
/// switch_root, and the test's control script once the default runlevel is
/// reached.
const INITTAB: &str = "\
::sysinit:/etc/ga/early
::sysinit:/sbin/openrc sysinit
::sysinit:/sbin/openrc boot
::wait:/sbin/openrc default
::once:/etc/ga/control
::shutdown:/sbin/openrc shutdown
";

/// What an initramfs does before handing over to the real root's init:
/// mounts, busybox's applets, and the image build's `rc-update` calls.
const EARLY: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "@@GA $*"; }
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}" ;; esac; done; }
# Whatever happens to the test, the VM ends.
(sleep "$(arg ga_watchdog)"; say watchdog; poweroff -f) &
rc-update add ga-boot boot
rc-update add ga-net boot
rc-update add guest-agent default
say early uptime=$(cut -d' ' -f1 /proc/uptime)
# OpenRC mounts /proc itself (busybox's in-process md5sum would make its
# check of an existing /proc report "cruft").
umount /proc
"#;

/// Boot runlevel: what Alpine's modules, loopback and hostname services do.
const GA_BOOT: &str = r#"#!/sbin/openrc-run
description="virtio modules, loopback, hostname (stand-in for Alpine's boot services)"
depend() {
	provide loopback hostname
}
start() {
	echo "@@GA boot-services uptime=$(cut -d' ' -f1 /proc/uptime)"
	ebegin "Loading modules, bringing up lo"
	for m in @MODULES@; do insmod "/lib/modules/$m.ko" || return 1; done
	ip link set lo up && hostname ga-vm
	eend $?
}
"#;

/// Boot runlevel: DHCP on eth0, the provider of `net` (Alpine: networking).
const GA_NET: &str = r#"#!/sbin/openrc-run
description="DHCP on eth0 (stand-in for Alpine's networking)"
depend() {
	need ga-boot
	provide net
}
start() {
	ebegin "DHCP on eth0"
	ip link set eth0 up && udhcpc -i eth0 -n -q -t 20 -T 1 -s /etc/udhcpc.script >/tmp/udhcpc.log 2>&1
	eend $?
	echo "@@GA net-up uptime=$(cut -d' ' -f1 /proc/uptime)"
}
"#;

/// The test's hands in the guest, started once the default runlevel is
/// reached. Every answer is one marker line.
const CONTROL: &str = r#"#!/bin/sh
# No globbing: OpenRC's " * " prefixes are echoed unquoted.
set -f
export EINFO_COLOR=NO
say() { echo "@@GA $*"; }
up() { cut -d' ' -f1 /proc/uptime; }
# The agent's pid as supervise-daemon recorded it (pidof would also match a
# running `guest-agent --health`).
child() { cat /run/openrc/options/guest-agent/child_pid 2>/dev/null; }
say default uptime=$(up) runlevel=$(rc-status -r)
while read -r cmd; do
    case "$cmd" in
    status\ *)
        set -- $cmd
        out=$(rc-service guest-agent status 2>&1)
        say "status-$2" rc=$? $out
        ;;
    start)
        out=$(rc-service guest-agent start 2>&1)
        say started rc=$? $out
        ;;
    config)
        pid=$(child)
        say env pid=$pid $(tr '\0' '\n' </proc/$pid/environ | grep '^GUEST_AGENT_' | tr '\n' ' ')
        # --print-config in the running agent's own environment.
        json=$(xargs -0 sh -c 'exec env -i "$@" /usr/local/bin/guest-agent --print-config' sh </proc/$pid/environ | tr -d '\n')
        say print-config $json
        ;;
    kill9)
        pid=$(child)
        kill -9 "$pid"
        say killed pid=$pid uptime=$(up)
        ;;
    sick)
        pid=$(child)
        kill -STOP "$pid"
        say sick pid=$pid uptime=$(up)
        ;;
    health\ *)
        set -- $cmd
        out=$(/usr/local/bin/guest-agent --health 2>&1)
        say "health-$2" rc=$? $out
        ;;
    sick-stop)
        # SIGSTOP, then `rc-service stop` as soon as the health check has
        # noted the failure: while it is stopping the agent for a restart.
        failed() { grep -c 'health check failed' /var/log/guest-agent.log; }
        n=$(failed)
        pid=$(child)
        kill -STOP "$pid"
        say sick-again pid=$pid uptime=$(up)
        i=0
        while [ "$(failed)" -le "$n" ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i + 1)); done
        t0=$(up)
        out=$(rc-service guest-agent stop 2>&1)
        rc=$?
        t1=$(up)
        say stopped-in-restart rc=$rc from=$t0 to=$t1 $out
        ;;
    pid)
        say pid $(child) start_count=$(cat /run/openrc/options/guest-agent/start_count 2>/dev/null)
        ;;
    stop)
        pid=$(child)
        t0=$(up)
        out=$(rc-service guest-agent stop 2>&1)
        rc=$?
        t1=$(up)
        [ -d "/proc/$pid" ] && left=running || left=gone
        say stopped rc=$rc from=$t0 to=$t1 agent=$left $out
        ;;
    log)
        say log-begin
        cat /var/log/guest-agent.log
        say log-end
        ;;
    off)
        break
        ;;
    esac
done
say poweroff
poweroff -f
"#;
