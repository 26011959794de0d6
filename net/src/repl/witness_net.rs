//! The `keel witness` server: answers arbiter requests over QUIC (mutual TLS, ALPN
//! `keel-witness/1`), one request per stream, deciding with [`WitnessCore`] and making
//! every changed record durable before it answers.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::arbiter::{ArbiterRecord, ArbiterRequest};
use super::node::{read_json, write_json};
use super::wire::FrameType;
use super::witness::{decode_record, encode_record, WitnessCore};
use crate::quic;

const RECORD_EXT: &str = "rec";

/// Loads every record file in `dir` (refusing to start on a damaged one: a witness that
/// forgot a record could hand out a promotion it already gave).
pub fn load_records(dir: &Path) -> Result<Vec<ArbiterRecord>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let mut records = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("list {}: {e}", dir.display()))? {
        let path = entry.map_err(|e| format!("list {}: {e}", dir.display()))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some(RECORD_EXT) {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
        let record = decode_record(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        records.push(record);
    }
    Ok(records)
}

fn record_path(dir: &Path, volume: &str) -> PathBuf {
    dir.join(format!("{volume}.{RECORD_EXT}"))
}

/// Replaces a record file durably (temporary file, fsync, rename, fsync of the directory).
fn store_record(dir: &Path, record: &ArbiterRecord) -> std::io::Result<()> {
    let path = record_path(dir, &record.volume);
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&encode_record(record))?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The witness's state: the decision core and where its records live.
pub struct Witness {
    dir: PathBuf,
    core: Mutex<WitnessCore>,
}

impl Witness {
    /// Loads the records in `dir`.
    pub fn open(dir: &Path, lease: Duration) -> Result<Arc<Self>, String> {
        let records = load_records(dir)?;
        tracing::info!(records = records.len(), dir = %dir.display(), "witness records loaded");
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            core: Mutex::new(WitnessCore::new(lease, records, Instant::now())),
        }))
    }

    /// Decides one request from `peer`, persisting a changed record before answering. A
    /// record that cannot be persisted is not granted.
    pub fn decide(&self, peer: &str, request: ArbiterRequest) -> super::arbiter::ArbiterResponse {
        let mut core = self.core.lock();
        let (answer, changed) = core.handle(Instant::now(), peer, request.clone());
        if let Some(record) = changed {
            if let Err(e) = store_record(&self.dir, &record) {
                tracing::error!(volume = %record.volume, "failed to persist the witness record: {e}; exiting");
                // The in-memory core already changed: the only safe way on is to stop and
                // restart from the durable records.
                std::process::exit(3);
            }
            tracing::info!(volume = %record.volume, epoch = record.epoch, primary = %record.primary, standby = %record.standby, state = ?record.standby_state, "record changed by {request:?}");
        }
        answer
    }
}

/// Serves arbiter requests on `endpoint` until `shutdown`.
pub async fn serve(
    witness: Arc<Witness>,
    endpoint: quinn::Endpoint,
    allowed: Vec<String>,
    shutdown: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming { Some(i) => i, None => break },
            () = shutdown.cancelled() => break,
        };
        let (witness, allowed) = (Arc::clone(&witness), allowed.clone());
        tokio::spawn(async move {
            let (conn, peer) = match quic::accept(incoming, &allowed).await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("refused a witness connection: {e}");
                    return;
                }
            };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let (witness, peer) = (Arc::clone(&witness), peer.clone());
                tokio::spawn(async move {
                    let request: ArbiterRequest = match read_json(&mut recv, FrameType::ArbiterRequest).await {
                        Ok(request) => request,
                        Err(e) => {
                            tracing::warn!(%peer, "bad witness request: {e}");
                            return;
                        }
                    };
                    let answer = witness.decide(&peer, request);
                    if let Err(e) = write_json(&mut send, FrameType::ArbiterResponse, &answer).await {
                        tracing::debug!(%peer, "failed to answer: {e}");
                    }
                    let _ = send.finish();
                });
            }
        });
    }
    endpoint.close(0u32.into(), b"witness shutting down");
}
