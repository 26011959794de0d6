//! The few places where durability is decided, each with the reason for its sync.

use std::path::Path;
use std::sync::Arc;

use crate::storage::{Env, OpenMode, Storage};

/// How much durability a mutating call must reach before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersistMode {
    /// In the journal (visible to reads, ordered) but not yet synced: NBD's plain WRITE.
    Buffered,
    /// Synced to stable storage before returning: NBD's FUA.
    Durable,
}

/// Replaces `path` with `bytes` so that after a crash the file holds either the old or the
/// new contents, never a mix: write a temporary file, sync it (so the rename cannot expose
/// unwritten blocks), rename over the target, then sync the directory (so the rename
/// itself survives).
pub(crate) fn durable_replace(env: &dyn Env, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let file: Arc<dyn Storage> = env.open(&tmp, OpenMode::CreateIfMissing)?;
    file.set_len(0)?;
    file.write_at(bytes, 0)?;
    file.sync()?;
    drop(file);
    env.rename(&tmp, path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    env.sync_dir(dir)
}
