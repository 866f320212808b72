//! The plugin's `configuration` string (`artifactRepository.plugin.configuration` or an
//! artifact's `plugin.configuration`), YAML or JSON: where artifacts live and how they are
//! moved. Parsed into a [`PluginConfig`] with every number bounded (`options.rs`) and a
//! clear error for anything else; never a panic.
//!
//! ```yaml
//! bucket: my-bucket          # required
//! protocol: oss              # oss (default) or s3
//! endpoint: oss-cn-hangzhou-internal.aliyuncs.com   # or region:
//! region: cn-hangzhou
//! throughput: 200            # MiB/s for this plugin's store traffic, 0 = unlimited
//! partSize: 16MiB            # multipart part size (grown so a file needs ≤ 10,000 parts)
//! jobs: 16                   # parts / ranges in flight
//! stateDir: /tmp/fillfs-uploads   # upload checkpoints (resuming after a crash)
//! secretDir: /etc/fillfs     # optional: a mounted Secret whose file names are the
//!                            # credential variables (ALIBABA_CLOUD_ACCESS_KEY_ID, ...)
//! ```
//! Credentials otherwise come from the environment, as everywhere in fillfs (AK/SK
//! variables, or RRSA's role, provider and token file). It must not do I/O beyond reading
//! `secretDir`.

use std::path::PathBuf;

use serde::Deserialize;

use crate::options;
use crate::store::credentials::Credentials;
use crate::store::{Scheme, SourceUrl, StoreConfig};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Raw {
    bucket: String,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    throughput: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    part_size: Option<String>,
    #[serde(default)]
    jobs: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    secret_dir: Option<PathBuf>,
    #[serde(default)]
    state_dir: Option<PathBuf>,
}

/// A parsed configuration.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// The bucket's root: artifact keys are relative to it.
    pub store: StoreConfig,
    pub throughput_mib: f64,
    pub part_size: u64,
    pub jobs: usize,
    /// Where upload checkpoints are kept (default: `$TMPDIR/fillfs-uploads`). Resuming
    /// also works without them: the key's open uploads are found in the store.
    pub state_dir: PathBuf,
}

impl PluginConfig {
    /// Parses `text` (YAML, of which JSON is a subset).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Err("the plugin configuration is empty; it needs at least `bucket:`".into());
        }
        let raw: Raw = serde_yaml_ng::from_str(text)
            .map_err(|e| format!("the plugin configuration is not valid: {e}"))?;
        let scheme = match raw.protocol.as_deref().unwrap_or("oss") {
            "oss" => Scheme::Oss,
            "s3" => Scheme::S3,
            other => return Err(format!("protocol {other:?} is not oss or s3")),
        };
        let bucket = raw.bucket.trim();
        let url = format!(
            "{}://{bucket}/",
            if scheme == Scheme::Oss { "oss" } else { "s3" }
        );
        let source = SourceUrl::parse(&url).map_err(|e| e.to_string())?;
        if !source.prefix.is_empty() || source.bucket != bucket {
            return Err(format!("bucket {bucket:?} is not a bucket name"));
        }
        let mut store = StoreConfig::new(source, raw.endpoint, raw.region);
        if let Some(dir) = &raw.secret_dir {
            if !dir.is_dir() {
                return Err(format!("secretDir {} is not a directory", dir.display()));
            }
            store.credentials = Credentials::from_lookup(scheme, |k| {
                std::fs::read_to_string(dir.join(k))
                    .ok()
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
            });
        }
        let throughput_mib = match raw.throughput {
            None => 0.0,
            Some(v) => {
                options::throughput_mib(&scalar(&v)).map_err(|e| format!("throughput: {e}"))?
            }
        };
        let part_size = match raw.part_size {
            None => 16 * 1024 * 1024,
            Some(s) => options::size_in(&s, "partSize", &options::UPLOAD_PART_SIZE)?,
        };
        let jobs = match raw.jobs {
            None => 16,
            Some(v) => options::count_in(&scalar(&v), "jobs", &(1..=256))?,
        };
        Ok(PluginConfig {
            store,
            throughput_mib,
            part_size,
            jobs,
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| std::env::temp_dir().join("fillfs-uploads")),
        })
    }

    /// How the plugin's uploads run.
    pub fn upload_options(&self) -> crate::upload::UploadOptions {
        crate::upload::UploadOptions {
            part_size: self.part_size,
            jobs: self.jobs,
            memory: (self.part_size * 2).max(256 * 1024 * 1024),
            state_dir: Some(self.state_dir.clone()),
            ..Default::default()
        }
    }
}

fn scalar(v: &serde_yaml_ng::Value) -> String {
    match v {
        serde_yaml_ng::Value::String(s) => s.clone(),
        serde_yaml_ng::Value::Number(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_and_json_give_the_same_config() {
        let y = PluginConfig::parse(
            "bucket: bkt\nprotocol: s3\nendpoint: http://127.0.0.1:9000\nthroughput: 20\npartSize: 8MiB\njobs: 4\n",
        )
        .unwrap();
        let j = PluginConfig::parse(
            r#"{"bucket":"bkt","protocol":"s3","endpoint":"http://127.0.0.1:9000","throughput":"20","partSize":"8MiB","jobs":4}"#,
        )
        .unwrap();
        for c in [&y, &j] {
            assert_eq!(c.store.source.bucket, "bkt");
            assert_eq!(c.store.source.scheme, Scheme::S3);
            assert_eq!(c.throughput_mib, 20.0);
            assert_eq!(c.part_size, 8 * 1024 * 1024);
            assert_eq!(c.jobs, 4);
        }
        let d = PluginConfig::parse("bucket: bkt\nregion: cn-hangzhou").unwrap();
        assert_eq!(d.store.source.scheme, Scheme::Oss, "oss is the default");
    }

    #[test]
    fn bad_configurations_say_what_is_wrong() {
        for (text, says) in [
            ("", "empty"),
            ("bucket: [", "not valid"),
            ("protocol: s3", "bucket"),
            ("bucket: bkt\nprotocl: s3", "protocl"),
            ("bucket: bkt\nprotocol: gcs", "not oss or s3"),
            ("bucket: bkt/c", "not a bucket name"),
            ("bucket: bkt\nthroughput: 1e-9", "throughput"),
            ("bucket: bkt\npartSize: 1KiB", "partSize"),
            ("bucket: bkt\njobs: 0", "jobs"),
            ("bucket: bkt\nsecretDir: /nonexistent/fillfs", "secretDir"),
        ] {
            let e = PluginConfig::parse(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn upload_options_follow_the_configuration() {
        let c = PluginConfig::parse("bucket: bkt\npartSize: 8MiB\njobs: 3\nstateDir: /s").unwrap();
        let o = c.upload_options();
        assert_eq!((o.part_size, o.jobs), (8 << 20, 3));
        assert_eq!(o.state_dir.as_deref(), Some(std::path::Path::new("/s")));
        assert!(PluginConfig::parse("bucket: bkt\npartSize: 1MiB").is_err());
    }
}
