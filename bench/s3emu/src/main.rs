//! The `s3emu` binary: command-line front end for benchmarks. Starts the
//! emulator with benchmark-friendly defaults (20 ms first-byte latency,
//! 50 MiB/s per GET stream), prints `s3emu listening on http://ADDR`, and on
//! SIGINT/SIGTERM prints a stats line and exits.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use s3emu::{Config, Emulator, Faults, Stats};

#[derive(Parser, Debug)]
#[command(
    name = "s3emu",
    version,
    about = "In-memory S3 emulator for fillfs benchmarks"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    #[arg(long, default_value = "fillfs")]
    access_key: String,
    #[arg(long, default_value = "fillfs-secret")]
    secret_key: String,
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// First-byte latency before every response: "20ms", "1s", or an integer in ms.
    #[arg(long, default_value = "20ms", value_parser = parse_latency)]
    latency: Duration,
    /// Per-GET-stream bandwidth cap in MiB/s (0 = unlimited).
    #[arg(long, default_value_t = 50.0)]
    bandwidth_mib: f64,
    /// Probability that a GET/HEAD answers 503 SlowDown / 500 InternalError.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Probability that a GET body is cut short (connection reset).
    #[arg(long, default_value_t = 0.0)]
    reset_rate: f64,
    /// Probability that a GET body has one byte flipped.
    #[arg(long, default_value_t = 0.0)]
    corrupt_rate: f64,
    /// Seed for the fault RNG.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Serve unsigned reads (GET/HEAD), as a public-read bucket does.
    #[arg(long)]
    public_read: bool,
    /// Leave out `x-oss-hash-crc64ecma` (answer as S3 does, not as OSS).
    #[arg(long)]
    no_crc64: bool,
    /// Keep parts and objects of 4 MiB or more in memory-mapped files in this directory
    /// (for objects larger than the RAM one wants to give the emulator).
    #[arg(long, value_name = "DIR")]
    spill_dir: Option<std::path::PathBuf>,
    /// Probability that an UploadPart is answered 5xx after its body arrived.
    #[arg(long, default_value_t = 0.0)]
    part_error_rate: f64,
    /// Bucket to create at start (repeatable).
    #[arg(long = "bucket", value_name = "NAME")]
    buckets: Vec<String>,
}

fn parse_latency(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(Duration::from_millis(ms));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

fn stats_line(s: &Stats) -> String {
    format!(
        "s3emu stats: requests={} gets={} heads={} lists={} puts={} get_bytes={} injected_errors={} injected_resets={} injected_corruptions={} put_bytes={} injected_part_faults={}",
        s.requests,
        s.gets,
        s.heads,
        s.lists,
        s.puts,
        s.get_bytes,
        s.injected_errors,
        s.injected_resets,
        s.injected_corruptions,
        s.put_bytes,
        s.injected_part_faults
    )
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let args = Args::parse();
    anyhow::ensure!(
        args.bandwidth_mib.is_finite() && args.bandwidth_mib >= 0.0,
        "--bandwidth-mib must be >= 0"
    );
    for (name, v) in [
        ("--error-rate", args.error_rate),
        ("--reset-rate", args.reset_rate),
        ("--corrupt-rate", args.corrupt_rate),
    ] {
        anyhow::ensure!((0.0..=1.0).contains(&v), "{name} must be within [0, 1]");
    }
    let bandwidth =
        (args.bandwidth_mib > 0.0).then_some((args.bandwidth_mib * 1024.0 * 1024.0) as u64);

    let emu = Emulator::start(Config {
        listen: args.listen,
        access_key: args.access_key,
        secret_key: args.secret_key,
        region: args.region,
        first_byte_latency: args.latency,
        per_connection_bandwidth: bandwidth,
        seed: args.seed,
        spill_dir: args.spill_dir,
    })?;
    emu.set_part_faults(s3emu::PartFaults {
        error_rate: args.part_error_rate,
        ..Default::default()
    });
    emu.set_public_read(args.public_read);
    emu.set_declare_crc64(!args.no_crc64);
    emu.set_faults(Faults {
        error_rate: args.error_rate,
        reset_rate: args.reset_rate,
        corrupt_rate: args.corrupt_rate,
    });
    for b in &args.buckets {
        emu.create_bucket(b);
    }

    let mut out = std::io::stdout().lock();
    writeln!(out, "s3emu listening on {}", emu.endpoint())?;
    out.flush()?;
    drop(out);

    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building signal runtime")?
        .block_on(wait_for_signal())?;

    let line = stats_line(&emu.stats());
    emu.shutdown();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}
