//! Reaching berth-agent: connecting to its socket, and the deadline of a call.

use std::path::Path;

use crate::failure::{fail, Failure};

/// The deadline of every call but the event stream's.
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(120_000_000_000)
}

pub async fn connect_agent(socket: &Path) -> Result<ttrpc::r#async::Client, Failure> {
    let address = format!("unix://{}", socket.display());
    ttrpc::r#async::Client::connect(&address)
        .await
        .map_err(|e| {
            let text = e.to_string();
            let message = if text.contains("os error 13") {
                // The agent runs; the socket's mode (0660) keeps us out.
                format!(
                    "permission denied on {}: run as root or as a member of the agent's \
                     socket_group ({text})",
                    socket.display()
                )
            } else {
                format!(
                    "agent not running at {}: start berth-agent.service (or pass --socket) ({text})",
                    socket.display()
                )
            };
            fail(7, message)
        })
}
