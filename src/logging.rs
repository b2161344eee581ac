//! A minimal stderr logger for the `log` facade: one line per event,
//! `2026-11-26T05:26:12Z WARN message`.

use std::io::Write;

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // Only our own crate speaks above debug; dependencies' internals stay
        // quiet.
        if record.level() > log::Level::Info && !record.target().starts_with("guest_agent") {
            return;
        }
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{now} {:<5} {}", record.level(), record.args());
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger at `level`; later calls only change the level.
pub fn init(level: log::LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
