//! The Console stream: input forwarded to the VMM, output tailed from the
//! console log the VMM writes.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use std::time::Duration;

use berth_proto::vm as pb;
use ttrpc::r#async::ServerStream;

use super::convert::status;
use crate::manager::{ApiError, Manager};

/// Serves one Console stream: the first message names the VM (and may
/// carry input); later ones are input; the answer is the console log,
/// its recent part replayed, then followed across rotations.
pub(super) async fn serve(
    manager: Arc<Manager>,
    stream: ServerStream<pb::ConsoleChunk, pb::ConsoleChunk>,
) -> ttrpc::Result<()> {
    let (tx, mut rx) = stream.split();
    let first = rx.recv().await?.ok_or_else(|| {
        status(ApiError::InvalidArgument(
            "console: no first message".into(),
        ))
    })?;
    let id = first.id.clone();
    let log = manager.console_log_path(&id).map_err(status)?;
    if !first.data.is_empty() {
        manager
            .console_write(&id, first.data)
            .await
            .map_err(status)?;
    }
    let writer = manager.clone();
    let input_id = id.clone();
    let input = tokio::spawn(async move {
        while let Ok(Some(chunk)) = rx.recv().await {
            if writer.console_write(&input_id, chunk.data).await.is_err() {
                break;
            }
        }
    });
    // Replay the recent log, then follow it (across rotations).
    let mut offset = std::fs::metadata(&log)
        .map(|m| m.len().saturating_sub(64 << 10))
        .unwrap_or(0);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let len = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        if len < offset {
            offset = 0; // rotated
        }
        if len > offset {
            let mut file =
                std::fs::File::open(&log).map_err(|e| status(ApiError::Internal(e.to_string())))?;
            file.seek(SeekFrom::Start(offset)).ok();
            let n = file.read(&mut buf).unwrap_or(0);
            offset += n as u64;
            let chunk = pb::ConsoleChunk {
                id: id.clone(),
                data: buf[..n].to_vec(),
                ..Default::default()
            };
            if tx.send(&chunk).await.is_err() {
                break;
            }
            continue;
        }
        // The client hung up (its side of the stream ended) or the VM
        // is gone: nobody is left to follow the log for.
        if input.is_finished() || manager.get(&id).is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    input.abort();
    Ok(())
}
