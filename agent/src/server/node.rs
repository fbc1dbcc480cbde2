//! NodeService: the host, its capacity, drain, and the event stream.

use std::sync::Arc;

use berth_proto::common::Empty;
use berth_proto::node::{Capacity, Event as PbEvent, NodeInfo, WatchRequest};
use berth_proto::node_ttrpc;
use ttrpc::r#async::{ServerStreamSender, TtrpcContext};

use super::convert::{capacity_pb, event_to_pb, status};
use crate::manager::Manager;

pub struct NodeApi(pub Arc<Manager>);

#[async_trait::async_trait]
impl node_ttrpc::NodeService for NodeApi {
    async fn get_node(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<NodeInfo> {
        let (hypervisor, module) = self.0.limits.flavour.kind_and_module();
        Ok(NodeInfo {
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            api_version: berth_proto::API_VERSION.into(),
            hypervisor: hypervisor.into(),
            kvm_module: module.into(),
            max_vcpus: self.0.limits.max_vcpus,
            features: [
                "vm.lifecycle",
                "vm.console",
                "vm.restart-policy",
                "node.watch",
                "image.store",
                "vm.group",
            ]
            .map(String::from)
            .to_vec(),
            kernel_release: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            quarantined: self.0.quarantined.clone(),
            ..Default::default()
        })
    }

    async fn get_capacity(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<Capacity> {
        Ok(capacity_pb(&self.0))
    }

    async fn drain(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<Capacity> {
        self.0.set_drained(true).map_err(status)?;
        Ok(capacity_pb(&self.0))
    }

    async fn undrain(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<Capacity> {
        self.0.set_drained(false).map_err(status)?;
        Ok(capacity_pb(&self.0))
    }

    async fn watch(
        &self,
        _: &TtrpcContext,
        req: WatchRequest,
        tx: ServerStreamSender<PbEvent>,
    ) -> ttrpc::Result<()> {
        let mut events = self.0.subscribe();
        loop {
            match events.recv().await {
                Ok(e) => {
                    if !req.id.is_empty() && e.vm_id != req.id {
                        continue;
                    }
                    if tx.send(&event_to_pb(&e)).await.is_err() {
                        return Ok(());
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return Ok(()),
            }
        }
    }
}
