//! The NoCloud seed cloud-init reads on first boot: a small vfat image
//! labelled `CIDATA` with `meta-data`, `user-data` and, when the spec has
//! one, `network-config`, attached to the guest as a read-only disk after
//! the spec's own disks. The instance id is the VM's id, so a restart is
//! not a first boot while a new VM (or a clone restored into one) is.
//! Written atomically at every Start, so it always says what the spec says.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use super::{parse_cidr, CloudInit};

/// Room for the largest user data and network config, with FAT12 overhead.
const SEED_BYTES: u64 = 1 << 20;
pub const LABEL: &str = "CIDATA";

/// What goes into one VM's seed.
pub struct Seed<'a> {
    pub instance_id: &'a str,
    pub hostname: &'a str,
    pub cloud_init: &'a CloudInit,
    /// The MAC of each of the VM's NICs, in order.
    pub nic_macs: &'a [String],
}

/// A YAML double-quoted scalar. The checks keep control characters out of
/// everything written here.
fn quoted(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

impl Seed<'_> {
    pub fn meta_data(&self) -> String {
        let mut out = format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            quoted(self.instance_id),
            quoted(self.hostname)
        );
        if !self.cloud_init.ssh_authorized_keys.is_empty() {
            out.push_str("public-keys:\n");
            for key in &self.cloud_init.ssh_authorized_keys {
                out.push_str(&format!("  - {}\n", quoted(key.trim())));
            }
        }
        out
    }

    /// The network-config file: the spec's own document, or one made from
    /// its static NIC settings (matched by MAC), or none.
    pub fn network_config(&self) -> Option<String> {
        let c = self.cloud_init;
        if !c.network_config.is_empty() {
            return Some(c.network_config.clone());
        }
        if c.nics.is_empty() {
            return None;
        }
        let mut out = String::from("version: 2\nethernets:\n");
        for (i, nic) in c.nics.iter().enumerate() {
            let mac = self.nic_macs.get(i).map(String::as_str).unwrap_or_default();
            out.push_str(&format!(
                "  nic{i}:\n    match:\n      macaddress: {}\n    addresses:\n      - {}\n",
                quoted(mac),
                quoted(&nic.address)
            ));
            if !nic.gateway.is_empty() {
                let v4 = parse_cidr(&nic.address).is_ok_and(|(a, _)| a.is_ipv4());
                let default = if v4 { "0.0.0.0/0" } else { "::/0" };
                out.push_str(&format!(
                    "    routes:\n      - to: {}\n        via: {}\n",
                    quoted(default),
                    quoted(&nic.gateway)
                ));
            }
            if !nic.dns.is_empty() {
                let servers: Vec<String> = nic.dns.iter().map(|s| quoted(s)).collect();
                out.push_str(&format!(
                    "    nameservers:\n      addresses: [{}]\n",
                    servers.join(", ")
                ));
            }
        }
        Some(out)
    }

    /// The files of the seed, by name.
    pub fn files(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut files = vec![
            ("meta-data", self.meta_data().into_bytes()),
            ("user-data", self.cloud_init.user_data.clone().into_bytes()),
        ];
        if let Some(net) = self.network_config() {
            files.push(("network-config", net.into_bytes()));
        }
        files
    }

    /// Writes the seed image at `path` (through a temporary file beside
    /// it, renamed into place).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("img.tmp");
        let result = write_vfat(&tmp, &self.files()).and_then(|()| std::fs::rename(&tmp, path));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

fn write_vfat(path: &Path, files: &[(&str, Vec<u8>)]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.set_len(SEED_BYTES)?;
    let mut label = [b' '; 11];
    label[..LABEL.len()].copy_from_slice(LABEL.as_bytes());
    fatfs::format_volume(
        &mut file,
        fatfs::FormatVolumeOptions::new()
            .volume_label(label)
            .fat_type(fatfs::FatType::Fat12),
    )?;
    file.seek(SeekFrom::Start(0))?;
    {
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new())?;
        for (name, bytes) in files {
            fs.root_dir().create_file(name)?.write_all(bytes)?;
        }
        fs.unmount()?;
    }
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud_init::StaticNic;

    fn seed_of(c: &CloudInit) -> String {
        let s = Seed {
            instance_id: "web-1",
            hostname: "web",
            cloud_init: c,
            nic_macs: &["52:54:00:00:00:01".into(), "52:54:00:00:00:02".into()],
        };
        s.network_config().unwrap_or_default()
    }

    #[test]
    fn static_nics_become_network_config_v2_matched_by_mac() {
        let c = CloudInit {
            nics: vec![
                StaticNic {
                    address: "10.0.0.5/24".into(),
                    gateway: "10.0.0.1".into(),
                    dns: vec!["10.0.0.1".into(), "9.9.9.9".into()],
                },
                StaticNic {
                    address: "2001:db8::5/64".into(),
                    gateway: "2001:db8::1".into(),
                    dns: Vec::new(),
                },
            ],
            ..Default::default()
        };
        let net = seed_of(&c);
        crate::cloud_init::check_network_config(&net).unwrap();
        assert!(net.contains("macaddress: \"52:54:00:00:00:01\""), "{net}");
        assert!(net.contains("- \"10.0.0.5/24\""), "{net}");
        assert!(
            net.contains("to: \"0.0.0.0/0\"\n        via: \"10.0.0.1\""),
            "{net}"
        );
        assert!(
            net.contains("to: \"::/0\"\n        via: \"2001:db8::1\""),
            "{net}"
        );
        assert!(
            net.contains("addresses: [\"10.0.0.1\", \"9.9.9.9\"]"),
            "{net}"
        );
    }

    #[test]
    fn meta_data_quotes_what_it_writes() {
        let c = CloudInit {
            ssh_authorized_keys: vec!["ssh-ed25519 AAAA a \"quoted\" comment".into()],
            ..Default::default()
        };
        let s = Seed {
            instance_id: "web-1",
            hostname: "web",
            cloud_init: &c,
            nic_macs: &[],
        };
        assert_eq!(
            s.meta_data(),
            "instance-id: \"web-1\"\nlocal-hostname: \"web\"\npublic-keys:\n  - \"ssh-ed25519 AAAA a \\\"quoted\\\" comment\"\n"
        );
        assert!(s.network_config().is_none(), "no network config: DHCP");
    }
}
