//! One QEMU microvm under TCG, its serial console read line by line, its
//! console input for commands to the guest's init, killed on drop.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::assets::Assets;

/// The prefix of the init script's marker lines.
pub const MARK: &str = "@@GA ";

/// The VM's shape: kept in one place, since the tests check the guest sees it.
pub const MEMORY_MIB: u64 = 256;
pub const CPUS: u32 = 2;

/// What a VM wrote to its console so far, shared with the reader threads.
#[derive(Default)]
pub struct ConsoleState {
    pub lines: Vec<(Instant, String)>,
    pub closed: bool,
}

pub type Console = Arc<(Mutex<ConsoleState>, Condvar)>;

pub struct Vm {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    console: Console,
    pub started: Instant,
    pub log: PathBuf,
}

/// What to boot: the scenario for the init script and extra kernel arguments.
pub struct Boot<'a> {
    pub name: &'a str,
    pub scenario: &'a str,
    pub cmdline: Vec<String>,
    /// The guest powers itself off after this long, whatever happens.
    pub watchdog: Duration,
    /// Further QEMU arguments.
    pub qemu_args: Vec<String>,
}

impl Vm {
    pub fn start(assets: &Assets, initrd: &std::path::Path, boot: Boot<'_>) -> Vm {
        Self::launch(assets, initrd, boot, true)
    }

    /// A VM with no network device at all (its other devices come from
    /// `boot.qemu_args`, e.g. a vsock device).
    #[allow(dead_code)] // not every test crate that includes the harness boots one
    pub fn start_without_network(assets: &Assets, initrd: &std::path::Path, boot: Boot<'_>) -> Vm {
        Self::launch(assets, initrd, boot, false)
    }

    fn launch(assets: &Assets, initrd: &std::path::Path, boot: Boot<'_>, network: bool) -> Vm {
        let netdev: &[&str] = if network {
            &[
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-device,netdev=n0",
            ]
        } else {
            &[]
        };
        let mut append = vec![
            "console=ttyS0".to_string(),
            "reboot=k".into(),
            "panic=1".into(),
            "pci=off".into(),
            format!("ga_scenario={}", boot.scenario),
            format!("ga_watchdog={}", boot.watchdog.as_secs()),
            // Under TCG the guest's TSC is the host's, and the microvm has no
            // PIT/HPET reference to calibrate it against: without the
            // frequency the kernel hangs early in most boots.
            format!("tsc_early_khz={}", host_tsc_khz()),
        ];
        append.extend(boot.cmdline);
        let log_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/vm-logs");
        std::fs::create_dir_all(&log_dir).expect("create target/vm-logs");
        let log = log_dir.join(format!("{}.log", boot.name));
        let mut child = Command::new(&assets.qemu)
            .args(["-M", "microvm", "-accel", "tcg"])
            .args(["-m", &MEMORY_MIB.to_string(), "-smp", &CPUS.to_string()])
            .args(["-no-user-config", "-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(&assets.vmlinuz)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", &append.join(" ")])
            .args(netdev)
            .args(&boot.qemu_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", assets.qemu.display()));
        let started = Instant::now();
        let console: Console = Arc::default();
        let file = Arc::new(Mutex::new(File::create(&log).expect("create console log")));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        spawn_reader(stdout, "", console.clone(), file.clone(), true);
        spawn_reader(stderr, "qemu: ", console.clone(), file, false);
        Vm {
            name: boot.name.to_string(),
            stdin: child.stdin.take(),
            child,
            console,
            started,
            log,
        }
    }

    /// Sends one command line to the guest's init.
    pub fn send(&mut self, cmd: &str) {
        let stdin = self.stdin.as_mut().expect("console input open");
        stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: cannot send {cmd:?}: {e}", self.name));
    }

    /// Waits for a marker line `@@GA <word>…`, returning the rest of the line
    /// and when it was read. Panics at the deadline or when QEMU is gone.
    pub fn wait_marker(&self, word: &str, deadline: Instant) -> (Instant, String) {
        let (lock, cond) = &*self.console;
        let mut st = lock.lock().unwrap();
        loop {
            let found = st.lines.iter().find_map(|(at, l)| {
                let rest = marker(l)?.strip_prefix(word)?;
                (rest.is_empty() || rest.starts_with(' ')).then(|| (*at, rest.trim().to_string()))
            });
            if let Some(f) = found {
                return f;
            }
            let now = Instant::now();
            if st.closed || now >= deadline {
                drop(st);
                panic!(
                    "{}: no `{MARK}{word}` on the console {}",
                    self.name,
                    if now >= deadline {
                        "before the deadline"
                    } else {
                        "before QEMU exited"
                    }
                );
            }
            st = cond.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    /// Every console line so far.
    pub fn lines(&self) -> Vec<String> {
        let st = self.console.0.lock().unwrap();
        st.lines.iter().map(|(_, l)| l.clone()).collect()
    }

    /// Waits for QEMU to exit by itself (the guest's `poweroff -f`).
    pub fn wait_exit(&mut self, deadline: Instant) -> std::process::ExitStatus {
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for QEMU") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: QEMU did not exit before the deadline",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            let lines = self.lines();
            let tail = lines.len().saturating_sub(80);
            eprintln!(
                "---- {} console (last {} lines; whole log {}) ----",
                self.name,
                lines.len() - tail,
                self.log.display()
            );
            for l in &lines[tail..] {
                eprintln!("{l}");
            }
            eprintln!("---- end of {} console ----", self.name);
        }
    }
}

/// The host's TSC frequency, measured against the monotonic clock once.
#[cfg(target_arch = "x86_64")]
pub fn host_tsc_khz() -> u64 {
    static KHZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        // SAFETY: rdtsc has no preconditions on x86_64.
        let tsc = || unsafe { std::arch::x86_64::_rdtsc() };
        let (t0, c0) = (Instant::now(), tsc());
        std::thread::sleep(Duration::from_millis(200));
        let (c1, t1) = (tsc(), Instant::now());
        let khz = (c1 - c0) as f64 / t1.duration_since(t0).as_secs_f64() / 1000.0;
        super::report(format_args!("vm: host TSC {:.3} MHz", khz / 1000.0));
        khz.round() as u64
    })
}

/// Other hosts have no TSC; the guest (always x86_64 here, under TCG)
/// calibrates as it can, which is slower but works.
#[cfg(not(target_arch = "x86_64"))]
pub fn host_tsc_khz() -> u64 {
    0
}

/// The text after the marker prefix, which may follow stray output on the
/// same line (an echoed command, a kernel message).
pub fn marker(line: &str) -> Option<&str> {
    line.find(MARK).map(|at| &line[at + MARK.len()..])
}

/// Copies `stream` line by line into `console` (and `file`), prefixed;
/// with `closes`, its end marks the console closed.
pub fn spawn_reader(
    stream: impl Read + Send + 'static,
    prefix: &'static str,
    console: Console,
    file: Arc<Mutex<File>>,
    closes: bool,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&buf);
            let line = format!("{prefix}{}", text.trim_end_matches(['\r', '\n']));
            let _ = writeln!(file.lock().unwrap(), "{line}");
            let (lock, cond) = &*console;
            lock.lock().unwrap().lines.push((Instant::now(), line));
            cond.notify_all();
        }
        if closes {
            let (lock, cond) = &*console;
            lock.lock().unwrap().closed = true;
            cond.notify_all();
        }
    });
}
