//! Compiles the seccomp filters of `src/seccomp/inventory.toml` to BPF
//! when berth-vmm is built, with the same code the tests check
//! (`src/seccomp/{filters,inventory}.rs`): a starting VMM only loads them.

#[allow(dead_code)]
#[path = "src/seccomp/filters.rs"]
mod filters;
#[allow(dead_code)]
#[path = "src/seccomp/inventory.rs"]
mod inventory;

fn main() {
    for file in ["inventory.toml", "inventory.rs", "filters.rs"] {
        println!("cargo:rerun-if-changed=src/seccomp/{file}");
    }
    let compiled = inventory::Inventory::built_in()
        .and_then(|inventory| filters::Filters::compile(&inventory))
        .unwrap_or_else(|e| panic!("src/seccomp/inventory.toml: {e}"));
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("seccomp-filters.bin"), compiled.to_bytes())
        .unwrap_or_else(|e| panic!("cannot write the compiled filters: {e}"));
}
