//! A vault in an S3-compatible bucket (Garage, MinIO, Ceph RGW, AWS S3). One area per
//! tenant, under an optional prefix:
//!
//! ```text
//! <prefix>/<tenant>/chunks/<hex id>     chunk frames
//! <prefix>/<tenant>/objects/<key>       manifests, upload intents, leases
//! ```
//!
//! The same layout as [`super::LocalVault`] below its tenant directory (chunks are not fanned
//! out into `ab/cd/` directories: S3 has no directories, and a flat `chunks/` keeps
//! ListObjectsV2's `start-after` a direct resume point for [`Vault::list_chunks`]).
//!
//! # How requests run
//!
//! The [`Vault`] trait is blocking; the S3 client (`object_store` on `reqwest`) is async. Each
//! `S3Vault` owns a two-worker tokio runtime. A call spawns its request future there and waits
//! on a std channel, so it works from any thread — plain threads, `spawn_blocking` threads,
//! even (though it blocks that worker) an async task — and a panic inside the client comes
//! back as an error, not as a panic in the caller.
//!
//! # Time bounds
//!
//! Connecting times out after [`S3Config::connect_timeout`] (2 s), a request after
//! [`S3Config::request_timeout`] (30 s). Connection errors, timeouts, 408, 429 and 5xx are
//! retried [`S3Config::max_retries`] times (2) with jittered exponential backoff from 100 ms,
//! and no retry starts after [`S3Config::retry_timeout`] (5 s). So a vault that refuses
//! connections fails within about a second, one that drops packets within about 8 s, and
//! every call is cut off after `retry_timeout + request_timeout + 1 s` at most.
//!
//! # Errors
//!
//! - 404 → [`VaultError::NotFound`].
//! - 401, 403, and other 4xx except 408/409/429 (a wrong region, a missing bucket), and
//!   redirects (a wrong endpoint) → [`VaultError::Refused`]: retrying will not help.
//! - Connection errors, timeouts, 408, 409, 429, 5xx → [`VaultError::Unavailable`]
//!   ([`VaultError::is_transient`]).
//! - A response that is not S3 (an unparseable listing, a foreign key) →
//!   [`VaultError::Io`] with [`io::ErrorKind::InvalidData`].
//!
//! `object_store` keeps the status of a failed response inside a private error type, so the
//! HTTP service here records the status of each response it returns in a task-local
//! ([`LAST_STATUS`]) that the error mapping reads.
//!
//! # Consistency
//!
//! A PUT in S3 is atomic (a reader sees the old or the new object) and, on AWS since
//! 2020-12, on Garage and on MinIO, strongly read-after-write consistent, which is what the
//! [`Vault`] contract asks for. Deletes answer 204 whether or not the key existed, so
//! `delete_*` asks with a HEAD first to say whether it was there.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStoreExt, PutPayload, RetryConfig};

use super::{keys, ChunkEntry, ObjectEntry, Put, Vault, VaultError};
use crate::key::ChunkId;

const CHUNKS_DIR: &str = "chunks";
const OBJECTS_DIR: &str = "objects";
/// ListObjectsV2 returns at most this many keys per page.
const LIST_PAGE_MAX: usize = 1000;
/// Concurrent HEAD requests of one [`Vault::has_chunks`] call.
const HAS_CHUNKS_CONCURRENCY: usize = 16;
/// Worker threads of each vault's runtime: requests are I/O-bound; two keep one slow
/// response from holding up the rest.
const RUNTIME_WORKERS: usize = 2;

/// How the bucket is named in a request's URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3Addressing {
    /// `https://endpoint/bucket/key`: Garage, MinIO and Ceph RGW's default, and what a
    /// single endpoint without wildcard DNS needs.
    Path,
    /// `https://bucket.endpoint/key`: what AWS S3 wants for new buckets.
    VirtualHosted,
}

/// Where the access key comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum S3Credentials {
    /// Given in the configuration.
    Static {
        /// The access key id.
        access_key_id: String,
        /// The secret access key.
        secret_access_key: String,
    },
    /// Read from [`S3Credentials::ACCESS_KEY_ID_ENV`] and
    /// [`S3Credentials::SECRET_ACCESS_KEY_ENV`] when the vault is opened.
    Environment,
}

impl S3Credentials {
    /// Environment variable read for the access key id with [`S3Credentials::Environment`].
    pub const ACCESS_KEY_ID_ENV: &str = "AWS_ACCESS_KEY_ID";
    /// Environment variable read for the secret key with [`S3Credentials::Environment`].
    pub const SECRET_ACCESS_KEY_ENV: &str = "AWS_SECRET_ACCESS_KEY";
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            S3Credentials::Static { access_key_id, .. } => f
                .debug_struct("Static")
                .field("access_key_id", access_key_id)
                .field("secret_access_key", &"<redacted>")
                .finish(),
            S3Credentials::Environment => f.write_str("Environment"),
        }
    }
}

/// How to reach a bucket. [`S3Config::new`] fills in the timeouts and retries.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// The S3 API's base URL, `http://host:port` or `https://host` (no bucket in it).
    pub endpoint: String,
    /// The region the bucket is in (`garage` for Garage's default, `us-east-1`, …).
    pub region: String,
    /// The bucket.
    pub bucket: String,
    /// The access key.
    pub credentials: S3Credentials,
    /// Path-style or virtual-hosted-style URLs.
    pub addressing: S3Addressing,
    /// `/`-separated key prefix under which the tenants' areas live (`None`: the bucket's root).
    pub prefix: Option<String>,
    /// Bound on establishing a connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Bound on one request, from sending it to the last byte of the response.
    pub request_timeout: Duration,
    /// Retries of a request that failed transiently (connection, timeout, 408, 429, 5xx).
    pub max_retries: usize,
    /// No retry starts later than this after the first attempt.
    pub retry_timeout: Duration,
}

impl S3Config {
    /// A configuration with path-style addressing, no prefix, a 2 s connect timeout, a 30 s
    /// request timeout, and at most 2 retries started within 5 s.
    pub fn new(
        endpoint: impl Into<String>,
        region: impl Into<String>,
        bucket: impl Into<String>,
        credentials: S3Credentials,
    ) -> Self {
        S3Config {
            endpoint: endpoint.into(),
            region: region.into(),
            bucket: bucket.into(),
            credentials,
            addressing: S3Addressing::Path,
            prefix: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
            max_retries: 2,
            retry_timeout: Duration::from_secs(5),
        }
    }

    /// The longest a single vault call can take before it gives up: the last retry may
    /// start at `retry_timeout` and run for `request_timeout`, plus its backoff.
    fn call_deadline(&self) -> Duration {
        self.retry_timeout + self.request_timeout + Duration::from_secs(1)
    }
}

/// A tenant's area in an S3-compatible bucket. See the module docs.
pub struct S3Vault {
    name: String,
    store: Arc<AmazonS3>,
    /// `<prefix>/<tenant>/chunks/`.
    chunks_prefix: String,
    /// `<prefix>/<tenant>/objects/`.
    objects_prefix: String,
    call_deadline: Duration,
    /// Always `Some` until drop, which shuts it down without blocking.
    runtime: Option<tokio::runtime::Runtime>,
}

impl fmt::Debug for S3Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Vault")
            .field("name", &self.name)
            // The store's own Display names the bucket and nothing secret.
            .field("bucket", &format_args!("{}", self.store))
            .field("chunks_prefix", &self.chunks_prefix)
            .field("objects_prefix", &self.objects_prefix)
            .finish_non_exhaustive()
    }
}

impl Drop for S3Vault {
    fn drop(&mut self) {
        // Dropping a runtime blocks until its workers stop, which panics inside an async
        // context; a vault may be dropped there. Nothing it runs needs to finish: every call
        // has already been answered (or its caller has gone).
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl S3Vault {
    /// Opens tenant `tenant`'s area in the bucket `config` names. `tenant` must be a single
    /// safe key component (see [`keys::check`]). Nothing is sent: a vault that is down
    /// opens, and its calls answer [`VaultError::Unavailable`] until it is back.
    pub fn open(name: impl Into<String>, config: S3Config, tenant: &str) -> Result<Self, VaultError> {
        let name = name.into();
        if tenant.contains('/') || keys::check(tenant).is_err() {
            return Err(VaultError::BadKey { vault: name, key: tenant.to_owned(), reason: "not a valid tenant name" });
        }
        let config_err = |what: String| VaultError::Io {
            vault: name.clone(),
            op: "configure the S3 vault".to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, what),
        };
        let area = match config.prefix.as_deref().map(|p| p.trim_matches('/')).filter(|p| !p.is_empty()) {
            Some(prefix) => {
                keys::check(prefix).map_err(|reason| config_err(format!("prefix {prefix:?}: {reason}")))?;
                format!("{prefix}/{tenant}")
            }
            None => tenant.to_owned(),
        };
        let (access_key_id, secret_access_key) = match &config.credentials {
            S3Credentials::Static { access_key_id, secret_access_key } => {
                (access_key_id.clone(), secret_access_key.clone())
            }
            S3Credentials::Environment => {
                let read = |var: &str| {
                    std::env::var(var).ok().filter(|v| !v.is_empty()).ok_or_else(|| {
                        config_err(format!("credentials come from the environment, but {var} is not set"))
                    })
                };
                (read(S3Credentials::ACCESS_KEY_ID_ENV)?, read(S3Credentials::SECRET_ACCESS_KEY_ENV)?)
            }
        };
        let endpoint = config.endpoint.trim_end_matches('/');
        let (scheme, host) = endpoint
            .split_once("://")
            .filter(|(scheme, host)| matches!(*scheme, "http" | "https") && !host.is_empty())
            .ok_or_else(|| config_err(format!("endpoint {endpoint:?} is not an http:// or https:// URL")))?;
        let bucket_endpoint = match config.addressing {
            // object_store appends the bucket to a path-style endpoint itself.
            S3Addressing::Path => endpoint.to_owned(),
            // … and takes a virtual-hosted one as the bucket's own URL.
            S3Addressing::VirtualHosted => format!("{scheme}://{}.{host}", config.bucket),
        };
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
            },
            max_retries: config.max_retries,
            retry_timeout: config.retry_timeout,
        };
        let store = AmazonS3Builder::new()
            .with_endpoint(bucket_endpoint)
            .with_region(&config.region)
            .with_bucket_name(&config.bucket)
            .with_access_key_id(access_key_id)
            .with_secret_access_key(secret_access_key)
            .with_virtual_hosted_style_request(config.addressing == S3Addressing::VirtualHosted)
            .with_allow_http(scheme == "http")
            .with_retry(retry)
            .with_client_options(
                ClientOptions::new().with_connect_timeout(config.connect_timeout).with_timeout(config.request_timeout),
            )
            .with_http_connector(RingConnector {
                connect_timeout: config.connect_timeout,
                request_timeout: config.request_timeout,
            })
            .build()
            .map_err(|e| config_err(format!("{e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_WORKERS)
            .thread_name("keel-s3-vault")
            .enable_all()
            .build()
            .map_err(|source| VaultError::Io {
                vault: name.clone(),
                op: "start the S3 client's runtime".to_owned(),
                source,
            })?;
        Ok(S3Vault {
            name,
            store: Arc::new(store),
            chunks_prefix: format!("{area}/{CHUNKS_DIR}/"),
            objects_prefix: format!("{area}/{OBJECTS_DIR}/"),
            call_deadline: config.call_deadline(),
            runtime: Some(runtime),
        })
    }

    /// The bucket key of chunk `id`.
    pub fn chunk_key(&self, id: &ChunkId) -> String {
        format!("{}{id}", self.chunks_prefix)
    }

    /// The bucket key of object `key` ([`VaultError::BadKey`] when `key` is not valid).
    pub fn object_key(&self, key: &str) -> Result<String, VaultError> {
        keys::check(key).map_err(|reason| VaultError::BadKey {
            vault: self.name.clone(),
            key: key.to_owned(),
            reason,
        })?;
        Ok(format!("{}{key}", self.objects_prefix))
    }

    fn path(&self, bucket_key: &str) -> Result<Path, VaultError> {
        // Keys built from checked parts always parse; a failure is a bug in the caller.
        Path::parse(bucket_key).map_err(|e| VaultError::BadKey {
            vault: self.name.clone(),
            key: bucket_key.to_owned(),
            reason: if matches!(e, object_store::path::Error::EmptySegment { .. }) {
                "empty component"
            } else {
                "not a valid object path"
            },
        })
    }

    /// Runs `request` on the vault's runtime and waits for it, bounded by the call deadline.
    /// `Err(Failure)` carries what the error mapping needs.
    fn run<T, F>(&self, request: F) -> Result<T, Failure>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, object_store::Error>> + Send + 'static,
    {
        let Some(runtime) = &self.runtime else {
            return Err(Failure::Ended);
        };
        let (sender, receiver) = mpsc::sync_channel(1);
        let deadline = self.call_deadline;
        runtime.spawn(async move {
            let _ = sender.send(recording_status(deadline, request).await);
        });
        // The sender is dropped without a send only when the task panicked.
        receiver.recv().unwrap_or(Err(Failure::Ended))
    }

    /// Maps a failed request of operation `op` on `what` ("chunk <id>", "object <key>").
    fn error(&self, op: &str, what: impl FnOnce() -> String, failure: Failure) -> VaultError {
        let vault = self.name.clone();
        let unavailable =
            |reason: String| VaultError::Unavailable { vault: vault.clone(), reason: format!("{op}: {reason}") };
        let refused = |reason: String| VaultError::Refused { vault: vault.clone(), op: op.to_owned(), reason };
        let (error, status) = match failure {
            Failure::Deadline(after) => {
                return unavailable(format!("no answer within {after:?}"));
            }
            Failure::Ended => return unavailable("the S3 client task ended without an answer".to_owned()),
            Failure::Request { error, status } => (error, status),
        };
        match &error {
            // The S3 error code is the protocol's machine-readable answer (a HEAD has no
            // body, so a HEAD of a missing bucket still reads as a missing key).
            object_store::Error::NotFound { .. } if error.to_string().contains("<Code>NoSuchBucket</Code>") => {
                return refused(format!("the bucket does not exist: {error}"));
            }
            object_store::Error::NotFound { .. } => return VaultError::NotFound { vault, what: what() },
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                return refused(error.to_string());
            }
            _ => {}
        }
        if let Some(http) = find_source::<HttpError>(&error) {
            // No response at all: connection refused or reset, timeout, DNS, TLS.
            return unavailable(format!("{:?}: {error}", http.kind()));
        }
        match status {
            Some(404) => VaultError::NotFound { vault, what: what() },
            Some(408 | 409 | 429) | Some(500..=599) => unavailable(error.to_string()),
            Some(300..=499) => refused(error.to_string()),
            _ => VaultError::Io {
                vault,
                op: op.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidData, format!("unexpected answer from S3: {error}")),
            },
        }
    }

    /// HEAD of `bucket_key`: whether it exists.
    fn exists(&self, op: &str, what: impl Fn() -> String, bucket_key: &str) -> Result<bool, VaultError> {
        let path = self.path(bucket_key)?;
        let store = self.store.clone();
        match self.run(async move { store.head(&path).await }) {
            Ok(_) => Ok(true),
            Err(failure) => match self.error(op, &what, failure) {
                VaultError::NotFound { .. } => Ok(false),
                error => Err(error),
            },
        }
    }

    fn get(&self, op: &str, what: impl Fn() -> String, bucket_key: &str) -> Result<Vec<u8>, VaultError> {
        let path = self.path(bucket_key)?;
        let store = self.store.clone();
        self.run(async move { Ok(store.get(&path).await?.bytes().await?.to_vec()) })
            .map_err(|failure| self.error(op, what, failure))
    }

    fn put(&self, op: &str, what: impl Fn() -> String, bucket_key: &str, bytes: &[u8]) -> Result<(), VaultError> {
        let path = self.path(bucket_key)?;
        let store = self.store.clone();
        let payload = PutPayload::from(bytes.to_vec());
        self.run(async move { store.put(&path, payload).await.map(|_| ()) })
            .map_err(|failure| self.error(op, what, failure))
    }

    /// HEAD then DELETE: S3 answers a DELETE of a missing key with 204 too.
    fn delete(&self, op: &str, what: impl Fn() -> String, bucket_key: &str) -> Result<bool, VaultError> {
        if !self.exists(op, &what, bucket_key)? {
            return Ok(false);
        }
        let path = self.path(bucket_key)?;
        let store = self.store.clone();
        match self.run(async move { store.delete(&path).await }) {
            Ok(()) => Ok(true),
            Err(failure) => match self.error(op, &what, failure) {
                // Removed by someone else between the HEAD and the DELETE.
                VaultError::NotFound { .. } => Ok(false),
                error => Err(error),
            },
        }
    }

    /// One ListObjectsV2 page of keys starting with `prefix`, after `start_after`.
    fn list_page(
        &self,
        op: &str,
        prefix: &str,
        start_after: Option<String>,
        max_keys: usize,
    ) -> Result<ListPage, VaultError> {
        let store = self.store.clone();
        let prefix_owned = prefix.to_owned();
        let page = self
            .run(async move {
                let options =
                    PaginatedListOptions { offset: start_after, max_keys: Some(max_keys), ..Default::default() };
                store.list_paginated(Some(&prefix_owned), options).await
            })
            .map_err(|failure| match self.error(op, || format!("prefix {prefix}"), failure) {
                // A listing finds nothing rather than nothing found: a 404 means no bucket.
                VaultError::NotFound { vault, .. } => {
                    VaultError::Refused { vault, op: op.to_owned(), reason: "the bucket does not exist".to_owned() }
                }
                error => error,
            })?;
        let entries = page
            .result
            .objects
            .into_iter()
            .map(|meta| ListedKey {
                key: meta.location.to_string(),
                len: meta.size,
                modified: meta.last_modified.timestamp(),
            })
            .collect();
        Ok(ListPage { entries, truncated: page.page_token.is_some() })
    }

    fn invalid_answer(&self, op: &str, what: String) -> VaultError {
        VaultError::Io {
            vault: self.name.clone(),
            op: op.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidData, what),
        }
    }
}

struct ListedKey {
    key: String,
    len: u64,
    modified: i64,
}

struct ListPage {
    entries: Vec<ListedKey>,
    truncated: bool,
}

impl Vault for S3Vault {
    fn name(&self) -> &str {
        &self.name
    }

    fn reads_in_flight(&self) -> usize {
        super::NETWORK_READS_IN_FLIGHT
    }

    fn put_chunk(&self, id: &ChunkId, frame: &[u8]) -> Result<Put, VaultError> {
        crate::check_frame(frame).map_err(|source| VaultError::BadChunk {
            vault: self.name.clone(),
            id: *id,
            source: Box::new(source),
        })?;
        let key = self.chunk_key(id);
        let what = || format!("chunk {id}");
        let op = format!("put chunk {id}");
        if self.exists(&op, what, &key)? {
            return Ok(Put::AlreadyPresent);
        }
        // Two writers of the same id race harmlessly: each PUT is atomic and both frames
        // hold the same chunk.
        self.put(&op, what, &key, frame)?;
        Ok(Put::Written)
    }

    fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, VaultError> {
        let frame = self.get(&format!("get chunk {id}"), || format!("chunk {id}"), &self.chunk_key(id))?;
        // Check at this end of the wire too: a truncated or damaged copy is named here, so the
        // caller can heal it from another vault.
        crate::check_frame(&frame).map_err(|source| VaultError::BadChunk {
            vault: self.name.clone(),
            id: *id,
            source: Box::new(source),
        })?;
        Ok(frame)
    }

    fn has_chunk(&self, id: &ChunkId) -> Result<bool, VaultError> {
        self.exists(&format!("look up chunk {id}"), || format!("chunk {id}"), &self.chunk_key(id))
    }

    /// S3 has no batch HEAD: up to 16 HEADs at once.
    fn has_chunks(&self, ids: &[ChunkId]) -> Result<Vec<bool>, VaultError> {
        let mut found = Vec::with_capacity(ids.len());
        for batch in ids.chunks(HAS_CHUNKS_CONCURRENCY) {
            let mut requests = Vec::with_capacity(batch.len());
            for id in batch {
                let path = self.path(&self.chunk_key(id))?;
                requests.push((*id, path));
            }
            let store = self.store.clone();
            let deadline = self.call_deadline;
            let answers = self
                .run(async move {
                    let mut tasks = tokio::task::JoinSet::new();
                    for (index, (_, path)) in requests.iter().cloned().enumerate() {
                        let store = store.clone();
                        tasks.spawn(async move {
                            let answer = recording_status(deadline, async move { store.head(&path).await }).await;
                            (index, answer.map(|_| ()))
                        });
                    }
                    let mut answers: Vec<Option<Result<(), Failure>>> = (0..requests.len()).map(|_| None).collect();
                    while let Some(joined) = tasks.join_next().await {
                        if let Ok((index, answer)) = joined {
                            if let Some(slot) = answers.get_mut(index) {
                                *slot = Some(answer);
                            }
                        }
                    }
                    Ok(requests.into_iter().map(|(id, _)| id).zip(answers).collect::<Vec<_>>())
                })
                .map_err(|failure| self.error("look up chunks", || "chunks".to_owned(), failure))?;
            for (id, answer) in answers {
                match answer {
                    Some(Ok(())) => found.push(true),
                    Some(Err(failure)) => {
                        match self.error(&format!("look up chunk {id}"), || format!("chunk {id}"), failure) {
                            VaultError::NotFound { .. } => found.push(false),
                            error => return Err(error),
                        }
                    }
                    None => {
                        return Err(self.error(
                            &format!("look up chunk {id}"),
                            || format!("chunk {id}"),
                            Failure::Ended,
                        ))
                    }
                }
            }
        }
        Ok(found)
    }

    fn delete_chunk(&self, id: &ChunkId) -> Result<bool, VaultError> {
        self.delete(&format!("delete chunk {id}"), || format!("chunk {id}"), &self.chunk_key(id))
    }

    /// ListObjectsV2 with `start-after`: S3 lists keys in UTF-8 byte order, which for
    /// lowercase hex ids is id order. Keys under `chunks/` that are not ids are skipped.
    fn list_chunks(&self, after: Option<&ChunkId>, limit: usize) -> Result<Vec<ChunkEntry>, VaultError> {
        let op = "list chunks";
        let mut out = Vec::new();
        let mut start_after = after.map(|id| self.chunk_key(id));
        while out.len() < limit {
            let want = (limit - out.len()).min(LIST_PAGE_MAX);
            let page = self.list_page(op, &self.chunks_prefix, start_after.clone(), want)?;
            let Some(last) = page.entries.last().map(|e| e.key.clone()) else {
                if page.truncated {
                    return Err(self.invalid_answer(op, "S3 returned an empty listing page marked truncated".into()));
                }
                break;
            };
            if start_after.as_ref().is_some_and(|previous| last <= *previous) {
                return Err(self.invalid_answer(op, format!("S3 listing did not advance past {last:?}")));
            }
            for entry in page.entries {
                let Some(hex) = entry.key.strip_prefix(&self.chunks_prefix) else { continue };
                let Ok(id) = hex.parse::<ChunkId>() else { continue };
                if id.to_string() != hex || after.is_some_and(|after| id <= *after) {
                    continue;
                }
                out.push(ChunkEntry { id, len: entry.len, modified: entry.modified });
            }
            if !page.truncated {
                break;
            }
            start_after = Some(last);
        }
        // Servers sort by key already; sorting again keeps the contract if one does not.
        out.sort_unstable_by_key(|e| e.id);
        out.truncate(limit);
        Ok(out)
    }

    fn put_object(&self, key: &str, bytes: &[u8]) -> Result<(), VaultError> {
        let bucket_key = self.object_key(key)?;
        self.put(&format!("put object {key}"), || format!("object {key}"), &bucket_key, bytes)
    }

    fn get_object(&self, key: &str) -> Result<Vec<u8>, VaultError> {
        let bucket_key = self.object_key(key)?;
        self.get(&format!("get object {key}"), || format!("object {key}"), &bucket_key)
    }

    fn delete_object(&self, key: &str) -> Result<bool, VaultError> {
        let bucket_key = self.object_key(key)?;
        self.delete(&format!("delete object {key}"), || format!("object {key}"), &bucket_key)
    }

    /// `prefix` is matched as a plain string inside the tenant's `objects/`: S3 keys are not
    /// paths, so no prefix can reach outside the tenant's area.
    fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectEntry>, VaultError> {
        let op = format!("list objects {prefix:?}");
        let full_prefix = format!("{}{prefix}", self.objects_prefix);
        let mut out = Vec::new();
        let mut start_after = None;
        loop {
            let page = self.list_page(&op, &full_prefix, start_after.clone(), LIST_PAGE_MAX)?;
            let Some(last) = page.entries.last().map(|e| e.key.clone()) else {
                if page.truncated {
                    return Err(self.invalid_answer(&op, "S3 returned an empty listing page marked truncated".into()));
                }
                break;
            };
            if start_after.as_ref().is_some_and(|previous: &String| last <= *previous) {
                return Err(self.invalid_answer(&op, format!("S3 listing did not advance past {last:?}")));
            }
            for entry in page.entries {
                let Some(key) = entry.key.strip_prefix(&self.objects_prefix) else { continue };
                if keys::check(key).is_err() || !key.starts_with(prefix) {
                    continue;
                }
                out.push(ObjectEntry { key: key.to_owned(), len: entry.len, modified: entry.modified });
            }
            if !page.truncated {
                break;
            }
            start_after = Some(last);
        }
        out.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

/// A request that did not succeed, before it is mapped to a [`VaultError`].
#[derive(Debug)]
enum Failure {
    /// The client's error, and the HTTP status of the last response received, if any.
    Request { error: object_store::Error, status: Option<u16> },
    /// The call deadline passed.
    Deadline(Duration),
    /// The task running the request ended without an answer (it panicked).
    Ended,
}

tokio::task_local! {
    /// The status of the last HTTP response of the request being run (see the module docs).
    static LAST_STATUS: Cell<Option<u16>>;
}

/// Runs `request` with a [`LAST_STATUS`] of its own, bounded by `deadline`.
async fn recording_status<T>(
    deadline: Duration,
    request: impl Future<Output = Result<T, object_store::Error>>,
) -> Result<T, Failure> {
    LAST_STATUS
        .scope(Cell::new(None), async move {
            match tokio::time::timeout(deadline, request).await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(error)) => Err(Failure::Request { error, status: LAST_STATUS.with(Cell::get) }),
                Err(_) => Err(Failure::Deadline(deadline)),
            }
        })
        .await
}

/// The first error of type `E` in `error`'s source chain.
fn find_source<'a, E: std::error::Error + 'static>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a E> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<E>() {
            return Some(found);
        }
        current = error.source();
    }
    None
}

/// Builds the HTTP client: reqwest with rustls on ring (object_store's own connector would
/// bring aws-lc-rs) and the platform's trust store, with the configured timeouts.
#[derive(Debug)]
struct RingConnector {
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl HttpConnector for RingConnector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        use rustls_platform_verifier::BuilderVerifierExt;

        let generic =
            |source: Box<dyn std::error::Error + Send + Sync>| object_store::Error::Generic { store: "S3", source };
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .and_then(|builder| builder.with_platform_verifier())
            .map_err(|e| generic(Box::new(e)))?
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(self.connect_timeout)
            .timeout(self.request_timeout)
            .user_agent(concat!("keel/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| generic(Box::new(e)))?;
        Ok(HttpClient::new(StatusRecorder(client)))
    }
}

/// reqwest's client, recording each response's status in [`LAST_STATUS`].
#[derive(Debug)]
struct StatusRecorder(reqwest::Client);

#[async_trait]
impl HttpService for StatusRecorder {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let response = HttpService::call(&self.0, request).await;
        let status = response.as_ref().ok().map(|r| r.status().as_u16());
        // Outside a vault call (none today) there is nowhere to record it.
        let _ = LAST_STATUS.try_with(|last| last.set(status));
        response
    }
}

#[cfg(test)]
mod tests {
    //! Without a server, or against a scripted one: configuration, error mapping, and calls
    //! from every kind of thread. The full contract runs against a real Garage in
    //! tests/it/s3_vault.rs.

    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use super::*;
    use crate::{encode_chunk, TenantKey};

    fn config(endpoint: String) -> S3Config {
        let credentials = S3Credentials::Static { access_key_id: "GK1".into(), secret_access_key: "secret".into() };
        S3Config::new(endpoint, "garage", "bucket", credentials)
    }

    /// An endpoint where nothing listens (connection refused).
    fn closed_endpoint() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        format!("http://127.0.0.1:{port}")
    }

    /// A scripted HTTP server: each request gets `respond(method, path)`'s raw bytes, then
    /// the connection is closed. Its thread ends with the test process.
    struct Scripted {
        endpoint: String,
        requests: Arc<AtomicUsize>,
    }

    fn scripted(respond: impl Fn(&str, &str) -> Vec<u8> + Send + 'static) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                if let Some((method, path)) = read_request(&mut stream) {
                    let _ = stream.write_all(&respond(&method, &path));
                }
            }
        });
        Scripted { endpoint, requests }
    }

    /// Reads one request's head and body; returns its method and path.
    fn read_request(stream: &mut TcpStream) -> Option<(String, String)> {
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).ok()? == 0 {
                return None;
            }
            buf.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&buf).into_owned();
        let length = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).ok()?;
        let mut words = head.split_whitespace();
        Some((words.next()?.to_owned(), words.next()?.to_owned()))
    }

    fn response(status: &str, body: &str) -> Vec<u8> {
        format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).into_bytes()
    }

    fn s3_error(code: &str) -> String {
        format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>m</Message></Error>")
    }

    fn frame() -> (ChunkId, Vec<u8>) {
        encode_chunk(&TenantKey::from_bytes([3; 32]), b"some chunk data", 3).unwrap()
    }

    #[test]
    fn unreachable_vault_is_unavailable_within_seconds() {
        let vault = S3Vault::open("down", config(closed_endpoint()), "acme").unwrap();
        let (id, frame) = frame();
        let started = Instant::now();
        let error = vault.put_chunk(&id, &frame).unwrap_err();
        assert!(error.is_transient(), "{error}");
        assert!(matches!(vault.list_chunks(None, 10), Err(VaultError::Unavailable { .. })));
        assert!(matches!(vault.get_object("uploads/u"), Err(VaultError::Unavailable { .. })));
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    }

    #[test]
    fn a_bad_frame_is_refused_before_anything_is_sent() {
        let vault = S3Vault::open("down", config(closed_endpoint()), "acme").unwrap();
        let (id, mut frame) = frame();
        *frame.last_mut().unwrap() ^= 1;
        assert!(matches!(vault.put_chunk(&id, &frame), Err(VaultError::BadChunk { id: bad, .. }) if bad == id));
        assert!(matches!(vault.put_chunk(&id, b"short"), Err(VaultError::BadChunk { .. })));
    }

    #[test]
    fn statuses_map_to_vault_errors() {
        type Expected = fn(&VaultError) -> bool;
        let refused: Expected = |e| matches!(e, VaultError::Refused { .. });
        let cases: [(&str, &str, Expected); 8] = [
            ("404 Not Found", "NoSuchBucket", refused),
            ("404 Not Found", "NoSuchKey", |e| e.is_not_found()),
            ("403 Forbidden", "AccessDenied", |e| matches!(e, VaultError::Refused { .. })),
            ("401 Unauthorized", "Unauthorized", |e| matches!(e, VaultError::Refused { .. })),
            ("400 Bad Request", "AuthorizationHeaderMalformed", |e| matches!(e, VaultError::Refused { .. })),
            ("503 Service Unavailable", "SlowDown", |e| e.is_transient()),
            ("500 Internal Server Error", "InternalError", |e| e.is_transient()),
            ("429 Too Many Requests", "SlowDown", |e| e.is_transient()),
        ];
        for (status, code, expected) in cases {
            let server = scripted(move |_, _| response(status, &s3_error(code)));
            let vault = S3Vault::open("scripted", config(server.endpoint.clone()), "acme").unwrap();
            let error = vault.get_object("uploads/u").unwrap_err();
            assert!(expected(&error), "{status}: got {error:?}");
            let error = vault.list_objects("").unwrap_err();
            let expected_list = if status.starts_with("404") { refused } else { expected };
            assert!(expected_list(&error), "{status}: list got {error:?}");
        }
    }

    #[test]
    fn transient_errors_are_retried_a_bounded_number_of_times() {
        let server = scripted(|_, _| response("503 Service Unavailable", &s3_error("SlowDown")));
        let vault = S3Vault::open("scripted", config(server.endpoint.clone()), "acme").unwrap();
        let started = Instant::now();
        assert!(vault.get_chunk(&frame().0).unwrap_err().is_transient());
        assert_eq!(server.requests.load(Ordering::SeqCst), 3, "one try and two retries");
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    }

    #[test]
    fn answers_that_are_not_s3_do_not_panic() {
        let garbage: [fn(&str, &str) -> Vec<u8>; 5] = [
            |_, _| response("200 OK", "<not-xml"),
            |_, _| response("200 OK", "<ListBucketResult><Contents><Key>a//b</Key></Contents></ListBucketResult>"),
            |_, _| b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(),
            |_, _| Vec::new(),
            |_, _| b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort".to_vec(),
        ];
        for respond in garbage {
            let server = scripted(respond);
            let vault = S3Vault::open("scripted", config(server.endpoint.clone()), "acme").unwrap();
            assert!(vault.list_chunks(None, 10).is_err());
            assert!(vault.list_objects("snapshots/").is_err());
            let _ = vault.get_object("uploads/u");
            let _ = vault.get_chunk(&frame().0);
            let _ = vault.has_chunks(&[frame().0; 20]);
        }
        // A GET answered with bytes that are not a frame is a bad chunk, not data.
        let server = scripted(|_, _| response("200 OK", "not a frame"));
        let vault = S3Vault::open("scripted", config(server.endpoint.clone()), "acme").unwrap();
        assert!(matches!(vault.get_chunk(&frame().0), Err(VaultError::BadChunk { .. })));
    }

    #[test]
    fn has_chunks_answers_in_order() {
        let (present, _) = frame();
        let present_path = format!("/bucket/acme/chunks/{present}");
        let server = scripted(move |method, path| {
            assert_eq!(method, "HEAD");
            if path == present_path {
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nLast-Modified: Mon, 30 Nov 2026 10:00:00 GMT\r\nETag: \"e\"\r\nConnection: close\r\n\r\n".to_vec()
            } else {
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
            }
        });
        let vault = S3Vault::open("scripted", config(server.endpoint.clone()), "acme").unwrap();
        let mut ids: Vec<ChunkId> = (0..40u8).map(|i| ChunkId([i; 32])).collect();
        ids[3] = present;
        ids[37] = present;
        let found = vault.has_chunks(&ids).unwrap();
        let expected: Vec<bool> = (0..40).map(|i| i == 3 || i == 37).collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn works_from_spawn_blocking_and_drops_inside_a_runtime() {
        let server =
            scripted(|_, _| b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec());
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        runtime.block_on(async move {
            let vault = S3Vault::open("scripted", config(server.endpoint.clone()), "acme").unwrap();
            let vault = tokio::task::spawn_blocking(move || {
                assert!(!vault.has_chunk(&frame().0).unwrap());
                vault
            })
            .await
            .unwrap();
            // Dropped in an async task: must not panic ("cannot drop a runtime …").
            drop(vault);
        });
    }

    #[test]
    fn configuration_is_checked_when_opening() {
        assert!(matches!(S3Vault::open("v", config(closed_endpoint()), "../x"), Err(VaultError::BadKey { .. })));
        assert!(matches!(S3Vault::open("v", config(closed_endpoint()), "a/b"), Err(VaultError::BadKey { .. })));
        assert!(matches!(S3Vault::open("v", config("ftp://host".into()), "a"), Err(VaultError::Io { .. })));
        let mut bad_prefix = config(closed_endpoint());
        bad_prefix.prefix = Some("a/../b".into());
        assert!(matches!(S3Vault::open("v", bad_prefix, "a"), Err(VaultError::Io { .. })));

        let mut prefixed = config(closed_endpoint());
        prefixed.prefix = Some("/keel/prod/".into());
        let vault = S3Vault::open("v", prefixed, "acme").unwrap();
        let id = ChunkId([0xab; 32]);
        assert_eq!(vault.chunk_key(&id), format!("keel/prod/acme/chunks/{id}"));
        assert_eq!(vault.object_key("uploads/u").unwrap(), "keel/prod/acme/objects/uploads/u");
        assert!(matches!(vault.object_key("../x"), Err(VaultError::BadKey { .. })));
        assert!(!format!("{:?}", config(closed_endpoint())).contains("\"secret\""));
        assert!(!format!("{vault:?}").contains("secret\""), "{vault:?}");
    }
}
