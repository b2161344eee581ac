//! Prints the key of one VM, `KID HEX`, derived from a manager's master
//! key file (docs/security.md#key-delivery): what a manager puts into the
//! VM's MMDS (`{"guest_agent": {"key": "KID HEX"}}`) or an image builder
//! writes into the VM's key file (mode 0600).
//!
//! ```text
//! cargo run --example vm_key -- MASTER_KEY_FILE VM_ID
//! ```
//!
//! The first key of the file is used (the one new VMs get during a
//! rotation). The master keys themselves are never printed.

use std::path::Path;

use guest_agent::ingest::Verifier;
use guest_agent::sign::valid_vm_id;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [file, vm_id] = args.as_slice() else {
        eprintln!("usage: vm_key MASTER_KEY_FILE VM_ID");
        std::process::exit(2);
    };
    if !valid_vm_id(vm_id) {
        eprintln!(
            "vm_key: vm_id {vm_id:?}: expected 1 to 256 letters, digits, '-', '.', '_' or '~'"
        );
        std::process::exit(2);
    }
    match Verifier::load(Path::new(file)) {
        Ok(v) => println!("{}", v.vm_key(vm_id).to_line()),
        Err(e) => {
            eprintln!("vm_key: {e}");
            std::process::exit(1);
        }
    }
}
