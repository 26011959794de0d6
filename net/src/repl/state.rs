//! The replication state a node keeps per volume, beside the volume's own files:
//! `repl.state` in the volume directory. It says which role the node last held, in which
//! epoch, the epoch history, and whether the local copy is consistent (a node that is
//! resyncing, or that discarded a tail, is not, and must never be promoted).
//!
//! The file is replaced atomically (write a temporary file, fsync, rename, fsync the
//! directory) and framed like every Keel file: magic, version, length, crc32, then a JSON
//! body (small, rarely written, read by operators). See docs/format-replication.md.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::history::EpochStart;

/// File name inside the volume directory.
pub const STATE_FILE: &str = "repl.state";
const MAGIC: [u8; 4] = *b"KRST";
const VERSION: u16 = 1;
/// magic (4) | version (2) | reserved (2) | body length (4) | crc32 of the body (4).
const HEADER_LEN: usize = 16;
const BODY_MAX: usize = 1 << 20;

/// Which side of the pair a node is for a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Serves the volume and ships every write to the standby.
    Primary,
    /// Receives the primary's writes; serves nothing.
    Standby,
}

impl Role {
    /// Lower-case name for status output and hook environments.
    pub fn name(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Standby => "standby",
        }
    }
}

/// What a node persists per replicated volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplState {
    /// The role this node held last.
    pub role: Role,
    /// The epoch that role belongs to.
    pub epoch: u64,
    /// The other node of the pair.
    pub peer: String,
    /// Every epoch this node's data went through, oldest first.
    pub history: Vec<EpochStart>,
    /// False while a resync is needed or under way: the local copy may lack acknowledged
    /// writes or hold a discarded tail, so it must not be promoted.
    pub consistent: bool,
    /// The epoch in which this node (as standby) sent `Promote` to the witness and has not
    /// yet been promoted: after a restart it must not acknowledge the old primary until
    /// the witness answered (the grant may have been lost on the way back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote_sent_epoch: Option<u64>,
}

impl ReplState {
    /// Encodes the state as the framed file body.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec_pretty(self).expect("replication state always serializes");
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a state file, checking length, magic, version and crc before parsing.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let header = bytes.get(..HEADER_LEN).ok_or_else(|| format!("{} bytes, shorter than a header", bytes.len()))?;
        let field = |at: usize, len: usize| &header[at..at + len];
        if field(0, 4) != MAGIC {
            return Err("bad magic (not a replication state file)".into());
        }
        let version = u16::from_le_bytes([header[4], header[5]]);
        if version != VERSION {
            return Err(format!("unsupported version {version} (this build reads {VERSION})"));
        }
        if field(6, 2) != [0, 0] {
            return Err("reserved header bytes are not zero".into());
        }
        let len = u32::from_le_bytes(field(8, 4).try_into().map_err(|_| "header")?) as usize;
        let crc = u32::from_le_bytes(field(12, 4).try_into().map_err(|_| "header")?);
        if len > BODY_MAX || bytes.len() != HEADER_LEN + len {
            return Err(format!("body length {len} does not match the file ({} bytes)", bytes.len()));
        }
        let body = &bytes[HEADER_LEN..];
        let actual = crc32fast::hash(body);
        if actual != crc {
            return Err(format!("checksum mismatch: stored {crc:#010x}, computed {actual:#010x}"));
        }
        serde_json::from_slice(body).map_err(|e| format!("invalid body: {e}"))
    }

    /// Reads the state of the volume in `dir`; `Ok(None)` when there is none yet.
    pub fn load(dir: &Path) -> Result<Option<Self>, String> {
        let path = dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => Self::decode(&bytes).map(Some).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("failed to read {}: {e}", path.display())),
        }
    }

    /// Replaces the state file durably: after a crash it holds the old or the new state.
    pub fn store(&self, dir: &Path) -> std::io::Result<()> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&self.encode())?;
        // The new contents must be on disk before the rename can expose them.
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, &path)?;
        // The rename itself must survive a power cut.
        std::fs::File::open(dir)?.sync_all()
    }

    /// The seq at which the current epoch began on this node (1 for a fresh volume).
    pub fn epoch_start(&self) -> u64 {
        self.history.last().map_or(1, |e| e.start_seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ReplState {
        ReplState {
            role: Role::Standby,
            epoch: 3,
            peer: "b".into(),
            history: vec![
                EpochStart { epoch: 1, start_seq: 1, primary: "a".into() },
                EpochStart { epoch: 3, start_seq: 90, primary: "b".into() },
            ],
            consistent: false,
            promote_sent_epoch: Some(3),
        }
    }

    #[test]
    fn round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ReplState::load(dir.path()).unwrap(), None);
        sample().store(dir.path()).unwrap();
        assert_eq!(ReplState::load(dir.path()).unwrap(), Some(sample()));
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let bytes = sample().encode();
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            assert!(ReplState::decode(&bad).is_err(), "flip at {at} accepted");
        }
        for len in 0..bytes.len() {
            assert!(ReplState::decode(&bytes[..len]).is_err(), "truncation to {len} accepted");
        }
    }
}
