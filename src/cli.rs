//! The binary's entry point as a library function, so tests and examples can
//! run the whole agent in-process: parse, resolve, act, map to an exit code.

use std::time::Duration;

use crate::collect::Collector;
use crate::config::{self, Config, cli::Action};
use crate::error::{Error, Result};
use crate::net::address::source_address;
use crate::sample::{AGENT_VERSION, Sample};
use crate::serve::healthcheck;

/// How long `--once` measures the CPU window: long enough for tens of ticks
/// per CPU at 100 Hz, short enough for an interactive command.
pub const ONCE_WINDOW: Duration = Duration::from_millis(500);

/// Runs the agent with `args` (without the program name) and `env`; returns
/// the process exit code. Usage errors are printed here and give 2.
pub fn main_with(args: &[std::ffi::OsString], env: &[(String, String)]) -> i32 {
    match utf8_args(args).and_then(|args| run(&args, env)) {
        Ok(code) => code,
        Err(e @ Error::Usage(_)) => {
            eprintln!("guest-agent: {e}");
            2
        }
        Err(e) => {
            eprintln!("guest-agent: {e}");
            1
        }
    }
}

/// The arguments as text. One that is not UTF-8 is a usage error naming
/// it and the flag it belongs to, never a panic.
fn utf8_args(args: &[std::ffi::OsString]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::with_capacity(args.len());
    for a in args {
        match a.to_str() {
            Some(s) => out.push(s.to_string()),
            None => {
                let shown = a.to_string_lossy();
                let flag = match shown.split_once('=') {
                    Some((f, _)) if f.starts_with("--") => Some(f.to_string()),
                    _ => out.last().filter(|p| p.starts_with("--")).cloned(),
                };
                return Err(Error::Usage(match flag {
                    Some(f) => format!("invalid {f} value {shown:?}: not valid UTF-8"),
                    None => format!("argument {shown:?} is not valid UTF-8"),
                }));
            }
        }
    }
    Ok(out)
}

fn run(args: &[String], env: &[(String, String)]) -> Result<i32> {
    let args = config::cli::parse(args)?;
    match args.action {
        Action::Help => return Ok(print_out(&config::cli::help())),
        Action::Version => {
            return Ok(print_out(&format!("guest-agent {AGENT_VERSION}\n")));
        }
        _ => {}
    }
    let config = config::resolve(&args.values, env, args.config.as_deref())?;
    crate::logging::init(config.log);
    for w in &config.warnings {
        log::warn!("{w}");
    }
    for e in &config.errors {
        log::error!("{e}; using the next source's value");
    }
    match args.action {
        Action::PrintConfig => {
            let text = serde_json::to_string_pretty(&config.to_json())
                .map_err(|e| Error::Usage(e.to_string()))?;
            Ok(print_out(&format!("{text}\n")))
        }
        Action::Health => Ok(healthcheck::run(&config)),
        Action::Once => {
            let sample = once(&config)?;
            let text =
                serde_json::to_string_pretty(&sample).map_err(|e| Error::Usage(e.to_string()))?;
            Ok(print_out(&format!("{text}\n")))
        }
        _ => crate::agent::run(config).map(|()| 0),
    }
}

/// Writes `text` to stdout; returns the exit code. A reader that went away
/// (`guest-agent --print-config | head -1`) is not an error worth a panic.
fn print_out(text: &str) -> i32 {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => 0,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("guest-agent: writing to stdout: {e}");
            1
        }
    }
}

/// One sample over a [`ONCE_WINDOW`] window, with no network traffic: the
/// guest address is asked of the routing table only for an address-literal
/// URL (a connected UDP socket sends nothing; a name would need DNS).
pub fn once(config: &Config) -> Result<Sample> {
    let mut collector =
        Collector::new(&config.proc_root, config.vm_id.clone())?.with_sys_root(&config.sys_root);
    collector.collect();
    std::thread::sleep(ONCE_WINDOW);
    let mut sample = collector.collect();
    sample.seq = 1;
    sample.guest_ip = config
        .resolved_target()
        .and_then(|t| t.literal())
        .and_then(|a| source_address(a).ok())
        .map(|ip| ip.to_string());
    Ok(sample)
}
