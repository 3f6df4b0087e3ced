//! Checkpoints by Hugging Face repo id (cargo feature `hub`): the files a BLIP-2 checkpoint
//! needs are looked up in the local Hugging Face cache first and downloaded into it otherwise,
//! in the cache layout that `huggingface_hub` (Python) uses and reads, so both share one cache.
//!
//! Environment, as in `huggingface_hub`: `HF_ENDPOINT` (default `https://huggingface.co`),
//! `HF_HUB_CACHE` or `HF_HOME` (cache `$HF_HOME/hub`, default `~/.cache/huggingface/hub`),
//! `HF_TOKEN` or the token file `$HF_HOME/token` (gated and private repos), and `HF_HUB_OFFLINE=1`
//! (the cache only, no request at all).
//!
//! Without a network a checkpoint that is fully in the cache still resolves: cached files are
//! never checked against the hub again (like `huggingface_hub` with `HF_HUB_OFFLINE=1`).

use std::path::{Component, Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};
use crate::repo_id::is_repo_id;

/// Files every checkpoint must have (the weights are handled apart).
const REQUIRED: &[&str] = &["config.json", "tokenizer.json", "tokenizer_config.json"];
/// Files used when the repo has them.
const OPTIONAL: &[&str] = &[
    "special_tokens_map.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
];
const WEIGHT_INDEX: &str = "model.safetensors.index.json";
const SINGLE_WEIGHTS: &str = "model.safetensors";
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const DEFAULT_REVISION: &str = "main";
/// Retries (resuming where the transfer stopped) of a file whose download broke off.
const RETRIES: usize = 3;

/// Downloads (or finds in the local HF cache) the files of a BLIP-2 checkpoint: config.json,
/// model.safetensors or model.safetensors.index.json plus every shard it names, tokenizer.json,
/// tokenizer_config.json, special_tokens_map.json / generation_config.json /
/// preprocessor_config.json / processor_config.json when present; returns the snapshot
/// directory. Progress bars on stderr.
pub fn download(repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let settings = Settings::from_env().map_err(|message| Error::Hub {
        repo: repo_id.to_string(),
        message,
    })?;
    download_with(repo_id, revision, &settings)
}

/// True when `s` looks like a repo id ("owner/name") rather than a path that exists.
pub use crate::repo_id::looks_like_repo_id;

/// Where and how to reach the hub; [`Settings::from_env`] reads what `huggingface_hub` reads.
#[derive(Debug, Clone)]
struct Settings {
    endpoint: String,
    /// The hub cache (`.../huggingface/hub`, holding `models--owner--name`).
    cache_dir: PathBuf,
    token: Option<String>,
    /// Cache only: never a request.
    offline: bool,
    progress: bool,
}

impl Settings {
    fn from_env() -> std::result::Result<Self, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let hf_home = match var("HF_HOME") {
            Some(home) => Some(PathBuf::from(home)),
            None => var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| {
                    var("HOME")
                        .or_else(|| var("USERPROFILE"))
                        .map(|home| Path::new(&home).join(".cache"))
                })
                .map(|cache| cache.join("huggingface")),
        };
        let cache_dir = match var("HF_HUB_CACHE") {
            Some(dir) => PathBuf::from(dir),
            None => hf_home
                .as_ref()
                .map(|home| home.join("hub"))
                .ok_or("no Hugging Face cache directory (set HF_HOME)")?,
        };
        let token = var("HF_TOKEN").or_else(|| {
            let file = var("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .or_else(|| hf_home.as_ref().map(|home| home.join("token")))?;
            std::fs::read_to_string(file)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "on" | "yes" | "true"
            )
        });
        Ok(Settings {
            endpoint: var("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_string())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            cache_dir,
            token: token.map(|t| t.trim().to_string()),
            offline,
            progress: true,
        })
    }
}

fn download_with(repo_id: &str, revision: Option<&str>, settings: &Settings) -> Result<PathBuf> {
    let fail = |message: String| Error::Hub {
        repo: repo_id.to_string(),
        message,
    };
    if !is_repo_id(repo_id) {
        return Err(fail(
            "not a Hugging Face repo id (expected owner/name)".to_string(),
        ));
    }
    let revision = revision.unwrap_or(DEFAULT_REVISION);
    if revision.is_empty() || !relative_normal(revision) {
        return Err(fail(format!("invalid revision {revision:?}")));
    }
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let api = ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
        .with_endpoint(settings.endpoint.clone())
        .with_token(settings.token.clone())
        .with_progress(settings.progress)
        .with_retries(RETRIES)
        .build()
        .map_err(|e| fail(format!("cannot set up the HTTP client: {e}")))?;
    let mut fetcher = Fetcher {
        repo_id,
        revision,
        repo_dir: settings.cache_dir.join(repo.folder_name()),
        api: api.repo(repo),
        offline: settings.offline,
        downloaded: false,
    };
    // Files found in the cache belong to the snapshot `refs/<revision>` named when they were
    // fetched; a download lands in the snapshot of the hub's current commit (and moves the ref).
    // If the two differ the files are spread over two snapshots: a second pass, with the ref now
    // on the newest commit, takes what that snapshot already has and downloads the rest into it.
    for _ in 0..2 {
        let files = fetcher.checkpoint_files()?;
        let dir = files
            .first()
            .and_then(|f| f.parent())
            .map(Path::to_path_buf)
            .ok_or_else(|| fail("no file resolved".to_string()))?;
        if files.iter().all(|f| f.parent() == Some(dir.as_path())) {
            return Ok(dir);
        }
    }
    Err(fail(
        "the cached files belong to different snapshots and the repo changed during the download; \
         run again"
            .to_string(),
    ))
}

/// Whether a file must be there.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    Required,
    Optional,
    /// `model.safetensors` once the repo has no index: required, and its absence means that
    /// the repo has no safetensors weights at all.
    Weights,
}

struct Fetcher<'a> {
    repo_id: &'a str,
    revision: &'a str,
    /// `<cache>/models--owner--name`.
    repo_dir: PathBuf,
    api: ApiRepo,
    offline: bool,
    /// Some file came over the network in this call (so the hub is reachable).
    downloaded: bool,
}

impl Fetcher<'_> {
    fn fail(&self, message: String) -> Error {
        Error::Hub {
            repo: self.repo_id.to_string(),
            message,
        }
    }

    /// The error for a required file the repo does not have.
    fn missing(&self, name: &str, need: Need) -> Error {
        if need == Need::Weights {
            self.fail(format!(
                "the repo has neither {SINGLE_WEIGHTS} nor {WEIGHT_INDEX} at revision {} \
                 (only safetensors checkpoints load)",
                self.revision
            ))
        } else {
            self.fail(format!(
                "the repo has no {name} at revision {}",
                self.revision
            ))
        }
    }

    /// Every file of the checkpoint, `config.json` first.
    fn checkpoint_files(&mut self) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for name in REQUIRED {
            files.extend(self.fetch(name, Need::Required)?);
        }
        match self.fetch(WEIGHT_INDEX, Need::Optional)? {
            Some(index) => {
                let shards = self.shards(&index)?;
                files.push(index);
                for shard in &shards {
                    files.extend(self.fetch(shard, Need::Required)?);
                }
            }
            None => files.extend(self.fetch(SINGLE_WEIGHTS, Need::Weights)?),
        }
        for name in OPTIONAL {
            files.extend(self.fetch(name, Need::Optional)?);
        }
        Ok(files)
    }

    /// The shard file names of `model.safetensors.index.json`, each once, sorted.
    fn shards(&self, index: &Path) -> Result<Vec<String>> {
        let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
            path: index.to_path_buf(),
            source,
        })?;
        let config = |message: String| Error::Config {
            path: index.to_path_buf(),
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| config(e.to_string()))?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| config("no `weight_map` object".to_string()))?;
        let mut shards = std::collections::BTreeSet::new();
        for shard in map.values() {
            let shard = shard
                .as_str()
                .ok_or_else(|| config(format!("`weight_map` value {shard} is not a file name")))?;
            // The names become paths in the cache: nothing may climb out of the snapshot.
            if !relative_normal(shard) || shard.contains('\\') {
                return Err(config(format!("unsafe shard file name {shard:?}")));
            }
            shards.insert(shard.to_string());
        }
        if shards.is_empty() {
            return Err(config("`weight_map` names no shard".to_string()));
        }
        Ok(shards.into_iter().collect())
    }

    /// The snapshot the cache's ref for the revision points at (a commit hash is its own).
    fn cached_commit(&self) -> Option<String> {
        let from_ref = std::fs::read_to_string(self.repo_dir.join("refs").join(self.revision))
            .ok()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty());
        from_ref.or_else(|| {
            let is_commit =
                self.revision.len() == 40 && self.revision.bytes().all(|b| b.is_ascii_hexdigit());
            is_commit.then(|| self.revision.to_string())
        })
    }

    /// `Some(path)` of the file in the cache, `Some(None)` when the cache records that the repo
    /// has no such file (`.no_exist`, written by huggingface_hub), `None` when the cache does
    /// not know.
    fn cached(&self, name: &str) -> Option<Option<PathBuf>> {
        let commit = self.cached_commit()?;
        if !relative_normal(&commit) {
            return None;
        }
        let file = self.repo_dir.join("snapshots").join(&commit).join(name);
        if file.is_file() {
            return Some(Some(file));
        }
        let absent = self.repo_dir.join(".no_exist").join(&commit).join(name);
        absent.exists().then_some(None)
    }

    /// The local path of `name`: from the cache, or downloaded into it. An optional file the
    /// repo does not have is `None`; so is one that is not cached while the hub is unreachable
    /// and everything so far came from the cache (working offline).
    fn fetch(&mut self, name: &str, need: Need) -> Result<Option<PathBuf>> {
        if let Some(cached) = self.cached(name) {
            return match (cached, need) {
                (Some(path), _) => Ok(Some(path)),
                (None, Need::Optional) => Ok(None),
                (None, _) => Err(self.missing(name, need)),
            };
        }
        if self.offline {
            return match need {
                Need::Optional => Ok(None),
                Need::Required | Need::Weights => Err(self.fail(format!(
                    "{name} is not in the local cache {} and HF_HUB_OFFLINE is set",
                    self.repo_dir.display()
                ))),
            };
        }
        match self.api.download(name) {
            Ok(path) => {
                self.downloaded = true;
                Ok(Some(path))
            }
            Err(error) => match (classify(&error), need) {
                (Failure::NotFound, Need::Optional) => Ok(None),
                (Failure::NotFound, _) => Err(self.missing(name, need)),
                (Failure::Unreachable, Need::Optional) if !self.downloaded => Ok(None),
                (Failure::Unreachable, _) => Err(self.fail(format!(
                    "{name}: {} (no network? pass a local directory with --model)",
                    describe(&error)
                ))),
                (Failure::Denied(code), _) => Err(self.fail(format!(
                    "{name}: HTTP {code}: the repo does not exist, or it is gated or private \
                     (accept its terms on the hub and set HF_TOKEN)"
                ))),
                (Failure::Other, _) => Err(self.fail(format!("{name}: {}", describe(&error)))),
            },
        }
    }
}

/// What a failed download means for the caller.
enum Failure {
    /// HTTP 404: the repo has no such file.
    NotFound,
    /// HTTP 401 / 403.
    Denied(u16),
    /// No answer from the hub (DNS, connection, TLS, broken transfer).
    Unreachable,
    Other,
}

fn classify(error: &ApiError) -> Failure {
    match error {
        ApiError::RequestError(request) => match request.as_ref() {
            ureq::Error::Status(404, _) => Failure::NotFound,
            ureq::Error::Status(code @ (401 | 403), _) => Failure::Denied(*code),
            ureq::Error::Status(..) => Failure::Other,
            ureq::Error::Transport(_) => Failure::Unreachable,
        },
        ApiError::TooManyRetries(inner) => classify(inner),
        _ => Failure::Other,
    }
}

/// The error without hf-hub's wrapping ("request error: ...").
fn describe(error: &ApiError) -> String {
    match error {
        ApiError::RequestError(request) => match request.as_ref() {
            ureq::Error::Status(code, response) => {
                format!("HTTP {code} {}", response.status_text())
            }
            ureq::Error::Transport(transport) => transport.to_string(),
        },
        other => other.to_string(),
    }
}

/// A relative path made only of plain names (no `..`, no root, no `.`).
fn relative_normal(s: &str) -> bool {
    !s.is_empty()
        && Path::new(s)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("blip2-hub-{tag}-{}-{n}", std::process::id()));
            std::fs::remove_dir_all(&dir).ok();
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }

    /// Settings aimed at a closed local port: any request fails at once (connection refused).
    fn closed_port(cache: &Path) -> Settings {
        Settings {
            endpoint: "http://127.0.0.1:9".to_string(),
            cache_dir: cache.to_path_buf(),
            token: None,
            offline: false,
            progress: false,
        }
    }

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    /// Writes `files` into `<cache>/models--owner--name/snapshots/<COMMIT>/` with `refs/main`.
    fn populate(cache: &Path, repo_id: &str, files: &[&str]) -> PathBuf {
        let repo_dir = cache.join(format!("models--{}", repo_id.replace('/', "--")));
        let snapshot = repo_dir.join("snapshots").join(COMMIT);
        std::fs::create_dir_all(&snapshot).unwrap();
        for name in files {
            let path = snapshot.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"{}").unwrap();
        }
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        // huggingface_hub writes the hash without a newline; hf-hub too. Accept one anyway.
        std::fs::write(repo_dir.join("refs").join("main"), format!("{COMMIT}\n")).unwrap();
        snapshot
    }

    /// A minimal stand-in for the hub's `resolve` endpoint on a local port: serves `files` of
    /// `repo_id` at `commit` (ranges, `etag`, `x-repo-commit`, `content-range` as the hub sends
    /// them), 404 for any other file, 401 for any other repo.
    fn mock_hub(repo_id: &str, commit: &str, files: Vec<(&str, Vec<u8>)>) -> String {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let prefix = format!("/{repo_id}/resolve/main/");
        let commit = commit.to_string();
        let files: std::collections::HashMap<String, Vec<u8>> = files
            .into_iter()
            .map(|(name, bytes)| (name.to_string(), bytes))
            .collect();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                reader.read_line(&mut request_line).unwrap();
                let path = request_line.split(' ').nth(1).unwrap_or("").to_string();
                let mut start = 0usize;
                let mut end: Option<usize> = None;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(range) = lower.strip_prefix("range: bytes=") {
                        let (a, b) = range.trim().split_once('-').unwrap();
                        start = a.parse().unwrap();
                        end = b.parse().ok();
                    }
                }
                let reply = match path.strip_prefix(&prefix) {
                    None => b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
                    Some(name) => match files.get(name) {
                        None => b"HTTP/1.1 404 Not Found\r\nx-error-code: EntryNotFound\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
                        Some(bytes) => {
                            let last = end.unwrap_or(bytes.len() - 1).min(bytes.len() - 1);
                            let body = &bytes[start..=last];
                            let etag: u64 = bytes.iter().fold(0xcbf29ce484222325, |h, &b| {
                                (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
                            });
                            let mut reply = format!(
                                "HTTP/1.1 206 Partial Content\r\netag: \"{etag:016x}\"\r\n\
                                 x-repo-commit: {commit}\r\ncontent-range: bytes {start}-{last}/{}\r\n\
                                 content-length: {}\r\nconnection: close\r\n\r\n",
                                bytes.len(),
                                body.len()
                            )
                            .into_bytes();
                            reply.extend_from_slice(body);
                            reply
                        }
                    },
                };
                stream.write_all(&reply).ok();
            }
        });
        endpoint
    }

    #[test]
    fn downloads_into_the_cache_skipping_absent_optional_files() {
        let tmp = TempDir::new("mock");
        let index = serde_json::json!({
            "weight_map": {
                "a": "model-00001-of-00002.safetensors",
                "b": "model-00002-of-00002.safetensors",
            }
        })
        .to_string();
        let files = vec![
            ("config.json", b"{\"model_type\": \"blip-2\"}".to_vec()),
            ("tokenizer.json", b"{\"tok\": 1}".to_vec()),
            ("tokenizer_config.json", b"{\"cfg\": 2}".to_vec()),
            (WEIGHT_INDEX, index.into_bytes()),
            ("model-00001-of-00002.safetensors", vec![1u8; 3000]),
            ("model-00002-of-00002.safetensors", vec![2u8; 5]),
            ("generation_config.json", b"{}".to_vec()),
        ];
        let endpoint = mock_hub("owner/name", COMMIT, files.clone());
        let settings = Settings {
            endpoint,
            ..closed_port(&tmp.0)
        };
        let dir = download_with("owner/name", None, &settings).unwrap();
        let repo_dir = tmp.0.join("models--owner--name");
        assert_eq!(dir, repo_dir.join("snapshots").join(COMMIT));
        for (name, bytes) in &files {
            assert_eq!(&std::fs::read(dir.join(name)).unwrap(), bytes, "{name}");
        }
        for absent in [
            "special_tokens_map.json",
            "preprocessor_config.json",
            "processor_config.json",
            SINGLE_WEIGHTS,
        ] {
            assert!(!dir.join(absent).exists(), "{absent}");
        }
        assert_eq!(
            std::fs::read_to_string(repo_dir.join("refs").join("main")).unwrap(),
            COMMIT
        );
        // The model loader finds the shards the index names.
        assert_eq!(crate::checkpoint::weight_files(&dir).unwrap().len(), 2);

        // Later, with no hub: the cache alone.
        assert_eq!(
            download_with("owner/name", None, &closed_port(&tmp.0)).unwrap(),
            dir
        );
    }

    #[test]
    fn a_stale_partial_cache_ends_in_one_snapshot() {
        let tmp = TempDir::new("stale");
        // An older commit of which only config.json was fetched.
        let old = populate(&tmp.0, "owner/name", &["config.json"]);
        let new_commit = "1111111111111111111111111111111111111111";
        let files = vec![
            ("config.json", b"{\"new\": true}".to_vec()),
            ("tokenizer.json", b"{}".to_vec()),
            ("tokenizer_config.json", b"{}".to_vec()),
            (SINGLE_WEIGHTS, vec![7u8; 10]),
        ];
        let settings = Settings {
            endpoint: mock_hub("owner/name", new_commit, files),
            ..closed_port(&tmp.0)
        };
        let dir = download_with("owner/name", None, &settings).unwrap();
        assert_ne!(dir, old);
        assert_eq!(dir.file_name().unwrap(), new_commit);
        for name in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            SINGLE_WEIGHTS,
        ] {
            assert!(dir.join(name).is_file(), "{name}");
        }
        assert_eq!(
            std::fs::read_to_string(dir.join("config.json")).unwrap(),
            "{\"new\": true}"
        );
    }

    #[test]
    fn missing_required_files_and_denied_repos_are_hub_errors() {
        let tmp = TempDir::new("missing");
        let endpoint = mock_hub(
            "owner/name",
            COMMIT,
            vec![
                ("config.json", b"{}".to_vec()),
                ("tokenizer.json", b"{}".to_vec()),
                ("tokenizer_config.json", b"{}".to_vec()),
                ("pytorch_model.bin", vec![0u8; 4]),
            ],
        );
        let settings = Settings {
            endpoint,
            ..closed_port(&tmp.0)
        };
        let message = download_with("owner/name", None, &settings)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("neither model.safetensors nor model.safetensors.index.json"),
            "{message}"
        );
        let error = download_with("owner/gated", None, &settings).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, Error::Hub { .. }), "{error:?}");
        assert!(message.contains("config.json: HTTP 401"), "{message}");
        assert!(message.contains("HF_TOKEN"), "{message}");
    }

    #[test]
    fn unreachable_hub_is_a_quick_hub_error() {
        let tmp = TempDir::new("closed");
        let start = Instant::now();
        let error = download_with("Salesforce/blip2-opt-2.7b", None, &closed_port(&tmp.0))
            .expect_err("nothing listens on port 9");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
        assert!(matches!(error, Error::Hub { .. }), "{error:?}");
        assert_eq!(error.error_type(), "hub");
        let message = error.to_string();
        assert!(
            message.starts_with("cannot download Salesforce/blip2-opt-2.7b: config.json:"),
            "{message}"
        );
        assert!(message.contains("no network?"), "{message}");
    }

    #[test]
    fn invalid_repo_id_and_revision_are_refused_without_a_request() {
        let tmp = TempDir::new("invalid");
        let settings = closed_port(&tmp.0);
        let error = download_with("not-a-repo", None, &settings).unwrap_err();
        assert!(
            error.to_string().contains("not a Hugging Face repo id"),
            "{error}"
        );
        let error = download_with("owner/name", Some("../../etc"), &settings).unwrap_err();
        assert!(error.to_string().contains("invalid revision"), "{error}");
    }

    #[test]
    fn offline_mode_misses_with_a_clear_error() {
        let tmp = TempDir::new("offline-miss");
        let settings = Settings {
            offline: true,
            ..closed_port(&tmp.0)
        };
        let error = download_with("owner/name", None, &settings).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("HF_HUB_OFFLINE"), "{message}");
        assert!(message.contains("config.json"), "{message}");
    }

    #[test]
    fn a_cached_single_file_checkpoint_resolves_without_network() {
        let tmp = TempDir::new("cached-single");
        let snapshot = populate(
            &tmp.0,
            "owner/single",
            &[
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json",
                "processor_config.json",
            ],
        );
        // The hub is unreachable: cached files are used as they are, and the optional files the
        // cache lacks are skipped since nothing in this call reached the hub.
        let dir = download_with("owner/single", None, &closed_port(&tmp.0)).unwrap();
        assert_eq!(dir, snapshot);
        // And with HF_HUB_OFFLINE.
        let settings = Settings {
            offline: true,
            ..closed_port(&tmp.0)
        };
        assert_eq!(
            download_with("owner/single", None, &settings).unwrap(),
            snapshot
        );
        // By commit hash, with no ref for it.
        assert_eq!(
            download_with("owner/single", Some(COMMIT), &settings).unwrap(),
            snapshot
        );
    }

    #[test]
    fn a_cached_sharded_checkpoint_resolves_without_network() {
        let tmp = TempDir::new("cached-sharded");
        let snapshot = populate(
            &tmp.0,
            "owner/sharded",
            &[
                "config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
            ],
        );
        let index = serde_json::json!({
            "metadata": {"total_size": 8},
            "weight_map": {
                "a.weight": "model-00001-of-00002.safetensors",
                "b.weight": "model-00002-of-00002.safetensors",
                "c.weight": "model-00001-of-00002.safetensors",
            }
        });
        std::fs::write(snapshot.join(WEIGHT_INDEX), index.to_string()).unwrap();
        let dir = download_with("owner/sharded", None, &closed_port(&tmp.0)).unwrap();
        assert_eq!(dir, snapshot);

        // A shard missing from the cache must be downloaded: with no hub, that is an error.
        std::fs::remove_file(snapshot.join("model-00002-of-00002.safetensors")).unwrap();
        let error = download_with("owner/sharded", None, &closed_port(&tmp.0)).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("model-00002-of-00002.safetensors"),
            "{message}"
        );
        assert!(message.contains("no network?"), "{message}");
    }

    #[test]
    fn unsafe_shard_names_are_refused() {
        let tmp = TempDir::new("unsafe");
        let snapshot = populate(
            &tmp.0,
            "owner/evil",
            &["config.json", "tokenizer.json", "tokenizer_config.json"],
        );
        let index = serde_json::json!({"weight_map": {"a": "../../../../etc/passwd"}});
        std::fs::write(snapshot.join(WEIGHT_INDEX), index.to_string()).unwrap();
        let error = download_with("owner/evil", None, &closed_port(&tmp.0)).unwrap_err();
        assert!(matches!(error, Error::Config { .. }), "{error:?}");
        assert!(error.to_string().contains("unsafe shard"), "{error}");
    }

    #[test]
    fn cache_records_of_absent_files_are_honoured() {
        let tmp = TempDir::new("no-exist");
        let snapshot = populate(
            &tmp.0,
            "owner/noexist",
            &["config.json", "tokenizer.json", "tokenizer_config.json"],
        );
        let repo_dir = snapshot.parent().unwrap().parent().unwrap();
        let no_exist = repo_dir.join(".no_exist").join(COMMIT);
        std::fs::create_dir_all(&no_exist).unwrap();
        std::fs::write(no_exist.join(WEIGHT_INDEX), b"").unwrap();
        std::fs::write(no_exist.join(SINGLE_WEIGHTS), b"").unwrap();
        let error = download_with("owner/noexist", None, &closed_port(&tmp.0)).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("neither model.safetensors"), "{message}");
    }
}
