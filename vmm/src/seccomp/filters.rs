//! The thread kinds, their allow-lists as system call numbers, and the
//! BPF programs compiled from them. Shared with `build.rs`, which compiles
//! the built-in inventory when the VMM is built; so this file uses nothing
//! of the crate but `super::inventory`.

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// What a thread does, which decides what it may ask of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// Runs KVM_RUN and emulates the port and MMIO accesses it exits with.
    Vcpu,
    /// A virtio device worker: queues, disk files, taps.
    Device,
    /// The main thread, the control API, signals, console input and the
    /// console log's rotation.
    Control,
    /// Live migration: the sender, the receiver and the status responder.
    Migration,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Control,
        ThreadKind::Migration,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Control => "control",
            ThreadKind::Migration => "migration",
        }
    }

    pub fn from_name(name: &str) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("the seccomp inventory is invalid: {0}")]
    Inventory(String),
    #[error("cannot compile the {kind} seccomp filter: {source}")]
    Compile {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the {kind} seccomp filter: {source}")]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
    #[error("cannot start the thread launcher: {0}")]
    Launcher(std::io::Error),
    #[error("seccomp filters are already on")]
    AlreadyOn,
}

/// The compiled filters, one per kind plus their union for the launcher.
#[derive(Debug, PartialEq)]
pub struct Filters {
    pub(super) programs: BTreeMap<ThreadKind, BpfProgram>,
    pub(super) union: BpfProgram,
}

impl Filters {
    pub fn compile(inventory: &super::inventory::Inventory) -> Result<Filters, SeccompError> {
        let mut programs = BTreeMap::new();
        for kind in ThreadKind::ALL {
            programs.insert(kind, compile(kind.name(), inventory.allowed(kind)?)?);
        }
        let union = compile("launcher", inventory.union()?)?;
        Ok(Filters { programs, union })
    }

    /// The programs as bytes: for each kind in `ThreadKind::ALL` order and
    /// then the union, a little-endian u32 instruction count and the
    /// instructions (code u16, jt u8, jf u8, k u32, little-endian).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let programs = ThreadKind::ALL.iter().map(|k| &self.programs[k]);
        for program in programs.chain(std::iter::once(&self.union)) {
            out.extend_from_slice(&(program.len() as u32).to_le_bytes());
            for insn in program {
                out.extend_from_slice(&insn.code.to_le_bytes());
                out.extend_from_slice(&[insn.jt, insn.jf]);
                out.extend_from_slice(&insn.k.to_le_bytes());
            }
        }
        out
    }

    /// Reads what [`Filters::to_bytes`] wrote.
    pub fn from_bytes(mut bytes: &[u8]) -> Result<Filters, SeccompError> {
        let corrupt = || SeccompError::Inventory("the compiled filters are truncated".into());
        let mut take = |n: usize| -> Result<&[u8], SeccompError> {
            let (head, rest) = bytes.split_at_checked(n).ok_or_else(corrupt)?;
            bytes = rest;
            Ok(head)
        };
        let mut read_program = || -> Result<BpfProgram, SeccompError> {
            let len = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
            (0..len)
                .map(|_| {
                    let i = take(8)?;
                    Ok(sock_filter {
                        code: u16::from_le_bytes([i[0], i[1]]),
                        jt: i[2],
                        jf: i[3],
                        k: u32::from_le_bytes([i[4], i[5], i[6], i[7]]),
                    })
                })
                .collect()
        };
        let mut programs = BTreeMap::new();
        for kind in ThreadKind::ALL {
            programs.insert(kind, read_program()?);
        }
        let union = read_program()?;
        Ok(Filters { programs, union })
    }
}

/// System call numbers, each with the ioctl requests it is limited to
/// (empty: any arguments).
pub type AllowList = BTreeMap<i64, Vec<u64>>;

fn compile(kind: &'static str, allowed: AllowList) -> Result<BpfProgram, SeccompError> {
    let compile_err = |source| SeccompError::Compile { kind, source };
    let mut rules = BTreeMap::new();
    for (nr, requests) in allowed {
        let mut syscall_rules = Vec::new();
        for request in requests {
            // ioctl's request is an unsigned int in the kernel: the low
            // 32 bits are all that count.
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                .map_err(compile_err)?;
            syscall_rules.push(SeccompRule::new(vec![cond]).map_err(compile_err)?);
        }
        rules.insert(nr, syscall_rules);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(compile_err)?;
    BpfProgram::try_from(filter).map_err(compile_err)
}
