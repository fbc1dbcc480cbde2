//! The probe must run on the software KVM of our test hosts, whose CPL0
//! emulator dies on some instructions (shared TESTING.md). This disassembles
//! every executable section of the probe, each in its own CPU mode, and fails
//! on any instruction from that list.

use std::path::Path;
use std::process::Command;

use berth_tests::*;

/// Mnemonics the PVM emulator does not know, or gets silently wrong.
const FORBIDDEN: &[&str] = &[
    "popcnt",
    "lzcnt",
    "tzcnt",
    "movbe",
    "xgetbv",
    "cmpxchg16b",
    "clac",
    "stac",
    "int3",
    "int",
    "rdtscp",
];
/// Vector moves are fine; anything else that touches a vector register is not.
const VECTOR_MOVES: &[&str] = &[
    "movdqu", "movdqa", "movaps", "movups", "movapd", "movupd", "movq", "movd",
];
const PREFIXES: &[&str] = &[
    "lock", "rep", "repz", "repnz", "repe", "repne", "data16", "data32", "addr16", "addr32", "cs",
    "ds", "es", "ss", "fs", "gs", "notrack", "bnd",
];

fn executable_sections(elf: &Path) -> Vec<String> {
    let out = Command::new("readelf")
        .args(["-S", "-W"])
        .arg(elf)
        .output()
        .expect("readelf (binutils) is installed");
    assert!(out.status.success(), "readelf failed on {}", elf.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // "  [ 1] .text  PROGBITS  addr off size es flags ..."
            let rest = line.split_once(']')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let flags = fields.get(6)?;
            (flags.contains('X')).then(|| fields[0].to_string())
        })
        .collect()
}

fn objdump_mode(section: &str) -> &'static [&'static str] {
    match section {
        ".text16" => &["-m", "i8086"],
        ".text32" => &["-m", "i386"],
        _ => &[],
    }
}

/// Every offending instruction as "section: address: instruction".
fn forbidden_instructions(elf: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    let sections = executable_sections(elf);
    assert!(
        !sections.is_empty(),
        "no executable section in {}",
        elf.display()
    );
    for section in sections {
        let out = Command::new("objdump")
            .arg("-d")
            .args(objdump_mode(&section))
            .args(["-j", &section])
            .arg(elf)
            .output()
            .expect("objdump (binutils) is installed");
        assert!(out.status.success(), "objdump failed on {section}");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let cols: Vec<&str> = line.split('\t').collect();
            let Some(insn) = cols.get(2) else { continue };
            let mut words = insn.split_whitespace().skip_while(|w| PREFIXES.contains(w));
            let Some(mnemonic) = words.next() else {
                continue;
            };
            let operands: String = words.collect();
            let vector = ["%xmm", "%ymm", "%zmm", "%mm"]
                .iter()
                .any(|r| operands.contains(r));
            let is_bad = FORBIDDEN.contains(&mnemonic)
                || mnemonic.starts_with("xsave")
                || mnemonic.starts_with("xrstor")
                || (mnemonic.starts_with('v') && !matches!(mnemonic, "verr" | "verw"))
                || (vector && !VECTOR_MOVES.contains(&mnemonic));
            if is_bad {
                bad.push(format!("{section}: {}: {}", cols[0].trim(), insn.trim()));
            }
        }
    }
    bad
}

#[test]
fn probe_has_no_instruction_the_pvm_emulator_rejects() {
    let bad = forbidden_instructions(&probe_elf());
    assert!(
        bad.is_empty(),
        "forbidden instructions in the probe:\n{}",
        bad.join("\n")
    );
}

/// The check itself must be able to fail: an object with one of each kind
/// of forbidden instruction is caught, line by line.
#[test]
fn isa_check_catches_forbidden_instructions() {
    let dir = scratch_dir("isa-check");
    let src = dir.join("bad.S");
    std::fs::write(
        &src,
        ".text\npopcnt %rax, %rbx\nvaddps %ymm0, %ymm1, %ymm2\npaddq %xmm0, %xmm1\nint3\nxsave (%rdi)\nmovdqu %xmm0, (%rdi)\nret\n\
         .section .text16,\"ax\"\n.code16\nint $0x10\n",
    )
    .unwrap();
    let obj = dir.join("bad.o");
    let status = Command::new("gcc")
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .status()
        .expect("gcc is installed");
    assert!(status.success());
    let bad = forbidden_instructions(&obj);
    let text = bad.join("\n");
    for needle in [
        "popcnt",
        "vaddps",
        "paddq",
        "int3",
        "xsave",
        ".text16",
        "int    $0x10",
    ] {
        assert!(text.contains(needle), "{needle} not caught:\n{text}");
    }
    assert!(
        !text.contains("movdqu"),
        "vector moves are allowed:\n{text}"
    );
    assert!(!text.contains("ret"), "{text}");
}
