//! `nodectl image ...`: the node's image store.

use std::io::Read;
use std::path::{Path, PathBuf};

use berth_proto::image as pb;
use berth_proto::image_ttrpc::ImageServiceClient;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::agent::ctx;
use crate::args::parse_labels;
use crate::failure::{fail, from_ttrpc, Failure};
use crate::progress::Progress;
use crate::render::json::image_json;
use crate::render::table::{print_fields, print_table};

const CHUNK: usize = 1 << 20;

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Store a kernel, initrd or disk image. The file is read here and
    /// streamed to the agent (so it needs only to be readable by you);
    /// with --on-node the agent reads it itself from its kernel/disk roots.
    Import {
        file: PathBuf,
        #[arg(long)]
        name: String,
        /// kernel, initrd or disk.
        #[arg(long)]
        kind: String,
        #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Refuse the import unless the file hashes to this (sha256:<hex>).
        #[arg(long)]
        digest: Option<String>,
        /// raw or qcow2 (default: detected). qcow2 is converted to raw.
        #[arg(long)]
        format: Option<String>,
        #[arg(long)]
        on_node: bool,
    },
    /// List stored images.
    List {
        #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        #[arg(long)]
        kind: Option<String>,
    },
    /// Show one image (by name or sha256:<hex>), with the VMs using it.
    Show { name: String },
    /// Remove an image; refused while a VM's spec names it.
    Remove { name: String },
}

fn print_image(i: &pb::Image, json: bool) {
    let v = image_json(i);
    if json {
        println!("{v}");
        return;
    }
    print_fields(&v, 14);
}

pub async fn run(images: ImageServiceClient, cmd: ImageCmd, json: bool) -> Result<(), Failure> {
    match cmd {
        ImageCmd::Import {
            file,
            name,
            kind,
            labels,
            digest,
            format,
            on_node,
        } => {
            let header = pb::ImportImageHeader {
                name,
                kind,
                labels: parse_labels(&labels)?,
                expected_digest: digest.unwrap_or_default(),
                format: format.unwrap_or_default(),
                ..Default::default()
            };
            import(&images, header, &file, on_node, json).await
        }
        ImageCmd::List { labels, kind } => list(&images, &labels, kind, json).await,
        ImageCmd::Show { name } => {
            let req = pb::ImageRef {
                name,
                ..Default::default()
            };
            print_image(&images.get(ctx(), &req).await.map_err(from_ttrpc)?, json);
            Ok(())
        }
        ImageCmd::Remove { name } => {
            let req = pb::ImageRef {
                name: name.clone(),
                ..Default::default()
            };
            images.remove(ctx(), &req).await.map_err(from_ttrpc)?;
            if json {
                println!("{}", json!({"removed": name}));
            } else {
                println!("removed image {name}");
            }
            Ok(())
        }
    }
}

/// Streams `file` to the agent behind `header`, or with `on_node` lets the
/// agent read it itself; prints the stored image.
async fn import(
    images: &ImageServiceClient,
    mut header: pb::ImportImageHeader,
    file: &Path,
    on_node: bool,
    json: bool,
) -> Result<(), Failure> {
    let name = header.name.clone();
    // The bytes come from here unless the agent reads the file itself.
    let local = if on_node {
        header.path = file.display().to_string();
        None
    } else {
        let f = std::fs::File::open(file)
            .map_err(|e| fail(2, format!("cannot read {}: {e}", file.display())))?;
        header.size_bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
        Some(f)
    };
    let total = header.size_bytes;
    let mut stream = images.import(ctx()).await.map_err(from_ttrpc)?;
    stream
        .send(&pb::ImageChunk {
            header: protobuf::MessageField::some(header),
            ..Default::default()
        })
        .await
        .map_err(from_ttrpc)?;
    if let Some(mut f) = local {
        let mut bar = Progress::new(format!("importing {name}"), total, json);
        let mut sent = 0u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| fail(1, format!("reading {}: {e}", file.display())))?;
            if n == 0 {
                break;
            }
            stream
                .send(&pb::ImageChunk {
                    data: buf[..n].to_vec(),
                    ..Default::default()
                })
                .await
                .map_err(from_ttrpc)?;
            sent += n as u64;
            bar.update(sent);
        }
        bar.finish(sent);
    }
    let image = stream.close_and_recv().await.map_err(from_ttrpc)?;
    print_image(&image, json);
    Ok(())
}

async fn list(
    images: &ImageServiceClient,
    labels: &[String],
    kind: Option<String>,
    json: bool,
) -> Result<(), Failure> {
    let req = pb::ListImagesRequest {
        labels: parse_labels(labels)?,
        kind: kind.unwrap_or_default(),
        ..Default::default()
    };
    let list = images.list(ctx(), &req).await.map_err(from_ttrpc)?;
    if json {
        let all: Vec<Value> = list.images.iter().map(image_json).collect();
        println!("{}", Value::Array(all));
        return Ok(());
    }
    let mut rows = vec![["NAME", "KIND", "DIGEST", "SIZE", "FROM", "USED BY"]
        .map(String::from)
        .to_vec()];
    for i in &list.images {
        rows.push(vec![
            i.name.clone(),
            i.kind.clone(),
            i.digest.chars().take(19).collect(),
            format!("{} MiB", i.size_bytes.div_ceil(1 << 20)),
            i.source_format.clone(),
            i.used_by.join(","),
        ]);
    }
    print_table(rows);
    Ok(())
}
