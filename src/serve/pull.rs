//! What a pull-model manager needs of the listener (docs/manager.md): the
//! manager that runs today pulls `/metrics` into a struct whose
//! [`PULL_REQUIRED`] figures may not be null, so a sample missing one of them
//! is answered 503 (as before the first sample) rather than with a body that
//! manager would fail to parse; and the old agent's `/configure-interface`
//! (root network changes for any unauthenticated caller) is answered 501
//! with the reason.

use crate::sample::{Sample, Value};

/// The figures a pull-model manager requires in `/metrics`: its struct has
/// them as plain `f64`/`u64`, so null fails its parse.
pub const PULL_REQUIRED: &[&str] = &[
    "cpu_usage_percent",
    "memory_usage_percent",
    "memory_used_kb",
    "memory_total_kb",
    "memory_available_kb",
    "uptime_seconds",
];

/// The old agent's interface-setup route.
pub const CONFIGURE_INTERFACE: &str = "/configure-interface";

/// Why [`CONFIGURE_INTERFACE`] is not served.
pub const CONFIGURE_INTERFACE_REFUSED: &str = "not implemented: /configure-interface would run ip and udhcpc as root for any unauthenticated caller on the VM's network; bring extra interfaces up from the guest's own network configuration instead";

/// The [`PULL_REQUIRED`] figures that are null in `sample`.
pub fn missing_figures(sample: &Sample) -> Vec<&'static str> {
    let mut missing = Vec::new();
    sample.visit(|name, value| {
        if value == Value::Null && PULL_REQUIRED.contains(&name) {
            missing.push(name);
        }
    });
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_figures_are_named_in_the_sample() {
        for f in PULL_REQUIRED {
            assert!(crate::sample::FIELDS.contains(f), "{f}");
        }
        let mut missing = missing_figures(&crate::sample::fixture::sample(1));
        let mut required = PULL_REQUIRED.to_vec();
        missing.sort_unstable();
        required.sort_unstable();
        assert_eq!(missing, required);
    }
}
