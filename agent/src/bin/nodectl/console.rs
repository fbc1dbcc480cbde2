//! `nodectl console`: attach to a VM's serial console, follow its log, or
//! print the log's tail.

use std::io::{Read, Write};

use berth_proto::vm as pb;
use berth_proto::vm_ttrpc::VmServiceClient;
use ttrpc::r#async::{CSReceiver, CSSender};

use crate::agent::ctx;
use crate::failure::{fail, from_ttrpc, Failure};

const DETACH_KEY: u8 = 0x1d; // Ctrl-]

pub async fn run(
    vms: &VmServiceClient,
    id: &str,
    follow: bool,
    tail: Option<usize>,
) -> Result<(), Failure> {
    let stream = vms.console(ctx()).await.map_err(from_ttrpc)?;
    let (tx, mut rx) = stream.split();
    tx.send(&pb::ConsoleChunk {
        id: id.to_string(),
        ..Default::default()
    })
    .await
    .map_err(from_ttrpc)?;
    if let Some(n) = tail {
        // The first answer carries the replayed log.
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .map_err(|_| fail(1, "no console data"))?
            .map_err(from_ttrpc)?;
        let text = String::from_utf8_lossy(&chunk.data);
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[lines.len().saturating_sub(n)..] {
            println!("{line}");
        }
        return Ok(());
    }
    if follow {
        while let Ok(chunk) = rx.recv().await {
            let mut out = std::io::stdout();
            let _ = out.write_all(&chunk.data);
            let _ = out.flush();
        }
    } else {
        attach(id, &tx, &mut rx).await;
    }
    Ok(())
}

/// Passes the terminal's keys to the console and its output back, in raw
/// mode, until the detach key or the end of either side.
async fn attach(id: &str, tx: &CSSender<pb::ConsoleChunk>, rx: &mut CSReceiver<pb::ConsoleChunk>) {
    let raw = RawTerminal::enter();
    eprintln!("[attached to {id}; detach with Ctrl-]]\r");
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if in_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let id = id.to_string();
    loop {
        tokio::select! {
            input = in_rx.recv() => {
                let Some(data) = input else { break };
                if let Some(pos) = data.iter().position(|&b| b == DETACH_KEY) {
                    if pos > 0 {
                        let _ = tx.send(&pb::ConsoleChunk { id: id.clone(), data: data[..pos].to_vec(), ..Default::default() }).await;
                    }
                    break;
                }
                if tx.send(&pb::ConsoleChunk { id: id.clone(), data, ..Default::default() }).await.is_err() {
                    break;
                }
            }
            output = rx.recv() => {
                match output {
                    Ok(chunk) => { let mut out = std::io::stdout(); let _ = out.write_all(&chunk.data); let _ = out.flush(); }
                    Err(_) => break,
                }
            }
        }
    }
    drop(raw);
    eprintln!("\r\n[detached]");
}

/// The terminal in raw mode for an interactive console; restored on drop.
struct RawTerminal(nix::sys::termios::Termios);

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        let stdin = std::io::stdin();
        let saved = nix::sys::termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.0,
        );
    }
}
