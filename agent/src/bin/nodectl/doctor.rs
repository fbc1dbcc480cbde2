//! `nodectl doctor`: checks this host (berth_agent::doctor) and says how to
//! fix what is wrong; it needs no running agent.

use std::io::IsTerminal;
use std::path::Path;

use berth_agent::config::AgentConfig;
use berth_agent::doctor::{self, Verdict};
use serde_json::Value;

use crate::failure::{fail, Failure};
use crate::render::json::finding_json;

pub fn run(config: Option<&Path>, json: bool) -> Result<(), Failure> {
    let default = Path::new("/etc/berth/agent.toml");
    let config = match config {
        Some(path) => AgentConfig::load(path).map_err(|e| fail(2, e.to_string()))?,
        None if default.exists() => {
            AgentConfig::load(default).map_err(|e| fail(2, e.to_string()))?
        }
        None => AgentConfig::default(),
    };
    let findings = doctor::run(&config, &doctor::Host::default());
    if json {
        println!(
            "{}",
            Value::Array(findings.iter().map(finding_json).collect())
        );
    } else {
        let colour = std::io::stdout().is_terminal();
        for f in &findings {
            let (start, end) = match (colour, f.verdict) {
                (false, _) => ("", ""),
                (true, Verdict::Ok) => ("\x1b[32m", "\x1b[0m"),
                (true, Verdict::Warn) => ("\x1b[33m", "\x1b[0m"),
                (true, Verdict::Fail) => ("\x1b[1;31m", "\x1b[0m"),
            };
            println!(
                "{start}{:<4}{end} {:<9} {}",
                f.verdict.name(),
                f.check,
                f.detail
            );
            if !f.fix.is_empty() {
                println!("{:<14} fix: {}", "", f.fix);
            }
        }
    }
    let failed = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Fail)
        .count();
    if failed > 0 {
        return Err(fail(
            1,
            format!("doctor: {failed} check(s) failed; see the fixes above"),
        ));
    }
    Ok(())
}
