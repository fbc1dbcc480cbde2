//! The VM document's cloud-init part, and its checks: what a cloud user
//! expects of a first boot (a hostname, SSH keys, user data, a network
//! configuration), which the agent hands the guest as a NoCloud seed
//! (`seed`). Every check names the field it refuses.

pub mod seed;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// EC2's limit on user data, which cloud users already live with.
pub const MAX_USER_DATA: usize = 16 * 1024;
/// Keys per VM, and the length of one (an RSA-16384 key is about 2.8 KiB).
pub const MAX_KEYS: usize = 32;
pub const MAX_KEY_LEN: usize = 8 * 1024;
/// network-config as given, and static DNS servers per NIC.
pub const MAX_NETWORK_CONFIG: usize = 16 * 1024;
pub const MAX_DNS: usize = 4;

/// The key types OpenSSH accepts in authorized_keys.
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInit {
    /// The guest's hostname (RFC 1123); empty: the VM's name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    /// OpenSSH public keys for the image's default user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// Anything cloud-init takes as user data: a `#cloud-config` document,
    /// a script, a MIME multipart. Passed on as is.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user_data: String,
    /// A network-config version 2 document, passed on as is. At most one
    /// of this and `nics`; neither: cloud-init's default (DHCP on the
    /// first NIC).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network_config: String,
    /// A static configuration per NIC, in the order of the spec's NICs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<StaticNic>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticNic {
    /// "10.0.0.5/24" or "2001:db8::5/64".
    pub address: String,
    /// The default route's next hop; empty: none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
}

/// A field of the cloud-init part and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The field's full name, from `cloud_init.` on.
    pub field: String,
    pub message: String,
}

fn field_err(field: impl Into<String>) -> impl FnOnce(String) -> FieldError {
    let field = field.into();
    move |message| FieldError { field, message }
}

/// Checks the whole part for a VM with `nics` NICs.
pub fn validate(c: &CloudInit, nics: usize) -> Result<(), FieldError> {
    if !c.hostname.is_empty() {
        check_hostname(&c.hostname).map_err(field_err("cloud_init.hostname"))?;
    }
    let keys = c.ssh_authorized_keys.len();
    if keys > MAX_KEYS {
        return Err(field_err("cloud_init.ssh_authorized_keys")(format!(
            "{keys} keys; at most {MAX_KEYS}"
        )));
    }
    for (i, key) in c.ssh_authorized_keys.iter().enumerate() {
        check_ssh_key(key).map_err(field_err(format!("cloud_init.ssh_authorized_keys[{i}]")))?;
    }
    if c.user_data.len() > MAX_USER_DATA {
        return Err(field_err("cloud_init.user_data")(format!(
            "{} bytes; at most {MAX_USER_DATA} (EC2's limit)",
            c.user_data.len()
        )));
    }
    if !c.network_config.is_empty() && !c.nics.is_empty() {
        return Err(field_err("cloud_init.nics")(
            "give network_config or a static configuration per NIC, not both".into(),
        ));
    }
    if !c.network_config.is_empty() {
        check_network_config(&c.network_config).map_err(field_err("cloud_init.network_config"))?;
    }
    if c.nics.len() > nics {
        return Err(field_err("cloud_init.nics")(format!(
            "{} entries, but the VM has {nics} NIC(s)",
            c.nics.len()
        )));
    }
    for (i, nic) in c.nics.iter().enumerate() {
        check_static_nic(nic).map_err(|(part, message)| FieldError {
            field: format!("cloud_init.nics[{i}].{part}"),
            message,
        })?;
    }
    Ok(())
}

/// RFC 1123: labels of letters, digits and inner hyphens, 1-63 each, 253
/// in all.
pub fn check_hostname(name: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "{:?} is not a hostname (labels of letters, digits and inner hyphens, 1-63 characters each, 253 in all)",
            name.chars().take(80).collect::<String>()
        ));
    }
    Ok(())
}

/// One authorized_keys line: a known type, a base64 blob whose own type
/// field matches it, and an optional comment on the same line.
pub fn check_ssh_key(line: &str) -> Result<(), String> {
    if line.len() > MAX_KEY_LEN {
        return Err(format!("{} bytes; at most {MAX_KEY_LEN}", line.len()));
    }
    if line.chars().any(char::is_control) {
        return Err("not an SSH public key: it holds a control character or a line break".into());
    }
    let mut words = line.split_whitespace();
    let (Some(kind), Some(blob)) = (words.next(), words.next()) else {
        return Err("not an SSH public key: expected \"<type> <base64> [comment]\"".into());
    };
    if !KEY_TYPES.contains(&kind) {
        return Err(format!(
            "not an SSH public key: unknown type {:?} (one of {})",
            kind.chars().take(40).collect::<String>(),
            KEY_TYPES.join(", ")
        ));
    }
    let bytes = base64_decode(blob).ok_or("not an SSH public key: the key is not base64")?;
    // The blob starts with its type as an SSH string: u32 length, bytes.
    let inner = bytes
        .get(..4)
        .map(|l| u32::from_be_bytes(l.try_into().unwrap()) as usize)
        .and_then(|n| bytes.get(4..4 + n));
    if inner != Some(kind.as_bytes()) || bytes.len() < 4 + kind.len() + 8 {
        return Err(format!(
            "not an SSH public key: the base64 part is not a {kind} key"
        ));
    }
    Ok(())
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let body = text.trim_end_matches('=');
    if !text.len().is_multiple_of(4) || text.len() - body.len() > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    for chunk in body.as_bytes().chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// A network-config document cloud-init can take: YAML, version 2 (at the
/// top or under `network:`).
pub fn check_network_config(text: &str) -> Result<(), String> {
    use yaml_rust2::{Yaml, YamlLoader};
    if text.len() > MAX_NETWORK_CONFIG {
        return Err(format!(
            "{} bytes; at most {MAX_NETWORK_CONFIG}",
            text.len()
        ));
    }
    let docs =
        YamlLoader::load_from_str(text).map_err(|e| format!("does not parse as YAML: {e}"))?;
    let [doc] = docs.as_slice() else {
        return Err(format!("one YAML document expected, found {}", docs.len()));
    };
    let top = match &doc["network"] {
        Yaml::BadValue => doc,
        inner => inner,
    };
    match &top["version"] {
        Yaml::Integer(2) => Ok(()),
        Yaml::BadValue => {
            Err("no `version: 2` (network-config version 2 is what Berth passes on)".into())
        }
        other => Err(format!(
            "version {other:?}: only network-config version 2 is passed on"
        )),
    }
}

/// Splits "addr/prefix" and checks both.
pub fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    let (addr, prefix) = text.split_once('/').ok_or_else(|| {
        format!("{text:?} is not an address with a prefix length like 10.0.0.5/24")
    })?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    match prefix.parse::<u8>() {
        Ok(p) if p <= max => Ok((addr, p)),
        _ => Err(format!("{prefix:?} is not a prefix length (0-{max})")),
    }
}

fn check_static_nic(nic: &StaticNic) -> Result<(), (&'static str, String)> {
    let (addr, _) = parse_cidr(&nic.address).map_err(|e| ("address", e))?;
    if !nic.gateway.is_empty() {
        let gw: IpAddr = (nic.gateway.parse())
            .map_err(|_| ("gateway", format!("{:?} is not an IP address", nic.gateway)))?;
        if gw.is_ipv4() != addr.is_ipv4() {
            return Err(("gateway", "not of the address's family".into()));
        }
    }
    if nic.dns.len() > MAX_DNS {
        return Err((
            "dns",
            format!("{} servers; at most {MAX_DNS}", nic.dns.len()),
        ));
    }
    for server in &nic.dns {
        server
            .parse::<IpAddr>()
            .map_err(|_| ("dns", format!("{server:?} is not an IP address")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
