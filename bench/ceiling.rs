//! The read ceiling of a prefix: every object fetched with concurrent ranged GETs, bytes
//! discarded. This is what "as fast as the store allows" means for a fill; fill speeds in
//! `bench/results` are reported as a fraction of min(this, the target's write speed).
//!
//! cargo run --release --example ceiling -- s3://bucket/prefix --endpoint URL [--jobs 64]
//! Credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. Prints one JSON line.

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use fillfs::store::{Listed, SourceUrl, Store, StoreConfig, Version};
use futures::StreamExt;

#[derive(Parser)]
struct Args {
    source: String,
    #[arg(long)]
    endpoint: Option<String>,
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// GETs in flight (as `fillfs populate`'s default).
    #[arg(long, default_value_t = 256)]
    jobs: usize,
    /// Range size in MiB.
    #[arg(long, default_value_t = 8)]
    part_mib: u64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let cfg = StoreConfig::new(SourceUrl::parse(&a.source)?, a.endpoint, Some(a.region));
        let store = Arc::new(Store::new(&cfg, Vec::new())?);
        let part = a.part_mib * 1024 * 1024;
        let mut ranges = Vec::new();
        for item in store.list_recursive().await? {
            if let Listed::File { name, meta } = item {
                let mut off = 0;
                while off < meta.size {
                    ranges.push((name.clone(), off..(off + part).min(meta.size)));
                    off += part;
                }
            }
        }
        let start = Instant::now();
        let total: u64 = futures::stream::iter(ranges)
            .map(|(key, r)| {
                let store = store.clone();
                async move {
                    let b = store.read_range(&key, &Version::Any, r).await?;
                    Ok::<_, fillfs::Error>(b.len() as u64)
                }
            })
            .buffer_unordered(a.jobs)
            .fold(Ok(0u64), |acc: anyhow::Result<u64>, r| async move { Ok(acc? + r?) })
            .await?;
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({"bytes": total, "seconds": secs, "mib_s": total as f64 / 1048576.0 / secs})
        );
        Ok(())
    })
}
