//! A guest whose PID 1 is a real systemd: Debian bookworm's systemd 252
//! and the libraries it links, fetched with `apt-get download` + `dpkg -x`
//! into the cache, unpacked into one initramfs that systemd runs on
//! directly (`rdinit=/lib/systemd/systemd`, no switch_root). Busybox
//! provides every other command (not init or the power-off family).
//!
//! The project's `systemd/guest-agent.service` goes in unchanged as
//! `/etc/systemd/system/guest-agent.service`, enabled in
//! `multi-user.target` as `systemctl enable` does, with
//! `systemd/guest-agent.default` as `/etc/default/guest-agent` (plus the
//! lines an image build appends), a drop-in with a shorter watchdog
//! ([`DROP_IN`]) and the drop-in docs/systemd.md gives for a root-only
//! token file ([`TOKEN_DROP_IN`]). Two units of the test's own: `ga-net.service` loads the
//! virtio modules and runs `udhcpc` (no network manager), and
//! `ga-control.service` starts after `multi-user.target` and takes the
//! test's commands from the serial console, answering with `@@GA ` marker
//! lines. `guest-agent-once.service` is the shipped unit's sandbox around
//! `guest-agent --once`, made from the shipped file by [`once_unit`], and
//! `ga-plain-once.service` the same command without it; likewise
//! `ga-families-sandboxed.service` and `ga-families-plain.service` push
//! over IPv6 and vsock with and without the shipped sandbox
//! ([`families_unit`]).

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::vm_harness::assets::{self, Assets};
use crate::vm_harness::cpio::Cpio;
use crate::vm_harness::initramfs;

/// systemd and every package whose libraries `ldd` names for systemd,
/// `libsystemd-shared-252.so` and `libsystemd-core-252.so`.
const PACKAGES: [&str; 23] = [
    "systemd",
    "libsystemd-shared",
    "libc6",
    "libacl1",
    "libapparmor1",
    "libaudit1",
    "libblkid1",
    "libcap-ng0",
    "libcap2",
    "libcrypt1",
    "libssl3",
    "libgcrypt20",
    "libgpg-error0",
    "libip4tc2",
    "libkmod2",
    "liblz4-1",
    "liblzma5",
    "libmount1",
    "libpam0g",
    "libpcre2-8-0",
    "libseccomp2",
    "libselinux1",
    "libzstd1",
];

/// Kernel modules for the virtio-mmio network device, and the vsock core
/// (the address family; no transport, there is no vsock device).
const ROOT_MODULES: [&str; 3] = ["virtio_mmio", "virtio_net", "vsock"];

/// The watchdog the test runs with, in seconds: shorter than the shipped
/// 30 s so that a stopped agent is restarted sooner.
pub const WATCHDOG_SEC: u64 = 10;

/// The drop-in an operator would write to tune the shipped unit: a shorter
/// watchdog and restart delay for the test.
pub const DROP_IN: &str = "[Service]\nWatchdogSec=10s\nRestartSec=1s\n";

/// The bearer token, in a root-only file the unprivileged agent cannot open.
pub const TOKEN: &str = "vm-systemd-token";

/// The drop-in docs/systemd.md#secrets gives for such a token file: systemd
/// hands it over as a credential only the agent's dynamic user can read.
pub const TOKEN_DROP_IN: &str = "[Service]
LoadCredential=token:/etc/guest-agent.token
Environment=GUEST_AGENT_TOKEN_FILE=%d/token
";

/// Lines appended to the shipped environment file, as an image build does.
pub const DEFAULT_ADDITIONS: &str = "
# Added by the image build.
GUEST_AGENT_INTERVAL=1s
";

/// The assets and an initramfs with systemd as PID 1.
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
            "{test}: systemd VM prerequisites missing (required by CI=true or \
             GUEST_AGENT_VM_TEST=require): {why}"
        ),
        Err(why) => {
            crate::vm_harness::report(format_args!(
                "{test}: SKIPPED, systemd VM prerequisites missing: {why}"
            ));
            None
        }
    }
}

/// The kernel arguments that make systemd PID 1 and boot multi-user.target
/// quietly.
pub fn init_cmdline() -> Vec<String> {
    [
        "rdinit=/lib/systemd/systemd",
        "systemd.unit=multi-user.target",
        "quiet",
    ]
    .map(String::from)
    .to_vec()
}

/// The shipped unit made into a oneshot around `guest-agent --once` under
/// the very same sandbox: every line but the service type, the command and
/// the restart and watchdog settings a oneshot cannot have.
pub fn once_unit(shipped: &str) -> String {
    let mut out = String::new();
    for line in shipped.lines() {
        let key = line.split('=').next().unwrap_or("");
        match key {
            "Type" => out.push_str("Type=oneshot\n"),
            "ExecStart" => out.push_str(
                "ExecStart=/usr/local/bin/guest-agent --once --url off --listen off\n\
                 StandardOutput=truncate:/run/ga-once-sandboxed.json\n",
            ),
            "NotifyAccess" | "Restart" | "RestartSec" | "WatchdogSec" | "WatchdogSignal"
            | "WantedBy" => {}
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// The URLs the address-family check pushes to, one per family the unit
/// allows besides AF_INET: nothing listens at either, so each push fails,
/// and the failure must be the same with and without the sandbox (never
/// "Address family not supported" or "Operation not permitted").
const FAMILY_URLS: [&str; 2] = [
    "http://[::1]:9/v1/guest-metrics",
    "vsock://2:1024/v1/guest-metrics",
];

/// A oneshot that runs the agent pushing to each of [`FAMILY_URLS`] for
/// 3 s, its log appended to `log`, with `sandbox` (the shipped unit's
/// service lines, or none) around it.
pub fn families_unit(sandbox: &str, log: &str) -> String {
    let mut out = String::from(
        "[Unit]\nDescription=the agent's address families\n\n[Service]\nType=oneshot\n",
    );
    for url in FAMILY_URLS {
        out.push_str(&format!(
            "ExecStart=-/usr/bin/timeout 3 /usr/local/bin/guest-agent --url {url} --listen off \
             --interval 1s --timeout 1s --kmsg off\n"
        ));
    }
    out.push_str(&format!("StandardError=append:{log}\n"));
    out.push_str(sandbox);
    out
}

/// The shipped unit's `[Service]` lines that make its sandbox: everything
/// but how and when the agent runs.
pub fn sandbox_lines(shipped: &str) -> String {
    let mut out = String::new();
    let mut in_service = false;
    for line in shipped.lines() {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        let key = line.split('=').next().unwrap_or("");
        if !in_service
            || line.starts_with('#')
            || line.trim().is_empty()
            || matches!(
                key,
                "Type"
                    | "NotifyAccess"
                    | "ExecStart"
                    | "EnvironmentFile"
                    | "Restart"
                    | "RestartSec"
                    | "RestartPreventExitStatus"
                    | "WatchdogSec"
                    | "WatchdogSignal"
                    | "TimeoutStopSec"
            )
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// An archive with the parent directories of every entry made first, and
/// each path written once (the first package to bring it wins).
struct Image {
    cpio: Cpio,
    paths: BTreeSet<String>,
}

impl Image {
    fn dir(&mut self, path: &str) {
        let path = path.trim_end_matches('/');
        if path.is_empty() || self.paths.contains(path) {
            return;
        }
        self.parent(path);
        self.paths.insert(path.to_string());
        self.cpio.dir(path);
    }

    fn parent(&mut self, path: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        if self.paths.insert(path.to_string()) {
            self.parent(path);
            self.cpio.file(path, mode, data);
        }
    }

    fn symlink(&mut self, path: &str, target: &str) {
        if self.paths.insert(path.to_string()) {
            self.parent(path);
            self.cpio.symlink(path, target);
        }
    }

    /// Everything under `root` (a `dpkg -x` tree) not skipped, at the same
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

/// What the guest does not need: documentation, locales, character-set
/// converters, OpenSSL's engines, and the biggest tools nothing here runs
/// (networkd above all: the guest has no network manager on purpose).
fn pruned(rel: &str) -> bool {
    const PREFIXES: [&str; 8] = [
        "/usr/share/doc",
        "/usr/share/man",
        "/usr/share/locale",
        "/usr/share/zsh",
        "/usr/share/bash-completion",
        "/usr/share/lintian",
        "/usr/lib/x86_64-linux-gnu/gconv",
        "/usr/lib/x86_64-linux-gnu/engines-3",
    ];
    const FILES: [&str; 5] = [
        "/lib/systemd/systemd-networkd",
        "/bin/networkctl",
        "/bin/systemd-repart",
        "/usr/lib/x86_64-linux-gnu/ossl-modules",
        "/usr/lib/x86_64-linux-gnu/cryptsetup",
    ];
    PREFIXES.iter().any(|p| rel.starts_with(p)) || FILES.contains(&rel)
}

fn build(assets: &Assets) -> Result<PathBuf, String> {
    let mut trees = Vec::new();
    for p in PACKAGES {
        trees.push(assets::fetch_deb(&assets.cache, p, &format!("deb-{p}"))?);
    }
    let read = |p: &Path| fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let project = Path::new(env!("CARGO_MANIFEST_DIR"));

    let mut img = Image {
        cpio: Cpio::new(),
        paths: BTreeSet::new(),
    };
    for d in [
        "/proc",
        "/sys",
        "/dev",
        "/run",
        "/var/log",
        "/var/lib/systemd",
        "/home",
        "/usr/local/bin",
        "/etc/systemd/system/multi-user.target.wants",
        "/lib/modules",
    ] {
        img.dir(d);
    }
    // Sticky and world-writable, as PrivateTmp= expects of both.
    for d in ["/tmp", "/var/tmp"] {
        img.parent(d);
        img.paths.insert(d.to_string());
        img.cpio.dir_mode(d, 0o1777);
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    img.paths.insert("/dev/console".into());
    img.cpio.char_dev("/dev/console", 0o600, 5, 1);

    for t in &trees {
        img.tree(t, &pruned)?;
    }

    // Busybox for every command no package brings, but not init and the
    // power-off family: systemd is PID 1.
    img.file("/bin/busybox", 0o755, &read(&assets.busybox)?);
    let applets = assets::run(Command::new(&assets.busybox).arg("--list-full"))?;
    for a in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if matches!(
            a,
            "sbin/init" | "linuxrc" | "sbin/halt" | "sbin/poweroff" | "sbin/reboot"
        ) {
            continue;
        }
        img.symlink(&format!("/{a}"), "/bin/busybox");
    }

    // What systemd and its tools expect of /etc.
    img.file(
        "/etc/machine-id",
        0o444,
        b"0123456789abcdef0123456789abcdef\n",
    );
    img.file(
        "/etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    );
    img.file("/etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n");
    img.file(
        "/etc/nsswitch.conf",
        0o644,
        b"passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
    );
    img.file("/etc/os-release", 0o644, OS_RELEASE.as_bytes());
    img.file("/etc/fstab", 0o644, b"");
    // Units that wait for what this guest lacks: serial-getty waits 90 s
    // for dev-ttyS0.device (no udev), binfmt_misc needs autofs4, and
    // modprobe@ finds no module tree.
    for u in [
        "getty.target",
        "proc-sys-fs-binfmt_misc.automount",
        "modprobe@.service",
    ] {
        img.symlink(&format!("/etc/systemd/system/{u}"), "/dev/null");
    }

    // The network, as a minimal image without a network manager has it.
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
        "/etc/ga/net",
        0o755,
        GA_NET_SCRIPT
            .replace("@MODULES@", &names.join(" "))
            .as_bytes(),
    );
    img.file(
        "/etc/udhcpc.script",
        0o755,
        initramfs::UDHCPC_SCRIPT.as_bytes(),
    );
    img.file(
        "/etc/systemd/system/ga-net.service",
        0o644,
        GA_NET_UNIT.as_bytes(),
    );
    img.symlink(
        "/etc/systemd/system/multi-user.target.wants/ga-net.service",
        "../ga-net.service",
    );
    img.file("/etc/ga/control", 0o755, CONTROL.as_bytes());
    img.file(
        "/etc/systemd/system/ga-control.service",
        0o644,
        GA_CONTROL_UNIT.as_bytes(),
    );
    img.symlink(
        "/etc/systemd/system/multi-user.target.wants/ga-control.service",
        "../ga-control.service",
    );

    // The project's unit and environment file, the binary where the unit
    // expects it, enabled as `systemctl enable guest-agent` does.
    let unit = read(&project.join("systemd/guest-agent.service"))?;
    let unit = String::from_utf8(unit).map_err(|e| format!("the unit is not UTF-8: {e}"))?;
    img.file(
        "/etc/systemd/system/guest-agent.service",
        0o644,
        unit.as_bytes(),
    );
    img.file(
        "/etc/systemd/system/guest-agent.service.d/test.conf",
        0o644,
        DROP_IN.as_bytes(),
    );
    img.file(
        "/etc/systemd/system/guest-agent.service.d/token.conf",
        0o644,
        TOKEN_DROP_IN.as_bytes(),
    );
    img.file(
        "/etc/guest-agent.token",
        0o600,
        format!("{TOKEN}\n").as_bytes(),
    );
    img.symlink(
        "/etc/systemd/system/multi-user.target.wants/guest-agent.service",
        "../guest-agent.service",
    );
    img.file(
        "/etc/systemd/system/guest-agent-once.service",
        0o644,
        once_unit(&unit).as_bytes(),
    );
    img.file(
        "/etc/systemd/system/ga-plain-once.service",
        0o644,
        PLAIN_ONCE_UNIT.as_bytes(),
    );
    let sandbox = sandbox_lines(&unit);
    img.file(
        "/etc/systemd/system/ga-families-sandboxed.service",
        0o644,
        families_unit(&sandbox, "/run/ga-families-sandboxed.log").as_bytes(),
    );
    img.file(
        "/etc/systemd/system/ga-families-plain.service",
        0o644,
        families_unit("", "/run/ga-families-plain.log").as_bytes(),
    );
    let mut default = read(&project.join("systemd/guest-agent.default"))?;
    default.extend_from_slice(DEFAULT_ADDITIONS.as_bytes());
    img.file("/etc/default/guest-agent", 0o644, &default);
    img.file("/usr/local/bin/guest-agent", 0o755, &read(&assets.agent)?);

    let bytes = img.cpio.finish();
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let image = assets
        .cache
        .join(format!("initramfs-systemd-{hash:016x}.cpio"));
    if !image.is_file() {
        let tmp = image.with_extension(format!("tmp{}", std::process::id()));
        fs::write(&tmp, &bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        fs::rename(&tmp, &image).map_err(|e| format!("cannot write {}: {e}", image.display()))?;
    }
    crate::vm_harness::report(format_args!(
        "vm systemd: initramfs {} ({} bytes, {} entries): {} packages, modules {}",
        image.display(),
        bytes.len(),
        img.paths.len(),
        PACKAGES.len(),
        names.join(" ")
    ));
    Ok(image)
}

const OS_RELEASE: &str = r#"PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
"#;

/// DHCP on eth0, the stand-in for whatever brings the network up in an
/// image (ifupdown, networkd, NetworkManager): the agent's unit names none.
const GA_NET_UNIT: &str = "[Unit]
Description=virtio modules and DHCP on eth0 (the test's network)

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/etc/ga/net
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
";

const GA_NET_SCRIPT: &str = r#"#!/bin/sh
for m in @MODULES@; do insmod "/lib/modules/$m.ko" || echo "@@GA insmod-failed $m"; done
ip link set eth0 up
if udhcpc -i eth0 -n -q -t 20 -T 1 -s /etc/udhcpc.script >/run/udhcpc.log 2>&1; then
    echo "@@GA net-up uptime=$(cut -d' ' -f1 /proc/uptime)"
else
    echo "@@GA net-failed"; cat /run/udhcpc.log
fi
"#;

/// The test's hands in the guest: after multi-user.target, not part of
/// it (a unit of the boot transaction would hold it back), and the VM
/// powers off when it ends.
const GA_CONTROL_UNIT: &str = "[Unit]
Description=the test's control script
DefaultDependencies=no
Wants=guest-agent.service
After=guest-agent.service multi-user.target
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=simple
Environment=SYSTEMD_COLORS=0 SYSTEMD_PAGER= SYSTEMD_LESS=
ExecStart=/etc/ga/control

[Install]
WantedBy=multi-user.target
";

/// The same `--once` as `guest-agent-once.service`, with the same
/// environment file but no sandbox.
const PLAIN_ONCE_UNIT: &str = "[Unit]
Description=guest-agent --once without a sandbox

[Service]
Type=oneshot
EnvironmentFile=-/etc/default/guest-agent
ExecStart=/usr/local/bin/guest-agent --once --url off --listen off
StandardOutput=truncate:/run/ga-once-plain.json
";

/// Commands from the serial console, one marker line per answer.
const CONTROL: &str = r#"#!/bin/sh
exec </dev/ttyS0 >/dev/ttyS0 2>&1
# No globbing: JSON and status words are echoed unquoted.
set -f
say() { echo "@@GA $*"; }
up() { cut -d' ' -f1 /proc/uptime; }
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}" ;; esac; done; }
# Whatever happens to the test, the VM ends.
(sleep "$(arg ga_watchdog)"; say watchdog; echo o >/proc/sysrq-trigger) &
show() { systemctl show guest-agent -p "$1" --value; }
pid() { show MainPID; }
say control uptime=$(up) system=$(systemctl is-system-running --wait)
while read -r cmd; do
    case "$cmd" in
    state\ *)
        set -- $cmd
        p=$(pid)
        uid=$(awk '/^Uid:/ {print $2}' "/proc/$p/status" 2>/dev/null)
        kmsg=$(ls -l "/proc/$p/fd" 2>/dev/null | grep -c /dev/kmsg)
        say "state-$2" active=$(show ActiveState) sub=$(show SubState) pid=$p \
            restarts=$(show NRestarts) result=$(show Result) type=$(show Type) \
            watchdog=$(show WatchdogUSec) uid=$uid kmsg=$kmsg \
            dmesg_restrict=$(cat /proc/sys/kernel/dmesg_restrict) uptime=$(up)
        say "status-text-$2" $(show StatusText)
        ;;
    health\ *)
        set -- $cmd
        body=$(wget -q -O - http://127.0.0.1:8080/health 2>&1)
        say "health-$2" rc=$? $body
        ;;
    kill9)
        p=$(pid)
        kill -9 "$p"
        say killed pid=$p uptime=$(up)
        ;;
    sigstop)
        p=$(pid)
        kill -STOP "$p"
        say stopped-process pid=$p uptime=$(up)
        ;;
    stop)
        p=$(pid)
        t0=$(up)
        systemctl stop guest-agent
        rc=$?
        t1=$(up)
        [ -d "/proc/$p" ] && left=running || left=gone
        say stopped rc=$rc from=$t0 to=$t1 agent=$left active=$(show ActiveState)
        ;;
    compare)
        # The same agent's sample under the shipped unit's sandbox and
        # without it, back to back on a quiet guest (nothing else pushes),
        # each a oneshot beside one waiting systemctl.
        systemctl start guest-agent-once
        r1=$?
        systemctl start ga-plain-once
        r2=$?
        say once-sandboxed rc=$r1 $(tr -d '\n' </run/ga-once-sandboxed.json)
        say once-plain rc=$r2 $(tr -d '\n' </run/ga-once-plain.json)
        ;;
    bad-args)
        # A usage error in the environment file: the start fails, and
        # RestartPreventExitStatus=2 keeps systemd from looping on it (the
        # drop-in's RestartSec is 1 s; 5 s leave room for several restarts).
        echo 'GUEST_AGENT_ARGS="--no-such-flag"' >>/etc/default/guest-agent
        systemctl start guest-agent
        rc=$?
        sleep 5
        say bad-args rc=$rc active=$(show ActiveState) sub=$(show SubState) \
            result=$(show Result) status=$(show ExecMainStatus) restarts=$(show NRestarts)
        ;;
    port9000)
        # The pull port a pulling manager uses (docs/manager.md), on every
        # address, asked at the guest's own address on eth0.
        sed -i '/^GUEST_AGENT_ARGS=/d' /etc/default/guest-agent
        echo 'GUEST_AGENT_LISTEN=0.0.0.0:9000' >>/etc/default/guest-agent
        systemctl start guest-agent
        rc=$?
        ip=$(ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1)
        body=$(wget -q -O - "http://$ip:9000/health" 2>&1)
        wrc=$?
        say port9000 rc=$rc ip=$ip active=$(show ActiveState)
        say port9000-health rc=$wrc $body
        systemctl stop guest-agent
        ;;
    families)
        for how in sandboxed plain; do
            systemctl start "ga-families-$how"
            say "families-$how" rc=$? \
                "$(sed -n 's/.*push failed: \(.*\); keeping.*/\1/p' "/run/ga-families-$how.log" | tr '\n' '|')"
        done
        ;;
    journal)
        say journal-begin
        journalctl -u guest-agent -u guest-agent-once -o short-monotonic --no-pager
        say journal-end
        ;;
    off)
        break
        ;;
    esac
done
say poweroff
"#;
