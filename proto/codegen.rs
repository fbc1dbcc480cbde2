// The build script body shared by proto/ and tests/: generates Rust code
// for berth.v1 from the .proto files under PROTO_ROOT (no protoc:
// ttrpc-codegen parses them itself). The generated files start with inner
// attributes and inner doc comments, which `include!` rejects, so they are
// copied without those and wrapped in one module each.

use std::fs;
use std::path::{Path, PathBuf};

const PROTOS: [&str; 5] = ["common", "vm", "node", "vmm", "image"];

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let raw = out.join("raw");
    fs::create_dir_all(&raw).unwrap();
    let root = Path::new(PROTO_ROOT);
    let inputs: Vec<PathBuf> = PROTOS
        .iter()
        .map(|p| root.join(format!("berth/v1/{p}.proto")))
        .collect();
    for input in &inputs {
        println!("cargo:rerun-if-changed={}", input.display());
    }
    ttrpc_codegen::Codegen::new()
        .out_dir(&raw)
        .inputs(&inputs)
        .include(root)
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .run()
        .expect("ttrpc codegen");

    let mut wrapper = String::new();
    let mut names: Vec<String> = fs::read_dir(&raw)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().ok()?;
            let stem = name.strip_suffix(".rs")?.to_string();
            (stem != "mod").then_some(stem)
        })
        .collect();
    names.sort();
    for name in names {
        let text = fs::read_to_string(raw.join(format!("{name}.rs"))).unwrap();
        let cleaned: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("#!["))
            .map(|l| match l.strip_prefix("//!") {
                Some(rest) => format!("//{rest}"),
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        fs::write(out.join(format!("{name}.rs")), cleaned).unwrap();
        wrapper.push_str(&format!(
            "pub mod {name} {{ include!(concat!(env!(\"OUT_DIR\"), \"/{name}.rs\")); }}\n"
        ));
    }
    fs::write(out.join("generated.rs"), wrapper).unwrap();
}
