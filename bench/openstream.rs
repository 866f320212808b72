//! OpenStream throughput: one Argo `OpenStream` of an artifact through a running
//! `fillfs argo-artifact SOCKET`, bytes counted and discarded, as argo-server streams an
//! artifact to a browser. Prints one JSON line (bytes, seconds, MiB/s).
//!
//! cargo run --release --example openstream -- SOCKET KEY --config "bucket: b ..."

use std::time::Instant;

use clap::Parser;
use fillfs::artifact::proto::artifact_service_client::ArtifactServiceClient;
use fillfs::artifact::proto::{Artifact, OpenStreamRequest, PluginArtifact};

#[derive(Parser)]
struct Args {
    socket: std::path::PathBuf,
    key: String,
    /// The plugin configuration (YAML or JSON).
    #[arg(long)]
    config: String,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let path = a.socket.clone();
        // As Argo's Go client dials a unix socket: `:authority` is `localhost`.
        let channel = tonic::transport::Endpoint::try_from("http://localhost")?
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await?;
        let mut client = ArtifactServiceClient::new(channel);
        let start = Instant::now();
        let mut stream = client
            .open_stream(OpenStreamRequest {
                artifact: Some(Artifact {
                    plugin: Some(PluginArtifact {
                        name: "fillfs".into(),
                        configuration: a.config,
                        key: a.key,
                        connection_timeout_seconds: 30,
                    }),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner();
        let mut bytes = 0u64;
        while let Some(frame) = stream.message().await? {
            anyhow::ensure!(frame.error.is_empty(), "{}", frame.error);
            bytes += frame.data.len() as u64;
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{{\"bytes\":{bytes},\"seconds\":{secs:.3},\"mib_s\":{:.1}}}",
            bytes as f64 / 1048576.0 / secs
        );
        Ok(())
    })
}
