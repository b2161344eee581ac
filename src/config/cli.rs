//! The command line: flags generated from the settings table, plus the
//! actions (`--once`, `--print-config`, `--help`, `--version`).

use std::path::PathBuf;

use super::settings::{SETTINGS, setting};
use crate::error::{Error, Result};

/// What the user asked the binary to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Collect and push until SIGTERM/SIGINT.
    Run,
    /// Print one sample and exit, without any network.
    Once,
    /// Print the resolved configuration and exit.
    PrintConfig,
    /// Ask the running agent's listener for `/health`; exit 0 when healthy.
    Health,
    /// Print the help text and exit.
    Help,
    /// Print the version and exit.
    Version,
}

/// The command line as the user wrote it, before any validation.
#[derive(Debug, Clone)]
pub struct Args {
    /// The action.
    pub action: Action,
    /// `(setting name, value)` pairs, in order.
    pub values: Vec<(&'static str, String)>,
    /// `--config PATH`.
    pub config: Option<PathBuf>,
}

/// Splits the arguments (without the program name) into an [`Args`]. Accepts
/// `--flag value` and `--flag=value`; an unknown flag, a missing value or a
/// stray argument is a usage error.
pub fn parse(args: &[String]) -> Result<Args> {
    let mut out = Args {
        action: Action::Run,
        values: Vec::new(),
        config: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let action = match flag {
            "--once" => Some(Action::Once),
            "--print-config" => Some(Action::PrintConfig),
            "--health" => Some(Action::Health),
            "-h" | "--help" => Some(Action::Help),
            "-V" | "--version" => Some(Action::Version),
            _ => None,
        };
        if let Some(a) = action {
            if inline.is_some() {
                return Err(Error::Usage(format!("{flag} takes no value")));
            }
            // Help and version win over everything else on the line.
            if !matches!(out.action, Action::Help | Action::Version) {
                out.action = a;
            }
            continue;
        }
        let name = flag.strip_prefix("--").map(|f| f.replace('-', "_"));
        let is_config = flag == "--config";
        let known = name.as_deref().and_then(setting);
        if known.is_none() && !is_config {
            return Err(Error::Usage(format!(
                "unknown argument {arg:?}; see guest-agent --help"
            )));
        }
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .cloned()
                .ok_or_else(|| Error::Usage(format!("{flag} needs a value")))?,
        };
        match known {
            Some(s) => out.values.push((s.name, value)),
            None => out.config = Some(PathBuf::from(value)),
        }
    }
    Ok(out)
}

/// The `--help` text, generated from the settings table.
pub fn help() -> String {
    let mut h = format!(
        "guest-agent {}\nReports this VM's CPU, memory, load, network, disk and pressure to its manager.\n\n\
         Usage: guest-agent [OPTIONS]\n\nActions:\n\
         \x20     --once               print one sample as JSON and exit (no network)\n\
         \x20     --print-config       print every setting with its value and source, and exit\n\
         \x20     --health             ask the running agent's /health; exit 0 when healthy, 1 if not\n\
         \x20 -h, --help               print this help\n\
         \x20 -V, --version            print the version\n\nSettings (CLI > environment > kernel cmdline guest_agent.* > config file > default):\n",
        crate::sample::AGENT_VERSION
    );
    for s in SETTINGS {
        let left = format!("{} {}", s.flag(), s.value_name);
        h.push_str(&format!("      {left:<32} {}\n", s.help));
        let default = s.default.map_or(String::from("none"), |d| d.to_string());
        h.push_str(&format!(
            "      {:<32} env {}, default {default}\n",
            "",
            s.env()
        ));
    }
    h.push_str(&format!(
        "      {:<32} the settings file (default {})\n",
        "--config PATH",
        super::file::DEFAULT_PATH
    ));
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Result<Args> {
        parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn every_setting_flag_parses_both_ways() {
        for s in SETTINGS {
            let a = args(&[&s.flag(), "v1"]).unwrap();
            assert_eq!(a.values, vec![(s.name, "v1".to_string())]);
            let a = args(&[&format!("{}=v2", s.flag())]).unwrap();
            assert_eq!(a.values, vec![(s.name, "v2".to_string())]);
        }
    }

    #[test]
    fn actions_and_config() {
        assert_eq!(args(&[]).unwrap().action, Action::Run);
        assert_eq!(args(&["--once"]).unwrap().action, Action::Once);
        assert_eq!(
            args(&["--print-config", "--help"]).unwrap().action,
            Action::Help
        );
        assert_eq!(args(&["-V", "--once"]).unwrap().action, Action::Version);
        let a = args(&["--config", "/tmp/x.conf", "--url=off"]).unwrap();
        assert_eq!(a.config, Some(PathBuf::from("/tmp/x.conf")));
        assert_eq!(a.values, vec![("url", "off".to_string())]);
    }

    #[test]
    fn usage_errors() {
        for bad in [
            &["--colour", "x"][..],
            &["--interval"][..],
            &["stray"][..],
            &["--once=yes"][..],
        ] {
            let e = args(bad).unwrap_err();
            assert!(matches!(e, Error::Usage(_)), "{bad:?}");
        }
    }

    #[test]
    fn help_lists_every_setting() {
        let h = help();
        for s in SETTINGS {
            assert!(h.contains(&s.flag()) && h.contains(&s.env()), "{}", s.name);
        }
    }
}
