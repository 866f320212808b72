//! Sequential-read benchmark: one reader through `fillfs mount` versus the same object read
//! directly with concurrent ranged GETs (the read ceiling), against the same loopback S3
//! emulator, in the same run. Reports MiB/s and the ratio.
//!
//! cargo build --release --bin fillfs && cargo run --release --example seqread -- --help

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use fillfs::store::{Credentials, Secret, SourceUrl, Store, StoreConfig, Version};

#[derive(Parser)]
struct Args {
    /// Object size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Ranged GETs in flight for the direct reader.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Size of each direct ranged GET, MiB (same as fillfs's default block).
    #[arg(long, default_value_t = 4)]
    range_mib: u64,
    /// Extra arguments for `fillfs mount` (repeatable), e.g. --mount-arg=--block-size=8MiB.
    #[arg(long = "mount-arg", allow_hyphen_values = true)]
    mount_args: Vec<String>,
    /// Only the emulator setting with latency and per-connection caps.
    #[arg(long)]
    latency_only: bool,
    /// Write the markdown table here as well as to stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

const MIB: u64 = 1024 * 1024;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let fillfs = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("fillfs");
    anyhow::ensure!(
        fillfs.exists(),
        "build the binary first: cargo build --release --bin fillfs"
    );
    let mut rows = Vec::new();
    for (latency_ms, bw_mib) in [(0u64, 0u64), (20, 50)] {
        if args.latency_only && latency_ms == 0 {
            continue;
        }
        let emu = s3emu::Emulator::start(s3emu::Config {
            first_byte_latency: Duration::from_millis(latency_ms),
            per_connection_bandwidth: (bw_mib > 0).then_some(bw_mib * MIB),
            ..Default::default()
        })?;
        emu.create_bucket("bench");
        let size = args.size_mib * MIB;
        let data: Vec<u8> = (0..size)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        emu.put_object("bench", "data/object.bin", data.into());

        let direct = direct_read(&emu, size, args.concurrency, args.range_mib * MIB)?;
        let mount = mount_read(&fillfs, &emu, size, &args.mount_args)?;
        let label = if latency_ms == 0 {
            "loopback, no latency, no cap".to_string()
        } else {
            format!("{latency_ms} ms first byte, {bw_mib} MiB/s per connection")
        };
        rows.push(format!(
            "| {label} | {} MiB | {:.0} | {:.0} | {:.2} |",
            args.size_mib,
            direct,
            mount,
            mount / direct
        ));
    }
    let table = format!(
        "| emulator | object | direct ranged GETs ({} × {} MiB in flight), MiB/s | `fillfs mount` + 1 sequential reader (1 MiB reads), MiB/s | mount / direct |\n|---|---|---|---|---|\n{}\n",
        args.concurrency,
        args.range_mib,
        rows.join("\n")
    );
    print!("{table}");
    if let Some(out) = args.out {
        std::fs::write(out, &table)?;
    }
    Ok(())
}

fn direct_read(
    emu: &s3emu::Emulator,
    size: u64,
    concurrency: usize,
    range: u64,
) -> anyhow::Result<f64> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut cfg = StoreConfig::new(
            SourceUrl::parse("s3://bench/data")?,
            Some(emu.endpoint()),
            Some("us-east-1".into()),
        );
        cfg.credentials = Credentials {
            access_key_id: Some(Secret::new(emu.access_key())),
            secret_access_key: Some(Secret::new(emu.secret_key())),
            ..Default::default()
        };
        let store = Store::new(&cfg, Vec::new())?;
        let next = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (store, next) = (store.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let off = next.fetch_add(range, Ordering::Relaxed);
                    if off >= size {
                        return Ok::<_, fillfs::Error>(());
                    }
                    let b = store
                        .read_range("object.bin", &Version::Any, off..(off + range).min(size))
                        .await?;
                    std::hint::black_box(b);
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok(size as f64 / MIB as f64 / start.elapsed().as_secs_f64())
    })
}

fn mount_read(
    fillfs: &Path,
    emu: &s3emu::Emulator,
    size: u64,
    extra: &[String],
) -> anyhow::Result<f64> {
    let mp = tempfile::tempdir()?;
    let mut child = Command::new(fillfs)
        .args([
            "mount",
            "s3://bench/data",
            "--endpoint",
            &emu.endpoint(),
            "--region",
            "us-east-1",
        ])
        .arg(mp.path())
        .args(extra)
        .env("AWS_ACCESS_KEY_ID", emu.access_key())
        .env("AWS_SECRET_ACCESS_KEY", emu.secret_key())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(mp.path())?.next().is_none() {
        anyhow::ensure!(Instant::now() < deadline, "mount did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let start = Instant::now();
    let mut f = std::fs::File::open(mp.path().join("object.bin"))?;
    let mut buf = vec![0u8; MIB as usize];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(total == size, "read {total} of {size} bytes");
    drop(f);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGTERM,
    );
    child.wait()?;
    Ok(size as f64 / MIB as f64 / secs)
}
