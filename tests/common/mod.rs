//! Test harness: a loopback S3 server (the `s3emu` emulator, a real S3 protocol server over
//! HTTP), `fillfs mount` run as a real process on a real FUSE mount, and deterministic data.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use s3emu::{Config as EmuConfig, Emulator};

pub const ACCESS_KEY: &str = "fillfs-test";
pub const SECRET_KEY: &str = "fillfs-test-secret-key";
pub const BUCKET: &str = "test-bucket";

/// FUSE tests need /dev/fuse and root. Off such a machine they skip with a message; in CI
/// (CI=true) a missing FUSE is a failure, never a silent skip.
pub fn fuse_available() -> bool {
    let ok = Path::new("/dev/fuse").exists() && nix::unistd::geteuid().is_root();
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "CI=true but /dev/fuse is missing or we are not root: FUSE tests must run in CI"
            );
        }
        eprintln!("SKIPPED: FUSE tests need /dev/fuse and root");
    }
    ok
}

/// Starts the emulator with one bucket.
pub fn emulator() -> Emulator {
    let cfg = EmuConfig {
        access_key: ACCESS_KEY.into(),
        secret_key: SECRET_KEY.into(),
        ..EmuConfig::default()
    };
    let emu = Emulator::start(cfg).expect("start s3emu");
    emu.create_bucket(BUCKET);
    emu
}

/// Starts the emulator with one bucket, keeping big parts and objects in memory-mapped
/// files under `dir` (objects over 5 GiB without the RAM).
pub fn emulator_spilling(dir: &Path) -> Emulator {
    let cfg = EmuConfig {
        access_key: ACCESS_KEY.into(),
        secret_key: SECRET_KEY.into(),
        spill_dir: Some(dir.to_path_buf()),
        ..EmuConfig::default()
    };
    let emu = Emulator::start(cfg).expect("start s3emu");
    emu.create_bucket(BUCKET);
    emu
}

/// Deterministic, position-dependent content: byte `i` of object `seed` is a function of
/// (seed, i), so any misplaced or duplicated block is detected.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    let mut word = offset / 8;
    let skip = (offset % 8) as usize;
    while out.len() < len + skip {
        out.extend_from_slice(
            &splitmix(seed ^ word.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes(),
        );
        word += 1;
    }
    out.drain(..skip);
    out.truncate(len);
    out
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A running `fillfs mount`, unmounted (SIGTERM, then lazy umount) on drop.
pub struct Mount {
    pub dir: tempfile::TempDir,
    pub child: Child,
    log: PathBuf,
}

impl Mount {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the mount process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Peak resident set size of the mount process, in bytes (VmHWM).
    pub fn peak_rss(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:") * 1024
    }

    /// Stops the process with SIGTERM and waits for the unmount; returns its exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate()
    }

    /// [`stop`](Self::stop), and everything the process logged.
    pub fn stop_and_log(mut self) -> (std::process::ExitStatus, String) {
        let status = self.terminate();
        (status, self.log())
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(self.dir.path())
                    .status();
                return self.child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
        if is_mounted(self.dir.path()) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Whether something is mounted at `path`, from the mount table (fillfs's own parser).
/// Only the parent is resolved: a stat of the mount point itself would wait on a mount
/// that does not answer.
pub fn is_mounted(path: &Path) -> bool {
    let canon = match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => parent
            .canonicalize()
            .map(|p| p.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    };
    fillfs::mountinfo::table()
        .iter()
        .any(|m| m.mount_point == canon)
}

pub fn fillfs() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fillfs"));
    c.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN");
    c.env("RUST_LOG", "fillfs=debug,info");
    c
}

/// [`fillfs`], or the build `FILLFS_BIN` names: runs a test against another build, e.g. the
/// one before a fix, to see the test fail there.
pub fn fillfs_under_test() -> Command {
    let Some(bin) = std::env::var_os("FILLFS_BIN") else {
        return fillfs();
    };
    let mut c = Command::new(bin);
    c.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN");
    c.env("RUST_LOG", "fillfs=debug,info");
    c
}

/// `fillfs mount s3://BUCKET/prefix` against the emulator, with extra arguments; waits until
/// the mount is live.
pub fn mount_s3(emu: &Emulator, prefix: &str, extra: &[&str]) -> Mount {
    let mut cmd = fillfs();
    cmd.arg("mount")
        .arg(format!("s3://{BUCKET}/{prefix}"))
        .arg("--endpoint")
        .arg(emu.endpoint())
        .arg("--region")
        .arg("us-east-1")
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .args(extra);
    spawn_mount(cmd)
}

/// Runs `cmd` (a `fillfs mount ... ` without the mountpoint) in the foreground and waits
/// until the mountpoint is live.
pub fn spawn_mount(mut cmd: Command) -> Mount {
    let dir = tempfile::tempdir().expect("mountpoint");
    let log = dir.path().with_extension("log");
    let log_file = std::fs::File::create(&log).expect("log file");
    cmd.arg(dir.path()).stdout(Stdio::null()).stderr(log_file);
    let mut child = cmd.spawn().expect("spawn fillfs");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(dir.path()) {
        if let Some(status) = child.try_wait().expect("wait") {
            panic!(
                "fillfs exited with {status} before mounting:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "mount did not appear in 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    Mount { dir, child, log }
}

/// Reads a whole file in 1 MiB reads.
pub fn read_all(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Streams a file, checking it chunk by chunk against `pattern(seed, ..)`; returns bytes read.
pub fn verify_stream(path: &Path, seed: u64, size: u64) -> u64 {
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {} at {pos}: {e}", path.display()));
        if n == 0 {
            break;
        }
        assert!(
            buf[..n] == pattern(seed, pos, n)[..],
            "{}: wrong bytes in [{pos}, {})",
            path.display(),
            pos + n as u64
        );
        pos += n as u64;
    }
    assert_eq!(pos, size, "{}: size", path.display());
    pos
}

/// A gRPC channel over the unix socket at `path` (one attempt), as kubelet's CSI client and
/// Argo's plugin client connect (gRPC Go: `:authority` is `localhost`).
pub fn unix_channel(
    rt: &tokio::runtime::Runtime,
    path: &Path,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    rt.block_on(async move {
        tonic::transport::Endpoint::try_from("http://localhost")
            .expect("static URI")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
    })
}

/// An HTTP server on loopback that answers every request with `200 OK` and an HTML page,
/// as a captive portal or a web server on the wrong port does. Returns its endpoint URL;
/// it serves until the test process ends.
pub fn html_server() -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                // The request head; a body (none here) is not read.
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if line == "\r\n" {
                        let page = "<!DOCTYPE html><html><head><title>Sign in</title></head><body>Welcome</body></html>";
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\r\n{page}",
                            page.len()
                        );
                    }
                    line.clear();
                }
            });
        }
    });
    format!("http://{addr}")
}

/// A loopback address with a port nobody listens on (bound and released).
pub fn free_local_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().unwrap().to_string()
}

/// `GET path` on `addr` over plain HTTP/1.0; the body.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// The value of the sample `name{labels}` (exactly as written) in a Prometheus text page.
pub fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        let (s, v) = l.rsplit_once(' ')?;
        (s == series).then(|| v.parse().ok())?
    })
}
