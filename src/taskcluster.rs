//! Taskcluster's image_builder task contract, which taskgraph's
//! `docker_image` transform gives every `docker-image` task: the task's
//! environment names the context artifact, the parent image task, the
//! build arguments and where the outputs go. `kiln taskcluster
//! build-image` reads it ([`Task::from_env`]), fetches what the task needs
//! from the queue ([`fetch`]), checks the context against `HASH`, builds
//! and writes `image.tar` and `image.tar.zst`.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What one image task asks for.
#[derive(Clone, Debug)]
pub struct Task {
    /// The queue's base: `TASKCLUSTER_PROXY_URL` (the task's proxy), else
    /// `TASKCLUSTER_ROOT_URL`.
    pub queue_base: Option<String>,
    pub root_url: Option<String>,
    pub context_task_id: Option<String>,
    pub context_path: Option<String>,
    pub image_name: String,
    /// `DOCKER_BUILD_ARGS`, a JSON object.
    pub build_args: BTreeMap<String, String>,
    /// `DOCKER_IMAGE_ZSTD_LEVEL` (default 3).
    pub zstd_level: i32,
    pub parent_task_id: Option<String>,
    /// `CHOWN_OUTPUT`: `uid:gid`.
    pub chown: Option<(u32, u32)>,
    /// `HASH`: taskgraph's context hash the context must have.
    pub hash: Option<String>,
    pub debug: bool,
}

fn var(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    env(name).filter(|v| !v.is_empty())
}

impl Task {
    /// The task from the process environment.
    pub fn from_env() -> Result<Task, String> {
        Task::from_vars(&|k| std::env::var(k).ok())
    }

    /// The task from `env` (a lookup of environment variables).
    pub fn from_vars(env: &dyn Fn(&str) -> Option<String>) -> Result<Task, String> {
        let image_name = var(env, "IMAGE_NAME").ok_or(
            "IMAGE_NAME is not set: the image task names the image it builds (taskgraph's docker_image transform sets it)",
        )?;
        let build_args = match var(env, "DOCKER_BUILD_ARGS") {
            None => BTreeMap::new(),
            Some(text) => {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| format!("DOCKER_BUILD_ARGS is not JSON ({e}): {text}"))?;
                let obj = v
                    .as_object()
                    .ok_or_else(|| format!("DOCKER_BUILD_ARGS is not a JSON object: {text}"))?;
                obj.iter()
                    .map(|(k, v)| {
                        let s = match v {
                            serde_json::Value::String(s) => s.clone(),
                            serde_json::Value::Null => String::new(),
                            other => other.to_string(),
                        };
                        (k.clone(), s)
                    })
                    .collect()
            }
        };
        let zstd_level = match var(env, "DOCKER_IMAGE_ZSTD_LEVEL") {
            None => 3,
            Some(l) => l
                .trim()
                .parse::<i32>()
                .ok()
                .filter(|l| (1..=22).contains(l))
                .ok_or_else(|| {
                    format!("DOCKER_IMAGE_ZSTD_LEVEL={l}: expected a zstd level from 1 to 22")
                })?,
        };
        let chown = match var(env, "CHOWN_OUTPUT") {
            None => None,
            Some(c) => {
                let parsed = c
                    .split_once(':')
                    .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)));
                Some(
                    parsed
                        .ok_or_else(|| format!("CHOWN_OUTPUT={c}: expected UID:GID (numbers)"))?,
                )
            }
        };
        let root_url =
            var(env, "TASKCLUSTER_ROOT_URL").map(|u| u.trim_end_matches('/').to_string());
        let queue_base = var(env, "TASKCLUSTER_PROXY_URL")
            .map(|u| u.trim_end_matches('/').to_string())
            .or_else(|| root_url.clone());
        Ok(Task {
            queue_base,
            root_url,
            context_task_id: var(env, "CONTEXT_TASK_ID"),
            context_path: var(env, "CONTEXT_PATH"),
            image_name,
            build_args,
            zstd_level,
            parent_task_id: var(env, "PARENT_TASK_ID"),
            chown,
            hash: var(env, "HASH"),
            debug: var(env, "DEBUG").is_some_and(|d| d != "0" && d != "false"),
        })
    }

    /// The URL of a task's artifact on the queue.
    pub fn artifact_url(&self, task_id: &str, path: &str) -> Result<String, String> {
        let base = self.queue_base.as_deref().ok_or(
            "neither TASKCLUSTER_PROXY_URL nor TASKCLUSTER_ROOT_URL is set: kiln needs the queue to fetch the task's artifacts",
        )?;
        Ok(format!(
            "{base}/api/queue/v1/task/{task_id}/artifacts/{path}"
        ))
    }
}

/// The HTTP client for the queue and the secrets service: statuses are
/// answers, not errors; redirects followed; stalls end.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(300)))
        .timeout_per_read(Some(Duration::from_secs(120)))
        .max_redirects(10)
        .build()
        .into()
}

/// Downloads `url` (following redirects) into `dest`, atomically; the
/// error names the URL and the HTTP status.
pub fn fetch(url: &str, dest: &Path) -> Result<u64, String> {
    let resp = agent()
        .get(url)
        .call()
        .map_err(|e| format!("fetching {url}: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        let mut body = String::new();
        let _ = resp
            .into_body()
            .into_reader()
            .take(4096)
            .read_to_string(&mut body);
        let hint = match status.as_u16() {
            404 => ": the artifact does not exist (a failed or expired task?)",
            401 | 403 => ": the task lacks the scope to read it (queue:get-artifact:…)",
            _ => "",
        };
        return Err(format!(
            "fetching {url}: HTTP {status}{hint}{}",
            if body.trim().is_empty() {
                String::new()
            } else {
                format!(" ({})", body.trim().chars().take(300).collect::<String>())
            }
        ));
    }
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(parent)
        .map_err(|e| format!("writing {}: {e}", dest.display()))?;
    let n = io::copy(&mut resp.into_body().into_reader(), tmp.as_file_mut())
        .map_err(|e| format!("fetching {url}: {e}"))?;
    tmp.persist(dest)
        .map_err(|e| format!("writing {}: {e}", dest.display()))?;
    Ok(n)
}

/// Compresses `src` into `dst` with zstd at `level` (the multithreaded
/// encoder, whose bytes do not depend on the worker count), atomically.
pub fn compress_zstd(src: &Path, dst: &Path, level: i32) -> Result<(), String> {
    let parent = dst.parent().unwrap_or(Path::new("."));
    let werr = |e: io::Error| format!("writing {}: {e}", dst.display());
    let mut tmp = tempfile::NamedTempFile::new_in(parent).map_err(werr)?;
    {
        let mut input =
            std::fs::File::open(src).map_err(|e| format!("reading {}: {e}", src.display()))?;
        let mut w = crate::layer::Compression::Zstd(level)
            .writer(io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut()))
            .map_err(werr)?;
        io::copy(&mut input, &mut w).map_err(werr)?;
        let mut inner = w.finish().map_err(werr)?;
        io::Write::flush(&mut inner).map_err(werr)?;
    }
    tmp.as_file().sync_all().map_err(werr)?;
    tmp.persist(dst).map_err(|e| werr(e.error))?;
    Ok(())
}

/// Registry credentials from a Taskcluster secret, read through the
/// task's proxy (`TASKCLUSTER_PROXY_URL/api/secrets/v1/secret/NAME`, a
/// JSON object whose `secret` holds `user_key` and `password_key`).
pub fn secret_credentials(
    name: &str,
    user_key: &str,
    password_key: &str,
) -> Result<crate::registry::auth::Credentials, String> {
    let proxy = std::env::var("TASKCLUSTER_PROXY_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("reading the Taskcluster secret {name} needs TASKCLUSTER_PROXY_URL (the task's proxy: set features.taskclusterProxy in the task)"))?;
    let url = format!(
        "{}/api/secrets/v1/secret/{name}",
        proxy.trim_end_matches('/')
    );
    let resp = agent()
        .get(&url)
        .call()
        .map_err(|e| format!("reading the Taskcluster secret {name} ({url}): {e}"))?;
    let status = resp.status().as_u16();
    match status {
        200 => {}
        401 | 403 => {
            return Err(format!(
                "reading the Taskcluster secret {name}: HTTP {status} from {url}: the task lacks the scope secrets:get:{name} (add it to the task's scopes)"
            ))
        }
        404 => {
            return Err(format!(
                "reading the Taskcluster secret {name}: HTTP 404 from {url}: there is no secret of that name"
            ))
        }
        s => return Err(format!("reading the Taskcluster secret {name}: HTTP {s} from {url}")),
    }
    let mut body = Vec::new();
    resp.into_body()
        .into_reader()
        .take(1 << 20)
        .read_to_end(&mut body)
        .map_err(|e| format!("reading the Taskcluster secret {name}: {e}"))?;
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| format!("the Taskcluster secret {name} is not JSON: {e}"))?;
    let field = |k: &str| {
        v["secret"][k].as_str().map(String::from).ok_or_else(|| {
            format!("the Taskcluster secret {name} has no string {k} in its `secret` object (its keys are given with --taskcluster-secret-keys USER:PASSWORD)")
        })
    };
    Ok(crate::registry::auth::Credentials {
        user: field(user_key)?,
        password: field(password_key)?,
        identity_token: None,
    })
}

/// Where the task's files live (`/workspace` in the task's container).
#[derive(Clone, Debug)]
pub struct Workspace(pub PathBuf);

impl Workspace {
    pub fn context(&self) -> PathBuf {
        self.0.join("context.tar.gz")
    }
    pub fn parent(&self) -> PathBuf {
        self.0.join("parent.tar")
    }
    pub fn out(&self) -> PathBuf {
        self.0.join("out")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_task_environment_is_read_with_taskgraph_s_names() {
        let vars: BTreeMap<&str, &str> = [
            ("IMAGE_NAME", "child"),
            (
                "DOCKER_BUILD_ARGS",
                r#"{"A": "1", "DOCKER_IMAGE_PARENT": "parent:abc", "N": 3}"#,
            ),
            ("DOCKER_IMAGE_ZSTD_LEVEL", "10"),
            ("CHOWN_OUTPUT", "1000:1000"),
            ("TASKCLUSTER_ROOT_URL", "https://tc.example/"),
            ("TASKCLUSTER_PROXY_URL", "http://taskcluster"),
            ("CONTEXT_TASK_ID", "ctx1"),
            ("CONTEXT_PATH", "public/docker-contexts/child.tar.gz"),
            ("PARENT_TASK_ID", "par1"),
            ("HASH", "ab"),
        ]
        .into_iter()
        .collect();
        let t = Task::from_vars(&|k| vars.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(t.build_args["A"], "1");
        assert_eq!(t.build_args["N"], "3");
        assert_eq!(t.zstd_level, 10);
        assert_eq!(t.chown, Some((1000, 1000)));
        assert_eq!(
            t.artifact_url("ctx1", "public/x.tar.gz").unwrap(),
            "http://taskcluster/api/queue/v1/task/ctx1/artifacts/public/x.tar.gz"
        );
        let err = Task::from_vars(&|k| {
            (k == "IMAGE_NAME")
                .then(|| "x".into())
                .or_else(|| (k == "CHOWN_OUTPUT").then(|| "me".into()))
        })
        .unwrap_err();
        assert!(err.contains("CHOWN_OUTPUT=me"), "{err}");
        assert!(Task::from_vars(&|_| None)
            .unwrap_err()
            .contains("IMAGE_NAME"));
    }
}
