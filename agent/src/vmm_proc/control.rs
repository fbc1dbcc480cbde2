//! The VMM's control socket (`VmmService` in `vmm.proto`) as the core uses
//! it: one method a call, each with its deadline, and the conversions
//! between the agent's types and that contract's messages in one place.

use std::time::Duration;

use berth_proto::common::Empty;
use berth_proto::vmm::{
    ConsoleInput, MigrateRequest, MigrationStatus, SetRateLimitRequest, SnapshotReply,
    SnapshotRequest, VmmInfo, VmmStats,
};
use berth_proto::vmm_ttrpc::VmmServiceClient;
use protobuf::MessageField;

use crate::spec::RateLimit;
use crate::store::VmDir;

pub use berth_proto::vmm_process::control::RunState;

/// One VMM's control socket.
#[async_trait::async_trait]
pub trait VmmControl: Send + Sync {
    async fn info(&self, timeout: Duration) -> ttrpc::Result<VmmInfo>;
    async fn pause(&self, timeout: Duration) -> ttrpc::Result<VmmInfo>;
    async fn resume(&self, timeout: Duration) -> ttrpc::Result<VmmInfo>;
    /// Asks the guest to shut down (Ctrl-Alt-Del).
    async fn shutdown(&self, timeout: Duration) -> ttrpc::Result<()>;
    /// Ends the VMM at once.
    async fn stop(&self, timeout: Duration) -> ttrpc::Result<()>;
    async fn stats(&self, timeout: Duration) -> ttrpc::Result<VmmStats>;
    async fn set_rate_limit(
        &self,
        req: &SetRateLimitRequest,
        timeout: Duration,
    ) -> ttrpc::Result<()>;
    async fn console_write(&self, req: &ConsoleInput, timeout: Duration) -> ttrpc::Result<()>;
    async fn snapshot(
        &self,
        req: &SnapshotRequest,
        timeout: Duration,
    ) -> ttrpc::Result<SnapshotReply>;
    async fn migrate_out(
        &self,
        req: &MigrateRequest,
        timeout: Duration,
    ) -> ttrpc::Result<MigrationStatus>;
    async fn get_migration(&self, timeout: Duration) -> ttrpc::Result<MigrationStatus>;
    async fn cancel_migration(&self, timeout: Duration) -> ttrpc::Result<MigrationStatus>;
}

/// A VMM whose control socket did not take a connection.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the VMM at {}: {source}", socket.display())]
pub struct VmmUnreachable {
    pub socket: std::path::PathBuf,
    #[source]
    pub source: ttrpc::Error,
}

/// The real control socket, over ttrpc.
pub struct TtrpcControl(VmmServiceClient);

impl TtrpcControl {
    pub async fn connect(dir: &VmDir) -> Result<TtrpcControl, VmmUnreachable> {
        let address = format!("unix://{}", dir.socket().display());
        ttrpc::r#async::Client::connect(&address)
            .await
            .map(|c| TtrpcControl(VmmServiceClient::new(c)))
            .map_err(|source| VmmUnreachable {
                socket: dir.socket(),
                source,
            })
    }
}

fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(timeout.as_nanos().min(i64::MAX as u128) as i64)
}

#[async_trait::async_trait]
impl VmmControl for TtrpcControl {
    async fn info(&self, timeout: Duration) -> ttrpc::Result<VmmInfo> {
        self.0.info(ctx(timeout), &Empty::default()).await
    }
    async fn pause(&self, timeout: Duration) -> ttrpc::Result<VmmInfo> {
        self.0.pause(ctx(timeout), &Empty::default()).await
    }
    async fn resume(&self, timeout: Duration) -> ttrpc::Result<VmmInfo> {
        self.0.resume(ctx(timeout), &Empty::default()).await
    }
    async fn shutdown(&self, timeout: Duration) -> ttrpc::Result<()> {
        self.0.shutdown(ctx(timeout), &Empty::default()).await?;
        Ok(())
    }
    async fn stop(&self, timeout: Duration) -> ttrpc::Result<()> {
        self.0.stop(ctx(timeout), &Empty::default()).await?;
        Ok(())
    }
    async fn stats(&self, timeout: Duration) -> ttrpc::Result<VmmStats> {
        self.0.stats(ctx(timeout), &Empty::default()).await
    }
    async fn set_rate_limit(
        &self,
        req: &SetRateLimitRequest,
        timeout: Duration,
    ) -> ttrpc::Result<()> {
        self.0.set_rate_limit(ctx(timeout), req).await?;
        Ok(())
    }
    async fn console_write(&self, req: &ConsoleInput, timeout: Duration) -> ttrpc::Result<()> {
        self.0.console_write(ctx(timeout), req).await?;
        Ok(())
    }
    async fn snapshot(
        &self,
        req: &SnapshotRequest,
        timeout: Duration,
    ) -> ttrpc::Result<SnapshotReply> {
        self.0.snapshot(ctx(timeout), req).await
    }
    async fn migrate_out(
        &self,
        req: &MigrateRequest,
        timeout: Duration,
    ) -> ttrpc::Result<MigrationStatus> {
        self.0.migrate_out(ctx(timeout), req).await
    }
    async fn get_migration(&self, timeout: Duration) -> ttrpc::Result<MigrationStatus> {
        self.0.get_migration(ctx(timeout), &Empty::default()).await
    }
    async fn cancel_migration(&self, timeout: Duration) -> ttrpc::Result<MigrationStatus> {
        self.0
            .cancel_migration(ctx(timeout), &Empty::default())
            .await
    }
}

/// A rate limit from either contract's message (absent: unlimited).
pub fn rate_limit_from_pb(l: &MessageField<berth_proto::common::RateLimit>) -> RateLimit {
    l.as_ref()
        .map(|l| RateLimit {
            bytes_per_s: l.bytes_per_s,
            bytes_burst: l.bytes_burst,
            ops_per_s: l.ops_per_s,
            ops_burst: l.ops_burst,
        })
        .unwrap_or_default()
}

pub fn rate_limit_to_pb(l: RateLimit) -> berth_proto::common::RateLimit {
    berth_proto::common::RateLimit {
        bytes_per_s: l.bytes_per_s,
        bytes_burst: l.bytes_burst,
        ops_per_s: l.ops_per_s,
        ops_burst: l.ops_burst,
        ..Default::default()
    }
}
