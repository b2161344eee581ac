//! `guest-agent`: see the library crate for everything; this only hands it
//! the process's arguments and environment.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("GUEST_AGENT_"))
        .collect();
    std::process::exit(guest_agent::cli::main_with(&args, &env));
}
