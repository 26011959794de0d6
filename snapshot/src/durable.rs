//! The crate's fsync points, each with the reason it is needed.

use std::fs::File;
use std::path::Path;

use crate::error::StoreError;

/// Makes a file's contents durable before it is renamed into place (an object: a manifest,
/// a lease), so a crash can never leave a visible name pointing at unwritten or partial data.
pub(crate) fn fsync_file(file: &File, path: &Path) -> Result<(), StoreError> {
    file.sync_all().map_err(|source| StoreError::Io { op: "fsync temp file", path: path.to_owned(), source })
}

/// Makes a pack's frames durable before index records point at them, and an index log's
/// records durable before the chunks count as stored (the chunk store's batch commit,
/// docs/format-chunk.md). Data only: the files' sizes are part of what is synced, their
/// names by [`fsync_dir`].
pub(crate) fn fdatasync(file: &File, path: &Path, op: &'static str) -> Result<(), StoreError> {
    file.sync_data().map_err(|source| StoreError::Io { op, path: path.to_owned(), source })
}

/// Makes a directory's entries durable: after a rename (an object's name), a new pack or
/// index log, or a mkdir. Without it the name can vanish on power loss even though the
/// file's data was synced.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| StoreError::Io {
        op: "fsync directory",
        path: dir.to_owned(),
        source,
    })
}
