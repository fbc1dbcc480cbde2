//! Arguments clap leaves as text: KEY=VALUE labels, OLD=NEW taps, spec files.

use std::collections::HashMap;
use std::path::Path;

use berth_agent::spec::VmSpec;

use crate::failure::{fail, Failure};

pub fn parse_labels(labels: &[String]) -> Result<HashMap<String, String>, Failure> {
    labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| fail(2, format!("label {l:?} is not KEY=VALUE")))
        })
        .collect()
}

pub fn parse_taps(taps: &[String]) -> Result<HashMap<String, String>, Failure> {
    let mut out = HashMap::new();
    for t in taps {
        let (old, new) = t
            .split_once('=')
            .ok_or_else(|| fail(2, format!("--tap {t:?} is not OLD=NEW")))?;
        out.insert(old.to_string(), new.to_string());
    }
    Ok(out)
}

/// A VM spec file (TOML; see docs/agent.md), for create, update and migrate-in.
pub fn read_spec(file: &Path) -> Result<VmSpec, Failure> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| fail(2, format!("cannot read {}: {e}", file.display())))?;
    let spec: VmSpec =
        toml::from_str(&text).map_err(|e| fail(2, format!("{}: {e}", file.display())))?;
    // One the agent would refuse for its size may not even fit in a
    // request: say why here, not "lost the agent".
    spec.check_size()
        .map_err(|e| fail(2, format!("{}: {e}", file.display())))?;
    Ok(spec)
}
