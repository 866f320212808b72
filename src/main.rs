//! The `fillfs` command line: parses arguments and hands them to the library. No logic
//! lives here beyond process concerns (logging set-up, daemonizing, exit codes).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use fillfs::mount::MountOptions;
use fillfs::options;
use fillfs::populate::{PopulateOptions, ProgressMode, TargetKind};
use fillfs::store::{SourceUrl, StoreConfig};

#[derive(Parser)]
#[command(
    name = "fillfs",
    version,
    about = "Fill Kubernetes volumes from object storage (Alibaba OSS, S3) fast, within a bandwidth budget",
    long_about = "fillfs serves object-storage prefixes as read-only file systems and copies them onto volumes.\n\n\
                  Sources: s3://BUCKET/PREFIX (any S3-compatible endpoint), oss://BUCKET/PREFIX (Alibaba OSS),\n\
                  file:///DIR (a local directory through the same object-store layer; needs no account).\n\n\
                  Credentials come from the environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for s3;\n\
                  ALIBABA_CLOUD_ACCESS_KEY_ID / ALIBABA_CLOUD_ACCESS_KEY_SECRET, or RRSA (ALIBABA_CLOUD_ROLE_ARN,\n\
                  ALIBABA_CLOUD_OIDC_PROVIDER_ARN, ALIBABA_CLOUD_OIDC_TOKEN_FILE) for oss. They are never logged.\n\n\
                  Logging: RUST_LOG (e.g. RUST_LOG=fillfs=debug), default info.\n\n\
                  Exit status: 0 success; 1 failure worth retrying (network, store errors); 2 failure a retry cannot fix\n\
                  (bad arguments, missing bucket, rejected credentials, checksum mismatch, target too small)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount a bucket prefix read-only at MOUNTPOINT.
    Mount(MountArgs),
    /// Copy a bucket prefix (or a local directory, e.g. a fillfs mount) into TARGET:
    /// many transfers in flight, capped, verified, resumable after a crash.
    Populate(PopulateArgs),
    /// Run the volume populator: fill every PVC whose dataSourceRef names an
    /// OSSVolumePopulator (storage.alibabacloud.com/v1beta1).
    Controller(ControllerArgs),
    /// Print the OSSVolumePopulator CustomResourceDefinition (YAML) for `kubectl apply -f -`.
    Crd,
    /// Run the CSI node plugin: serve every fillfs volume of this node from one process,
    /// with a node-wide bandwidth cap and one shared cache.
    Csi(CsiArgs),
    /// Run the Argo Workflows artifact driver plugin on a unix socket (Argo passes its path
    /// as the one argument): Save/Load/OpenStream/Delete/ListObjects/IsDirectory/SaveStream
    /// of artifacts in OSS or S3, configured by the artifact's `plugin.configuration`.
    #[command(
        long_about = "The Argo Workflows (v4.0+) artifact driver plugin. Argo starts the plugin image with the \
                      socket path as its only argument, as an init container or sidecar of workflow pods, in \
                      artifact GC pods, and next to argo-server; the image's entrypoint is \
                      `fillfs argo-artifact`.\n\n\
                      Configuration (the artifact repository's plugin.configuration, YAML or JSON):\n  \
                      bucket: my-bucket        (required)\n  \
                      protocol: oss            (oss or s3)\n  \
                      endpoint: ... / region: ...\n  \
                      throughput: 200          (MiB/s, 0 = unlimited)\n  \
                      partSize: 16MiB          (grown so a file needs at most 10,000 parts)\n  \
                      jobs: 16                 (parts or files in flight)\n  \
                      secretDir: /etc/fillfs   (optional: files named like the credential variables)\n\n\
                      Credentials otherwise come from the environment (ALIBABA_CLOUD_ACCESS_KEY_ID/SECRET, \
                      RRSA's ALIBABA_CLOUD_ROLE_ARN + OIDC variables, or AWS_*). SIGTERM finishes the RPCs \
                      under way and exits 0."
    )]
    ArgoArtifact(ArgoArtifactArgs),
    /// Upload a file or a directory tree to s3://, oss:// (or file://): parts in parallel,
    /// capped, every part checked, resumable after a crash or Ctrl-C.
    #[command(
        long_about = "Upload SRC to URL. A file goes to the key URL names (or keeps its name under URL \
                      when URL ends in /); a directory's files go under the prefix URL names, with their \
                      paths relative to SRC.\n\n\
                      A file larger than --part-size is sent as a multipart upload, --jobs parts at a time \
                      (the part size grows so no file needs more than 10,000 parts; 5 TiB fits). Each part \
                      is checked: against the CRC-64 the store answers (OSS), or by the store against the \
                      Content-MD5 sent with it (S3); it is sent again on a mismatch, a 5xx or a reset. The \
                      finished object's CRC-64 (or multipart ETag) is checked too.\n\n\
                      Resuming: while a multipart upload runs, a checkpoint in --state-dir records the \
                      upload and its finished parts. Running the same command again after a crash, a kill \
                      or Ctrl-C confirms those parts with the store and sends only the rest; a changed file \
                      (size or mtime) starts over. An upload that fails is aborted, as are other open \
                      uploads of the same key, so no incomplete upload is left billing."
    )]
    Upload(UploadArgs),
}

#[derive(Args)]
struct UploadArgs {
    /// A file or a directory.
    source: PathBuf,
    /// s3://BUCKET/KEY, oss://BUCKET/KEY, or a prefix ending in / (file:///DIR too).
    url: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Cap on bytes sent to the store, MiB/s. 0 = unlimited.
    #[arg(long, value_name = "MIB_PER_S", default_value_t = 0.0, value_parser = parse_throughput)]
    throughput: f64,
    /// Parts (and small files) in flight.
    #[arg(long, default_value_t = 16, value_parser = parse_jobs)]
    jobs: usize,
    /// Multipart part size (5 MiB to 5 GiB); files up to it are one PUT.
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_upload_part_size)]
    part_size: u64,
    /// Most part data held in memory (read and not yet acknowledged).
    #[arg(long, value_name = "SIZE", default_value = "512MiB", value_parser = parse_size)]
    memory: u64,
    /// Where upload checkpoints are kept. Default: $XDG_STATE_HOME/fillfs/uploads
    /// (~/.local/state/fillfs/uploads).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Progress display: a bar on a terminal, JSON lines on stdout for machines, or none.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
}

#[derive(Args)]
struct ArgoArtifactArgs {
    /// The unix socket to serve on, e.g. /tmp/artifact-plugins/fillfs/socket.
    socket: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics (per repository: bytes and parts
    /// uploaded, re-sent and resumed, aborted uploads). Argo appends
    /// only the socket, so in a plugin's sidecar set it with the environment. Default: none.
    #[arg(long, env = "FILLFS_METRICS_ADDR", value_name = "ADDR", default_value = "none", value_parser = parse_metrics_addr)]
    metrics_addr: String,
}

#[derive(Args)]
#[command(
    long_about = "Watches PersistentVolumeClaims whose dataSourceRef names an OSSVolumePopulator. For each, it \
                  creates a temporary claim (prime-<uid>) and a fill pod (populate-<uid>) in --namespace that runs \
                  `fillfs populate` into it, then hands the filled volume to the user's claim.\n\n\
                  Fill paths: `node` mounts the bucket through the fillfs CSI node plugin (shared node cache and cap); \
                  `direct` reads oss:// from inside the fill pod (serverless/virtual nodes, or nodes without the plugin). \
                  The path is chosen per claim from the pod's placement and CSINode; the annotation fillfs.io/fill-path: \
                  node|direct|auto on the claim or the populator overrides it.\n\n\
                  Progress shows as the fillfs.io/progress annotation and as events on the claim (kubectl describe pvc). \
                  /metrics, /healthz and /readyz (watches working) are served on --metrics-addr."
)]
struct ControllerArgs {
    /// Namespace of temporary claims, fill pods and copied secrets.
    #[arg(long, env = "POD_NAMESPACE", default_value = "fillfs-system")]
    namespace: String,
    /// Image of the fill pods (this program's image).
    #[arg(long, env = "FILLFS_IMAGE", default_value = concat!("ghcr.io/fillfs/fillfs:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// Service account of the fill pods (RRSA exchanges its token).
    #[arg(long, default_value = "fillfs-populate")]
    service_account: String,
    /// CSI driver that mounts buckets in fill pods.
    #[arg(long, default_value = "csi.fillfs.io")]
    csi_driver: String,
    /// Fill attempts per PVC before a failure is final (exit code 2 is final at once).
    #[arg(long, default_value_t = 5)]
    max_attempts: u32,
    /// Delay before the first retry; it doubles with each failed attempt.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_retry_delay)]
    retry_delay: Duration,
    /// How often a running fill's progress is read.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_poll)]
    poll: Duration,
    /// A fill pod still running after this long is stopped (its activeDeadlineSeconds) and
    /// counts as a failed attempt; a populator's spec.generic.activeDeadlineSeconds wins.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_fill_deadline)]
    fill_deadline: Duration,
    /// Address of /metrics and /healthz; "none" to disable.
    #[arg(long, default_value = "0.0.0.0:9090")]
    metrics_addr: String,
}

#[derive(Args)]
#[command(
    long_about = "Runs the CSI v1 Identity and Node services on a unix socket, as kubelet expects of a node plugin \
                  (deploy/ has the CSIDriver and DaemonSet). Volumes are CSI ephemeral inline volumes or static PVs \
                  whose volumeAttributes name the source: url (s3:// or oss://; file:// is refused) or bucket + path + protocol, \
                  plus endpoint, region, throughput (MiB/s), metadataTTL, and roleArn + oidcProviderArn for RRSA. \
                  Access keys come from the node-publish secret (akId / akSecret), never from this process.\n\n\
                  Mounts left by a previous run are cleared at start; pods using them must be restarted."
)]
struct CsiArgs {
    /// gRPC endpoint: unix:///PATH (kubelet's plugin socket).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// The CSI driver name (the CSIDriver object's name; the controller's --csi-driver).
    #[arg(long, default_value = fillfs::csi::DRIVER_NAME)]
    driver_name: String,
    /// Serve Prometheus metrics at http://ADDR/metrics (with /healthz): per volume and pod
    /// the store requests and bytes, read latency and volume-cap waits; for the node the
    /// shared cache's hits, misses and evictions and the node cap's waits. Default: none.
    #[arg(long, value_name = "ADDR", default_value = "none", value_parser = parse_metrics_addr)]
    metrics_addr: String,
    /// This node's name, as Kubernetes knows it.
    #[arg(long, env = "NODE_NAME")]
    node_id: String,
    /// MiB/s for the sum of all volumes' reads on this node (each volume's `throughput`
    /// applies within it). 0 = unlimited.
    #[arg(long, value_name = "MIB_PER_S", default_value_t = 0.0, value_parser = parse_throughput)]
    node_throughput: f64,
    /// Memory for cached and read-ahead data, shared by all volumes of the node.
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_size)]
    cache_size: u64,
    /// Size of a cached block and of one ranged GET.
    #[arg(long, value_name = "SIZE", default_value = "4MiB", value_parser = parse_block_size)]
    block_size: u64,
    /// How long directory listings are trusted, unless a volume sets metadataTTL.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = options::ttl)]
    metadata_ttl: Duration,
    /// FUSE request threads per volume.
    #[arg(long, default_value_t = 4, value_parser = parse_fuse_threads)]
    fuse_threads: usize,
    /// Kernel read-ahead per volume (0 = kernel default).
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_read_ahead)]
    kernel_read_ahead: u64,
    /// kubelet's root directory: volumes are only published below it, and stale fillfs
    /// mounts under it are cleared at start.
    #[arg(long, default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
    /// Private state (RRSA token files, mode 0600). A tmpfs is best.
    #[arg(long, default_value = "/run/fillfs-csi")]
    state_dir: PathBuf,
}

#[derive(Args)]
struct StoreArgs {
    /// Endpoint URL, e.g. http://127.0.0.1:9000 or oss-cn-hangzhou-internal.aliyuncs.com
    /// (https:// is assumed when no scheme is given). Default: the provider's public endpoint.
    #[arg(long, env = "FILLFS_ENDPOINT")]
    endpoint: Option<String>,
    /// Region, e.g. us-east-1 or cn-hangzhou (oss:// derives its endpoint from it).
    #[arg(long, env = "FILLFS_REGION")]
    region: Option<String>,
    /// Attempts for a transient store error (5xx, reset, timeout), with exponential backoff
    /// and jitter, before the read fails.
    #[arg(long, default_value_t = 5, value_parser = parse_retries)]
    retries: usize,
    /// Send requests unsigned, for public-read buckets: no credentials are looked up.
    #[arg(long)]
    no_sign_request: bool,
}

impl StoreArgs {
    fn config(self, source: &str) -> Result<StoreConfig> {
        let url = SourceUrl::from_arg(source)?;
        let mut cfg = StoreConfig::new(url, self.endpoint, self.region);
        cfg.max_retries = self.retries;
        if self.no_sign_request {
            cfg.credentials = Default::default();
            cfg.ambient_credentials = false;
        }
        Ok(cfg)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Writeback {
    Early,
    Kernel,
}

#[derive(Args)]
struct PopulateArgs {
    /// What to copy: s3://BUCKET/PREFIX, oss://BUCKET/PREFIX, file:///DIR or a local directory.
    source: String,
    /// Directory to fill (created if missing; its parent must exist).
    target: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// Cap on bytes read from the store, MiB/s. 0 = unlimited.
    #[arg(long, value_name = "MIB_PER_S", default_value_t = 0.0, value_parser = parse_throughput)]
    throughput: f64,
    /// GETs in flight. Small files need many to hide first-byte latency (256 keeps a store
    /// with ~20 ms latency busy); large ranges are bounded by --memory as well.
    #[arg(long, default_value_t = 256, value_parser = parse_jobs)]
    jobs: usize,
    /// Large files are fetched in ranges of this size, concurrently.
    #[arg(long, value_name = "SIZE", default_value = "8MiB", value_parser = parse_part_size)]
    part_size: u64,
    /// Most data held in memory between fetch and write.
    #[arg(long, value_name = "SIZE", default_value = "512MiB", value_parser = parse_size)]
    memory: u64,
    /// Re-read every written file and check it against the store's checksum.
    #[arg(long)]
    verify: bool,
    /// Flush the target file system (syncfs) before reporting success. Unmounting the
    /// volume flushes it too, which is what happens after a fill in Kubernetes.
    #[arg(long)]
    fsync: bool,
    /// When written data goes to the device: `early` starts each range's device write as
    /// soon as it is written, so the flush at the end (unmount, --fsync) has little left;
    /// `kernel` leaves it to the kernel's dirty-page writeback.
    #[arg(long, value_enum, default_value_t = Writeback::Early)]
    writeback: Writeback,
    /// Progress display: a bar on a terminal, JSON lines on stdout for machines, or none.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
    /// Owner uid of written files and directories. Default: the caller.
    #[arg(long)]
    uid: Option<u32>,
    /// Owner gid of written files and directories. Default: the caller's group.
    #[arg(long)]
    gid: Option<u32>,
    /// Mode of created directories, in octal (e.g. 775, 2775, 1777). When given, TARGET
    /// itself gets it too (and --uid/--gid), so a volume's root is writable as asked.
    /// Default: 755, TARGET left as it is.
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    dir_mode: Option<u32>,
    /// Mode of written files, in octal (e.g. 644, 664).
    #[arg(long, value_name = "OCTAL", default_value = "644", value_parser = parse_mode)]
    file_mode: u32,
    /// TARGET is a block device or image file: write the single object SOURCE names into it
    /// raw (disk images).
    #[arg(long, conflicts_with = "mkfs")]
    block: bool,
    /// Format TARGET (a block device or image file) with this file system, mount it on a
    /// temporary directory and fill it from the prefix SOURCE. Destroys what TARGET held.
    #[arg(long, value_name = "FS", value_parser = ["ext4"])]
    mkfs: Option<String>,
    /// Copy what can be copied when some keys cannot be written safely (`..`, `//`,
    /// absolute keys); without it such keys abort the fill before anything is written.
    #[arg(long)]
    skip_invalid_keys: bool,
    /// Succeed with an empty volume when nothing is stored under SOURCE. Without it an
    /// empty prefix is refused (exit 2) before TARGET is touched: it is usually a typo in
    /// the bucket or prefix, and a fill that copies nothing must not look like one that
    /// worked.
    #[arg(long)]
    allow_empty: bool,
}

#[derive(Args)]
struct MountArgs {
    /// What to mount: s3://BUCKET/PREFIX, oss://BUCKET/PREFIX, file:///DIR or a local directory.
    source: String,
    /// Existing empty directory to mount on.
    mountpoint: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// Cap on bytes read from the store, MiB/s, shared by all files of this mount. 0 = unlimited.
    #[arg(long, value_name = "MIB_PER_S", default_value_t = 0.0, value_parser = parse_throughput)]
    throughput: f64,
    /// All memory for cached and read-ahead data (half each), e.g. 512MiB, 2GiB.
    #[arg(long, value_name = "SIZE", default_value = "512MiB", value_parser = parse_size)]
    cache_size: u64,
    /// Cache block size = size of each ranged GET, e.g. 4MiB.
    #[arg(long, value_name = "SIZE", default_value = "4MiB", value_parser = parse_block_size)]
    block_size: u64,
    /// How long directory listings and attributes are trusted, e.g. 60s, 5m, 0s.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = options::ttl)]
    metadata_ttl: Duration,
    /// Let users other than the mounting one access the mount (FUSE allow_other).
    #[arg(long)]
    allow_other: bool,
    /// Owner uid of all files. Default: the mounting user.
    #[arg(long)]
    uid: Option<u32>,
    /// Owner gid of all files. Default: the mounting user's group.
    #[arg(long)]
    gid: Option<u32>,
    /// Kernel read-ahead per file (how far the kernel reads ahead of a sequential reader,
    /// in FUSE requests of up to 1 MiB). Needs root; 0 keeps the kernel's 128 KiB.
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_read_ahead)]
    kernel_read_ahead: u64,
    /// FUSE request threads.
    #[arg(long, default_value_t = 4, value_parser = parse_fuse_threads)]
    fuse_threads: usize,
    /// Serve Prometheus metrics (`fillfs_*`: store requests and bytes, cache hits, misses
    /// and evictions, read latency, limiter waits) at http://ADDR/metrics, e.g.
    /// 127.0.0.1:9810. Default: none.
    #[arg(long, value_name = "ADDR", default_value = "none", value_parser = parse_metrics_addr)]
    metrics_addr: String,
    /// Mount even if nothing is stored under the source yet. Without it an empty prefix
    /// is refused, since it is usually a typo in the bucket or prefix.
    #[arg(long)]
    allow_empty: bool,
    /// Return once the mount is ready and keep serving in the background (like mount-s3).
    /// The exit code says whether it mounted (2: a permanent failure such as a missing
    /// bucket). Once mounted, the background process no longer writes to this command's
    /// stdout/stderr (a pipe or `$(...)` around it ends); its logs go to --log-file.
    /// Without --daemon fillfs stays in the foreground and unmounts on SIGINT/SIGTERM.
    #[arg(long)]
    daemon: bool,
    /// With --daemon: where the background process logs once mounted (appended).
    /// Default: nowhere.
    #[arg(long, value_name = "PATH", requires = "daemon")]
    log_file: Option<PathBuf>,
}

// Every number's bounds live in `fillfs::options`; these name the option in its errors.
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    options::size(s)
}

fn parse_block_size(s: &str) -> std::result::Result<u64, String> {
    options::size_in(s, "--block-size", &options::BLOCK_SIZE)
}

fn parse_part_size(s: &str) -> std::result::Result<u64, String> {
    options::size_in(s, "--part-size", &options::PART_SIZE)
}

fn parse_upload_part_size(s: &str) -> std::result::Result<u64, String> {
    options::size_in(s, "--part-size", &options::UPLOAD_PART_SIZE)
}

fn parse_read_ahead(s: &str) -> std::result::Result<u64, String> {
    options::size_in(s, "--kernel-read-ahead", &options::KERNEL_READ_AHEAD)
}

fn parse_mode(s: &str) -> std::result::Result<u32, String> {
    fillfs::controller::crd::parse_mode(s)
        .ok_or_else(|| format!("{s:?} is not an octal mode like 755, 2775 or 1777"))
}

fn parse_throughput(s: &str) -> std::result::Result<f64, String> {
    options::throughput_mib(s)
}

fn parse_retry_delay(s: &str) -> std::result::Result<Duration, String> {
    options::duration_in(s, "--retry-delay", &options::RETRY_DELAY)
}

fn parse_poll(s: &str) -> std::result::Result<Duration, String> {
    options::duration_in(s, "--poll", &options::POLL)
}

fn parse_fill_deadline(s: &str) -> std::result::Result<Duration, String> {
    options::duration_in(s, "--fill-deadline", &options::FILL_DEADLINE)
}

fn parse_jobs(s: &str) -> std::result::Result<usize, String> {
    options::count_in(s, "--jobs", &options::JOBS)
}

/// Checks `--metrics-addr` at parse time (kept as text: clap would take an
/// `Option<SocketAddr>` field for an optional flag).
fn parse_metrics_addr(s: &str) -> std::result::Result<String, String> {
    fillfs::metrics::parse_addr(s).map(|_| s.to_string())
}

fn parse_fuse_threads(s: &str) -> std::result::Result<usize, String> {
    options::count_in(s, "--fuse-threads", &options::FUSE_THREADS)
}

fn parse_retries(s: &str) -> std::result::Result<usize, String> {
    options::count_in(s, "--retries", &options::RETRIES)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        // When a session ends after our own unmount, fuser unmounts once more and warns
        // "Unmount failed: EINVAL" (the path is no longer a mount point): every unpublish
        // and every `fillfs mount` exit. A real unmount failure is ours to report
        // (`MountHandle::try_unmount`, `fuse::mount`), so fuser's is not shown, whatever
        // RUST_LOG says.
        .add_directive("fuser::mnt=error".parse().expect("directive"))
        // reqsign logs a failed STS call with its URL, which carries the pod's OIDC token,
        // and at debug the credential providers with their keys: never, whatever RUST_LOG says.
        .add_directive("reqsign_core=off".parse().expect("directive"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() {
    raise_open_file_limit();
    let cli = Cli::parse();
    // Only the block cache allocates multi-megabyte buffers; a fill holds the network's
    // own chunks, which glibc's arenas recycle without faulting pages in again.
    if !matches!(cli.command, Command::Populate(_)) {
        pin_large_allocations_to_mmap();
    }
    init_logging();
    let result = match cli.command {
        Command::Mount(args) => mount(args),
        Command::Populate(args) => populate(args),
        Command::Csi(args) => csi(args),
        Command::ArgoArtifact(args) => argo_artifact(args),
        Command::Upload(args) => upload(args),
        Command::Controller(args) => controller(args),
        Command::Crd => {
            print!("{}", fillfs::controller::crd_yaml());
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("fillfs: error: {e:#}");
        let permanent = e
            .downcast_ref::<fillfs::Error>()
            .is_some_and(fillfs::Error::is_permanent);
        std::process::exit(if permanent { 2 } else { 1 });
    }
}

fn populate(a: PopulateArgs) -> Result<()> {
    let opts = PopulateOptions {
        store: a.store.config(&a.source)?,
        target: a.target,
        throughput_mib: a.throughput,
        jobs: a.jobs,
        part_size: a.part_size,
        memory: a.memory,
        verify: a.verify,
        progress: a.progress,
        uid: a.uid,
        gid: a.gid,
        file_mode: a.file_mode,
        dir_mode: a.dir_mode.unwrap_or(0o755),
        root_mode: a.dir_mode,
        skip_invalid_keys: a.skip_invalid_keys,
        allow_empty: a.allow_empty,
        shared_limiters: None,
        fsync: a.fsync,
        early_writeback: a.writeback == Writeback::Early,
        target_kind: match (a.block, a.mkfs.is_some()) {
            (_, true) => TargetKind::Ext4,
            (true, false) => TargetKind::Raw,
            (false, false) => TargetKind::Directory,
        },
    };
    let s = fillfs::populate::run(&opts)?;
    eprintln!(
        "fillfs: populated {} files, {} in {:.1} s ({:.1} MiB/s){}{}",
        s.files,
        bytesize::ByteSize(s.bytes).display().iec(),
        s.seconds,
        s.mib_per_s(),
        if s.resumed_files > 0 {
            format!(", {} files kept from an earlier run", s.resumed_files)
        } else {
            String::new()
        },
        if s.skipped_keys > 0 {
            format!(", {} unsafe keys skipped", s.skipped_keys)
        } else {
            String::new()
        },
    );
    if s.files > 0 {
        eprintln!("fillfs: {}", s.checked);
    }
    Ok(())
}

fn upload(a: UploadArgs) -> Result<()> {
    use fillfs::upload::{UploadOptions, run};
    let dest = run::Destination::of(&a.source, &a.url)?;
    let cfg = a.store.config(&dest.store_url)?;
    let opts = UploadOptions {
        part_size: a.part_size,
        jobs: a.jobs,
        memory: a.memory,
        state_dir: Some(a.state_dir.unwrap_or_else(run::default_state_dir)),
        ..UploadOptions::default()
    };
    let s = run::run(
        &cfg,
        &a.source,
        dest.key.as_deref(),
        a.throughput,
        opts,
        a.progress,
    )?;
    eprintln!(
        "fillfs: uploaded {} files, {} in {:.1} s ({:.1} MiB/s){}{}",
        s.files,
        bytesize::ByteSize(s.bytes).display().iec(),
        s.seconds,
        s.mib_per_s(),
        if s.parts_resumed > 0 {
            format!(
                ", {} parts ({}) kept from an earlier run",
                s.parts_resumed,
                bytesize::ByteSize(s.bytes_resumed).display().iec()
            )
        } else {
            String::new()
        },
        if s.parts_retried > 0 {
            format!(", {} parts sent again", s.parts_retried)
        } else {
            String::new()
        },
    );
    if s.files > 0 {
        eprintln!("fillfs: {}", s.checked);
    }
    Ok(())
}

fn mount(a: MountArgs) -> Result<()> {
    let opts = MountOptions {
        store: a.store.config(&a.source)?,
        mountpoint: a.mountpoint,
        throughput_mib: a.throughput,
        cache_size: a.cache_size,
        block_size: a.block_size,
        metadata_ttl: a.metadata_ttl,
        allow_other: a.allow_other,
        uid: a.uid.unwrap_or_else(|| nix::unistd::getuid().as_raw()),
        gid: a.gid.unwrap_or_else(|| nix::unistd::getgid().as_raw()),
        fuse_threads: a.fuse_threads,
        kernel_read_ahead: a.kernel_read_ahead,
        allow_empty: a.allow_empty,
        metrics_addr: fillfs::metrics::parse_addr(&a.metrics_addr).map_err(anyhow::Error::msg)?,
    };
    fillfs::mount::split_cache_size(opts.cache_size, opts.block_size)?;
    if a.daemon {
        return daemonize_and_mount(&opts, a.log_file.as_deref());
    }
    fillfs::mount::run(&opts, || {})?;
    Ok(())
}

fn controller(a: ControllerArgs) -> Result<()> {
    let metrics_addr = match a.metrics_addr.as_str() {
        "none" | "" => None,
        s => Some(s.parse().with_context(|| format!("--metrics-addr {s:?}"))?),
    };
    let opts = fillfs::controller::ControllerOptions {
        settings: fillfs::controller::Settings {
            namespace: a.namespace,
            image: a.image,
            service_account: a.service_account,
            csi_driver: a.csi_driver,
            fill_deadline: a.fill_deadline.max(Duration::from_secs(60)),
        },
        max_attempts: a.max_attempts.max(1),
        retry_base: a.retry_delay,
        poll: a.poll,
        metrics_addr,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(fillfs::controller::run(opts))
        .context("the controller stopped")?;
    Ok(())
}

fn csi(a: CsiArgs) -> Result<()> {
    if a.node_id.is_empty() {
        bail!("--node-id (or NODE_NAME) must not be empty");
    }
    forget_ambient_credentials();
    let opts = fillfs::csi::CsiOptions {
        endpoint: a.endpoint,
        driver_name: a.driver_name,
        metrics_addr: fillfs::metrics::parse_addr(&a.metrics_addr).map_err(anyhow::Error::msg)?,
        node: fillfs::csi::NodeOptions {
            kubelet_dir: a.kubelet_dir,
            node_id: a.node_id,
            node_throughput_mib: a.node_throughput,
            cache_size: a.cache_size,
            block_size: a.block_size,
            metadata_ttl: a.metadata_ttl,
            fuse_threads: a.fuse_threads,
            kernel_read_ahead: a.kernel_read_ahead,
            state_dir: a.state_dir,
        },
    };
    fillfs::mount::split_cache_size(opts.node.cache_size, opts.node.block_size)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fillfs-csi")
        .build()?;
    rt.block_on(fillfs::csi::serve(opts, || {}, shutdown_signal()))?;
    // Mounts stay until this process exits (see fillfs::csi::serve); exit now.
    std::process::exit(0);
}

fn argo_artifact(a: ArgoArtifactArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fillfs-argo")
        .build()?;
    let metrics_addr = fillfs::metrics::parse_addr(&a.metrics_addr).map_err(anyhow::Error::msg)?;
    rt.block_on(fillfs::artifact::service::serve(
        &a.socket,
        metrics_addr,
        shutdown_signal(),
    ))?;
    Ok(())
}

/// The node plugin must never sign a user's volume with its own identity: cloud
/// credentials in its environment are dropped before anything can read them.
fn forget_ambient_credentials() {
    const CREDENTIAL_VARS: &[&str] = &[
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "ALIBABA_CLOUD_ACCESS_KEY_ID",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
        "ALIBABA_CLOUD_SECURITY_TOKEN",
        "ALIBABA_CLOUD_ROLE_ARN",
        "ALIBABA_CLOUD_OIDC_PROVIDER_ARN",
        "ALIBABA_CLOUD_OIDC_TOKEN_FILE",
    ];
    let names: Vec<&str> = CREDENTIAL_VARS
        .iter()
        .copied()
        .filter(|k| std::env::var_os(k).is_some())
        .collect();
    for k in &names {
        // SAFETY: called before the runtime starts; no other thread reads the environment.
        unsafe { std::env::remove_var(k) };
    }
    if !names.is_empty() {
        tracing::warn!(variables = ?names, "ignoring cloud credentials in the plugin's environment; volumes bring their own");
    }
}

async fn shutdown_signal() {
    fillfs::fuse::wait_for_shutdown_signal().await;
    tracing::info!("signal received, stopping");
}

/// Forks before any thread exists; the child mounts and reports "ok" or the error through a
/// pipe; the parent waits for that word and exits with it.
/// `--daemon`: a child mounts and serves; the parent returns once the mount is ready, with
/// the child's error and exit code (2 for permanent failures) if it is not. When the mount
/// is ready the child lets go of the caller's stdout and stderr (they go to `--log-file`,
/// or /dev/null), so a `| tee` or `$(…)` around the command ends with it.
fn daemonize_and_mount(opts: &MountOptions, log_file: Option<&std::path::Path>) -> Result<()> {
    // Opened before forking: a bad path is the caller's error, not a silent child's.
    let log = match log_file {
        Some(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("--log-file {}", p.display()))?,
        None => std::fs::File::options()
            .write(true)
            .open("/dev/null")
            .context("opening /dev/null")?,
    };
    // Above stdio and close-on-exec: with a closed stdout or stderr the pipe or the log
    // would take fd 1 or 2, and the dup2 of the log onto them would cut the pipe.
    let log = above_stdio(log.into())?;
    let (rx, tx) = nix::unistd::pipe().context("creating a pipe")?;
    let (rx, tx) = (above_stdio(rx)?, above_stdio(tx)?);
    // SAFETY: no threads have been started yet (no runtime exists before this point).
    match unsafe { nix::unistd::fork() }.context("fork")? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(tx);
            let mut msg = String::new();
            std::fs::File::from(rx)
                .read_to_string(&mut msg)
                .context("waiting for the mount")?;
            if msg.starts_with("ok") {
                return Ok(());
            }
            if msg.is_empty() {
                bail!("the background process exited before mounting");
            }
            // "CODE message": the child's exit code, then its error.
            let (code, text) = msg.split_once(' ').unwrap_or(("1", &msg));
            eprintln!("fillfs: error: {}", text.trim_end());
            std::process::exit(code.parse().unwrap_or(1));
        }
        nix::unistd::ForkResult::Child => {
            drop(rx);
            let _ = nix::unistd::setsid();
            redirect_stdin_to_null();
            let mut tx = Some(std::fs::File::from(tx));
            let result = fillfs::mount::run(opts, || {
                let _ = nix::unistd::dup2_stdout(&log);
                let _ = nix::unistd::dup2_stderr(&log);
                if let Some(mut t) = tx.take() {
                    let _ = t.write_all(b"ok\n");
                }
            });
            match result {
                Ok(()) => std::process::exit(0),
                Err(e) => {
                    tracing::error!(error = %e, "mount ended with an error");
                    let code = if e.is_permanent() { 2 } else { 1 };
                    if let Some(mut t) = tx.take() {
                        let _ = write!(t, "{code} {e}");
                    }
                    std::process::exit(code);
                }
            }
        }
    }
}

/// `fd` moved to a number above 2, close-on-exec.
fn above_stdio(fd: std::os::fd::OwnedFd) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let raw = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))
        .context("moving a file descriptor above stdio")?;
    // SAFETY: `raw` was just created by F_DUPFD_CLOEXEC and is owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
}

/// Data blocks are megabytes, allocated and freed at a high rate. glibc raises its mmap
/// threshold after such frees and then serves blocks from arenas it never returns, which
/// let RSS drift far above `--cache-size`. A fixed threshold keeps every block in its own
/// mapping, returned to the kernel when the block is dropped.
fn pin_large_allocations_to_mmap() {
    // SAFETY: mallopt only changes allocator parameters; called before any thread exists
    // (argument parsing starts none).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Hundreds of transfers in flight each hold a socket and a file: lift the soft limit on
/// open files to the hard limit (commonly 1024 → 524288).
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn redirect_stdin_to_null() {
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(&null);
    }
}
