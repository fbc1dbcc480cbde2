//! The ttrpc edge of the image store: berth.v1 ImageService.

use std::collections::BTreeMap;
use std::sync::Arc;

use berth_proto::common::Empty;
use berth_proto::image as pb;
use berth_proto::image_ttrpc;
use ttrpc::r#async::{ServerStreamReceiver, TtrpcContext};

use super::{refuse_unknown_fields, status};
use crate::images::{ImageKind, ImageRecord, ImportHeader, Importer};
use crate::manager::{image_error, ApiError, Manager};

pub struct ImageApi(pub Arc<Manager>);

/// `store` is every record of the store (read once per request).
fn image_to_pb(m: &Manager, r: ImageRecord, store: &[ImageRecord]) -> pb::Image {
    let path = m.images.blob_path(&r.digest);
    let disk_bytes = std::fs::metadata(&path)
        .map(|md| std::os::unix::fs::MetadataExt::blocks(&md) * 512)
        .unwrap_or(0);
    pb::Image {
        used_by: m.image_users(&r, store),
        copies: m.image_copies(&r),
        name: r.name,
        kind: r.kind.name().into(),
        digest: r.digest,
        size_bytes: r.size_bytes,
        disk_bytes,
        labels: r.labels.into_iter().collect(),
        created_at_ms: r.created_at_ms,
        source_format: r.source_format,
        source_digest: r.source_digest,
        source: r.source,
        path: path.display().to_string(),
        ..Default::default()
    }
}

fn header_from_pb(h: &pb::ImportImageHeader) -> Result<ImportHeader, ApiError> {
    refuse_unknown_fields("header", h)?;
    Ok(ImportHeader {
        name: h.name.clone(),
        kind: h.kind.clone(),
        labels: h
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        expected_digest: h.expected_digest.clone(),
        format: h.format.clone(),
        size_bytes: h.size_bytes,
        source: if h.path.is_empty() {
            "stream".into()
        } else {
            h.path.clone()
        },
    })
}

impl ImageApi {
    /// The reply waits for the end of the client's stream, also after an
    /// early refusal: a ttrpc client that is answered while it still sends
    /// sees only "stream is no longer active", not the reason.
    async fn import(
        &self,
        mut rx: ServerStreamReceiver<pb::ImageChunk>,
    ) -> Result<pb::Image, ApiError> {
        let result = self.receive(&mut rx).await;
        if result.is_err() {
            while let Ok(Some(_)) = rx.recv().await {}
        }
        result
    }

    async fn receive(
        &self,
        rx: &mut ServerStreamReceiver<pb::ImageChunk>,
    ) -> Result<pb::Image, ApiError> {
        let first = rx
            .recv()
            .await
            .map_err(|e| ApiError::InvalidArgument(format!("import: {e}")))?
            .ok_or_else(|| ApiError::InvalidArgument("import: no header arrived".into()))?;
        refuse_unknown_fields("chunk", &first)?;
        let pb_header = first.header.as_ref().ok_or_else(|| {
            ApiError::InvalidArgument("import: the first chunk carries no header".into())
        })?;
        let header = header_from_pb(pb_header)?;
        let manager = self.0.clone();
        let mut importer = manager.images.begin_import(header).map_err(image_error)?;
        if !pb_header.path.is_empty() {
            if !first.data.is_empty() {
                return Err(ApiError::InvalidArgument(
                    "import: give a path or bytes, not both".into(),
                ));
            }
            let roots: Vec<_> = (manager.config.kernel_roots.iter())
                .chain(&manager.config.disk_roots)
                .cloned()
                .collect();
            let path = crate::spec::resolve_in_roots("path", pb_header.path.as_ref(), &roots)
                .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
            if let Ok(Some(_)) = rx.recv().await {
                return Err(ApiError::InvalidArgument(
                    "import: give a path or bytes, not both".into(),
                ));
            }
            return tokio::task::spawn_blocking(move || {
                let file = std::fs::File::open(&path)
                    .map_err(|e| ApiError::InvalidArgument(format!("{}: {e}", path.display())))?;
                importer.write_from(file).map_err(image_error)?;
                let record = manager.images.commit(importer).map_err(image_error)?;
                Ok(image_to_pb(&manager, record, &manager.images.list()))
            })
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        }
        importer.write(&first.data).map_err(image_error)?;
        loop {
            match rx.recv().await {
                Ok(Some(chunk)) => {
                    if chunk.header.is_some() {
                        return Err(ApiError::InvalidArgument(
                            "import: only the first chunk carries a header".into(),
                        ));
                    }
                    importer.write(&chunk.data).map_err(image_error)?;
                }
                Ok(None) => break,
                // The importer's drop removes what arrived so far.
                Err(e) => {
                    return Err(ApiError::Unavailable(format!(
                        "import: the stream broke after {} bytes: {e}",
                        importer.written()
                    )))
                }
            }
        }
        commit(manager, importer).await
    }
}

async fn commit(manager: Arc<Manager>, importer: Importer) -> Result<pb::Image, ApiError> {
    tokio::task::spawn_blocking(move || {
        let record = manager.images.commit(importer).map_err(image_error)?;
        tracing::info!(image = %record.name, digest = %record.digest, "imported");
        Ok(image_to_pb(&manager, record, &manager.images.list()))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
}

#[async_trait::async_trait]
impl image_ttrpc::ImageService for ImageApi {
    async fn import(
        &self,
        _: &TtrpcContext,
        rx: ServerStreamReceiver<pb::ImageChunk>,
    ) -> ttrpc::Result<pb::Image> {
        ImageApi::import(self, rx).await.map_err(status)
    }

    async fn list(
        &self,
        _: &TtrpcContext,
        req: pb::ListImagesRequest,
    ) -> ttrpc::Result<pb::ListImagesResponse> {
        let kind = if req.kind.is_empty() {
            None
        } else {
            Some(ImageKind::parse(&req.kind).map_err(|e| {
                status(image_error(crate::images::ImageError::Invalid(
                    e.to_string(),
                )))
            })?)
        };
        let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
        let store = self.0.images.list();
        let images = (store.iter())
            .filter(|r| kind.is_none_or(|k| r.kind == k))
            .filter(|r| labels.iter().all(|(k, v)| r.labels.get(k) == Some(v)))
            .map(|r| image_to_pb(&self.0, r.clone(), &store))
            .collect();
        Ok(pb::ListImagesResponse {
            images,
            ..Default::default()
        })
    }

    async fn get(&self, _: &TtrpcContext, req: pb::ImageRef) -> ttrpc::Result<pb::Image> {
        let record = self
            .0
            .images
            .get(&req.name)
            .map_err(|e| status(image_error(e)))?;
        Ok(image_to_pb(&self.0, record, &self.0.images.list()))
    }

    async fn remove(&self, _: &TtrpcContext, req: pb::ImageRef) -> ttrpc::Result<Empty> {
        let record = self
            .0
            .images
            .get(&req.name)
            .map_err(|e| status(image_error(e)))?;
        let users = self.0.image_users(&record, &self.0.images.list());
        self.0
            .images
            .remove(&record.name, &users)
            .map_err(|e| status(image_error(e)))?;
        tracing::info!(image = %record.name, "removed");
        Ok(Empty::default())
    }
}
