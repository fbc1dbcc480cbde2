//! nodectl: the operator's CLI for berth-agent. Not built yet: it arrives
//! with the agent (the agent issue).

fn main() -> std::process::ExitCode {
    eprintln!(
        "nodectl {}: not implemented yet (needs berth-agent); boot guests with berth-vmm directly",
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::from(2)
}
