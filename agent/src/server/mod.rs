//! The berth.v1 ttrpc edge: VmService here, NodeService in `node.rs`,
//! ImageService in `images.rs`, the Console stream in `console.rs`. Each
//! method converts (`convert.rs`) and delegates to the manager.

use std::collections::BTreeMap;
use std::sync::Arc;

use berth_proto::common::Empty;
use berth_proto::vm as pb;
use berth_proto::vm_ttrpc;
use protobuf::{EnumOrUnknown, MessageField};
use ttrpc::r#async::{ServerStream, TtrpcContext};

use crate::manager::{ApiError, Manager, SnapshotKind, VmReport};

mod console;
mod convert;
mod images;
mod node;

pub use convert::*;
pub use images::ImageApi;
pub use node::NodeApi;

pub struct VmApi(pub Arc<Manager>);

#[async_trait::async_trait]
impl vm_ttrpc::VmService for VmApi {
    async fn create(&self, _: &TtrpcContext, req: pb::CreateVmRequest) -> ttrpc::Result<pb::Vm> {
        let spec = spec_of("create", &req.spec)?;
        self.0.create(spec).await.map(vm_to_pb).map_err(status)
    }

    async fn get(&self, _: &TtrpcContext, req: pb::VmRef) -> ttrpc::Result<pb::Vm> {
        self.0.get(&req.id).map(vm_to_pb).map_err(status)
    }

    async fn list(
        &self,
        _: &TtrpcContext,
        req: pb::ListVmsRequest,
    ) -> ttrpc::Result<pb::ListVmsResponse> {
        let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
        let after = req.page_token;
        let views =
            (self.0.list(&labels).into_iter()).filter(|v| after.is_empty() || v.spec.id > after);
        Ok(list_page(views, req.page_size))
    }

    async fn update(&self, _: &TtrpcContext, req: pb::UpdateVmRequest) -> ttrpc::Result<pb::Vm> {
        let spec = spec_of("update", &req.spec)?;
        self.0.update(spec).await.map(vm_to_pb).map_err(status)
    }

    async fn delete(&self, _: &TtrpcContext, req: pb::VmRef) -> ttrpc::Result<Empty> {
        self.0
            .delete(&req.id)
            .await
            .map(|_| Empty::default())
            .map_err(status)
    }

    async fn start(&self, _: &TtrpcContext, req: pb::VmRef) -> ttrpc::Result<pb::Vm> {
        self.0.start(&req.id).await.map(vm_to_pb).map_err(status)
    }

    async fn stop(&self, _: &TtrpcContext, req: pb::StopVmRequest) -> ttrpc::Result<pb::Vm> {
        self.0
            .stop(&req.id, req.force, stop_timeout(req.timeout_ms))
            .await
            .map(vm_to_pb)
            .map_err(status)
    }

    async fn reboot(&self, _: &TtrpcContext, req: pb::VmRef) -> ttrpc::Result<pb::Vm> {
        self.0.reboot(&req.id).await.map(vm_to_pb).map_err(status)
    }

    async fn snapshot(
        &self,
        _: &TtrpcContext,
        req: pb::SnapshotVmRequest,
    ) -> ttrpc::Result<pb::SnapshotInfo> {
        self.0
            .snapshot(
                &req.id,
                &req.name,
                req.hibernate,
                SnapshotKind::parse(&req.kind)
                    .map_err(|e| status(ApiError::InvalidArgument(e.to_string())))?,
                req.live,
            )
            .await
            .map(snapshot_to_pb)
            .map_err(status)
    }

    async fn restore(&self, _: &TtrpcContext, req: pb::RestoreVmRequest) -> ttrpc::Result<pb::Vm> {
        self.0
            .restore(
                &req.id,
                &req.snapshot,
                &req.new_id,
                &req.new_name,
                req.paused,
                &pairs(&req.tap_overrides),
            )
            .await
            .map(vm_to_pb)
            .map_err(status)
    }

    async fn prepare_migrate_in(
        &self,
        _: &TtrpcContext,
        req: pb::PrepareMigrateInRequest,
    ) -> ttrpc::Result<pb::PrepareMigrateInResponse> {
        let spec = spec_of("PrepareMigrateIn", &req.spec)?;
        let ttl = token_ttl(req.token_ttl_ms).map_err(status)?;
        let prepared = self
            .0
            .prepare_migrate_in(spec, &req.listen_address, ttl, &pairs(&req.tap_overrides))
            .await
            .map_err(status)?;
        Ok(pb::PrepareMigrateInResponse {
            address: prepared.address,
            token: prepared.token,
            expires_at_ms: prepared.expires_at_ms,
            vm: MessageField::some(vm_to_pb(prepared.vm)),
            ..Default::default()
        })
    }

    async fn migrate_out(
        &self,
        _: &TtrpcContext,
        req: pb::MigrateOutRequest,
    ) -> ttrpc::Result<pb::MigrationInfo> {
        let params = migrate_params(&req.params.clone().unwrap_or_default());
        self.0
            .migrate_out(&req.id, &req.address, &req.token, &params)
            .await
            .map(|m| migration_to_pb(&req.id, m))
            .map_err(status)
    }

    async fn get_migration(
        &self,
        _: &TtrpcContext,
        req: pb::VmRef,
    ) -> ttrpc::Result<pb::MigrationInfo> {
        self.0
            .get_migration(&req.id)
            .map(|m| migration_to_pb(&req.id, m))
            .map_err(status)
    }

    async fn cancel_migration(
        &self,
        _: &TtrpcContext,
        req: pb::VmRef,
    ) -> ttrpc::Result<pb::MigrationInfo> {
        self.0
            .cancel_migration(&req.id)
            .await
            .map(|m| migration_to_pb(&req.id, m))
            .map_err(status)
    }

    async fn list_snapshots(
        &self,
        _: &TtrpcContext,
        req: pb::VmRef,
    ) -> ttrpc::Result<pb::ListSnapshotsResponse> {
        Ok(pb::ListSnapshotsResponse {
            snapshots: self
                .0
                .list_snapshots(&req.id)
                .map_err(status)?
                .into_iter()
                .map(snapshot_to_pb)
                .collect(),
            ..Default::default()
        })
    }

    async fn delete_snapshot(
        &self,
        _: &TtrpcContext,
        req: pb::SnapshotRef,
    ) -> ttrpc::Result<Empty> {
        self.0
            .delete_snapshot(&req.id, &req.name)
            .await
            .map(|_| Empty::default())
            .map_err(status)
    }

    async fn group(
        &self,
        _: &TtrpcContext,
        req: pb::GroupActionRequest,
    ) -> ttrpc::Result<pb::GroupActionResponse> {
        use crate::manager::GroupAction;
        refuse_unknown_fields("group", &req).map_err(status)?;
        let action = match req.action.enum_value() {
            Ok(pb::GroupAction::GROUP_START) => GroupAction::Start,
            Ok(pb::GroupAction::GROUP_STOP) => GroupAction::Stop {
                force: req.force,
                timeout: stop_timeout(req.timeout_ms),
            },
            Ok(pb::GroupAction::GROUP_PAUSE) => GroupAction::Pause,
            Ok(pb::GroupAction::GROUP_RESUME) => GroupAction::Resume,
            Ok(pb::GroupAction::GROUP_SNAPSHOT) => GroupAction::Snapshot,
            _ => {
                return Err(status(ApiError::InvalidArgument(
                    "action: give start, stop, pause, resume or snapshot".into(),
                )))
            }
        };
        let selector: BTreeMap<String, String> = req.selector.into_iter().collect();
        let outcome = self
            .0
            .group(&selector, action, &req.snapshot_name)
            .await
            .map_err(status)?;
        Ok(pb::GroupActionResponse {
            results: (outcome.results.into_iter())
                .map(|r| pb::GroupMemberResult {
                    id: r.id,
                    ok: r.outcome.is_ok(),
                    error: r.outcome.err().map(|e| e.to_string()).unwrap_or_default(),
                    state: EnumOrUnknown::new(state_to_pb(r.state)),
                    snapshot: r.snapshot.map(snapshot_to_pb).into(),
                    ..Default::default()
                })
                .collect(),
            all_paused_at_ms: outcome.all_paused_at_ms,
            resumed_at_ms: outcome.resumed_at_ms,
            ..Default::default()
        })
    }

    async fn get_snapshot_progress(
        &self,
        _: &TtrpcContext,
        req: pb::SnapshotRef,
    ) -> ttrpc::Result<pb::SnapshotProgress> {
        let p = self
            .0
            .snapshot_progress(&req.id, &req.name)
            .map_err(status)?;
        Ok(pb::SnapshotProgress {
            active: p.active,
            pass: p.pass,
            done_bytes: p.done_bytes,
            total_bytes: p.total_bytes,
            exists: p.exists,
            ..Default::default()
        })
    }

    async fn stats(&self, _: &TtrpcContext, req: pb::VmRef) -> ttrpc::Result<pb::VmStats> {
        let VmReport {
            spec,
            state,
            report: r,
        } = self.0.report(&req.id).map_err(status)?;
        let mut stats = stats_to_pb(&spec, state, r);
        stats.usage = MessageField::some(usage_to_pb(&self.0.usage(&req.id).map_err(status)?));
        Ok(stats)
    }

    async fn pause(&self, _: &TtrpcContext, req: pb::VmRef) -> ttrpc::Result<pb::Vm> {
        self.0.pause(&req.id).await.map(vm_to_pb).map_err(status)
    }

    async fn resume(&self, _: &TtrpcContext, req: pb::VmRef) -> ttrpc::Result<pb::Vm> {
        self.0.resume(&req.id).await.map(vm_to_pb).map_err(status)
    }

    async fn console(
        &self,
        _: &TtrpcContext,
        stream: ServerStream<pb::ConsoleChunk, pb::ConsoleChunk>,
    ) -> ttrpc::Result<()> {
        console::serve(self.0.clone(), stream).await
    }
}
