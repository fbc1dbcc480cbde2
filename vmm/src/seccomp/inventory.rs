//! The allow-lists as data: `inventory.toml`, compiled into the binary and
//! turned into system call numbers and ioctl requests here.

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::Deserialize;

use super::filters::{AllowList, SeccompError, ThreadKind};

const BUILT_IN: &str = include_str!("inventory.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// ioctl request numbers by name (from <linux/kvm.h>, <linux/if_tun.h>…).
    ioctls: BTreeMap<String, u64>,
    common: KindList,
    vcpu: KindList,
    device: KindList,
    control: KindList,
    migration: KindList,
    /// Thread creation and set-up, for the launcher only.
    launcher: KindList,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KindList {
    #[serde(default)]
    syscalls: Vec<String>,
    #[serde(default)]
    ioctls: Vec<String>,
}

impl Inventory {
    /// The inventory this binary was built with.
    pub fn built_in() -> Result<Inventory, SeccompError> {
        Inventory::parse(BUILT_IN)
    }

    pub fn parse(text: &str) -> Result<Inventory, SeccompError> {
        toml::from_str(text).map_err(|e| SeccompError::Inventory(e.to_string()))
    }

    fn list(&self, kind: ThreadKind) -> &KindList {
        match kind {
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::Device => &self.device,
            ThreadKind::Control => &self.control,
            ThreadKind::Migration => &self.migration,
        }
    }

    /// Everything `kind` may call: the common list and its own.
    pub fn allowed(&self, kind: ThreadKind) -> Result<AllowList, SeccompError> {
        let mut allowed = AllowList::new();
        self.add(&self.common, &mut allowed)?;
        self.add(self.list(kind), &mut allowed)?;
        Ok(allowed)
    }

    /// What any kind may call: the launcher's filter, so that the threads it
    /// creates are bounded by their own filter alone.
    pub fn union(&self) -> Result<AllowList, SeccompError> {
        let mut allowed = AllowList::new();
        self.add(&self.common, &mut allowed)?;
        for kind in ThreadKind::ALL {
            self.add(self.list(kind), &mut allowed)?;
        }
        self.add(&self.launcher, &mut allowed)?;
        Ok(allowed)
    }

    /// The names of the system calls `kind` may make (for docs and tests).
    pub fn syscall_names(&self, kind: ThreadKind) -> Vec<&str> {
        let mut names: Vec<&str> = (self.common.syscalls.iter())
            .chain(&self.list(kind).syscalls)
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    fn add(&self, list: &KindList, allowed: &mut AllowList) -> Result<(), SeccompError> {
        for name in &list.syscalls {
            if name == "ioctl" {
                return Err(SeccompError::Inventory(
                    "list ioctl requests under `ioctls`, not `ioctl` under `syscalls`".into(),
                ));
            }
            let nr = syscall_number(name)?;
            allowed.entry(nr).or_default();
        }
        if !list.ioctls.is_empty() {
            let requests = allowed.entry(libc::SYS_ioctl).or_default();
            for name in &list.ioctls {
                let request = self.ioctls.get(name).ok_or_else(|| {
                    SeccompError::Inventory(format!(
                        "unknown ioctl {name}: add its number under [ioctls]"
                    ))
                })?;
                if !requests.contains(request) {
                    requests.push(*request);
                }
            }
        }
        Ok(())
    }
}

fn syscall_number(name: &str) -> Result<i64, SeccompError> {
    syscalls::Sysno::from_str(name)
        .map(|s| i64::from(s.id()))
        .map_err(|_| SeccompError::Inventory(format!("unknown system call {name}")))
}
