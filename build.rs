//! Build script: one size measure for the static musl binary
//! (docs/performance.md#size).
//!
//! The release binary aborts on panic, so nothing ever unwinds: its unwind
//! tables (`.eh_frame`, about 85 KB) would only serve a panic backtrace,
//! which a stripped binary cannot symbolize anyway. For that build alone the
//! linker is told to drop them, keeping the C runtime's own (its start-up
//! code refers to them). Test builds unwind and keep everything.

use std::env;
use std::path::PathBuf;

const SCRIPT: &str = "\
SECTIONS
{
  /DISCARD/ : { *(EXCLUDE_FILE(*crtbegin.o *crtend.o) .eh_frame) *(.gcc_except_table*) }
}
INSERT AFTER .text;
";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // The release profile (Cargo.toml) sets panic = "abort"; a build
    // script sees the profile, not that setting.
    let musl = env::var("CARGO_CFG_TARGET_ENV").is_ok_and(|v| v == "musl");
    let release = env::var("PROFILE").is_ok_and(|v| v == "release");
    if !(musl && release) {
        return;
    }
    let Some(out) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        return;
    };
    let script = out.join("no-unwind-tables.ld");
    if let Err(e) = std::fs::write(&script, SCRIPT) {
        println!(
            "cargo:warning=cannot write {}: {e}; keeping unwind tables",
            script.display()
        );
        return;
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
}
