//! `guest-agent`: see the library crate for everything; this only hands it
//! the process's arguments and environment.

// musl's allocator hands small groups back to the kernel as soon as they
// empty, so every sample mapped and unmapped pages (about five pairs, each a
// page fault and a TLB flush); dlmalloc keeps freed memory for the next
// sample (docs/performance.md#the-allocator).
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("GUEST_AGENT_"))
        .collect();
    std::process::exit(guest_agent::cli::main_with(&args, &env));
}
