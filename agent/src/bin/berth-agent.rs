//! berth-agent: the per-host daemon. Not built yet: it arrives with the
//! ttrpc contract (the agent issue). Until then this binary says so plainly
//! instead of pretending to serve.

fn main() -> std::process::ExitCode {
    eprintln!(
        "berth-agent {}: the daemon is not implemented yet (API {}); boot guests with berth-vmm directly",
        env!("CARGO_PKG_VERSION"),
        berth_proto::API_VERSION
    );
    std::process::ExitCode::from(2)
}
