//! The crate's fsync points, each with the reason it is needed.

use std::fs::File;
use std::path::Path;

use crate::error::StoreError;

/// Makes a file's contents durable before it is renamed into place, so a crash can never
/// leave a visible chunk name pointing at unwritten or partial data.
pub(crate) fn fsync_file(file: &File, path: &Path) -> Result<(), StoreError> {
    file.sync_all().map_err(|source| StoreError::Io { op: "fsync chunk temp file", path: path.to_owned(), source })
}

/// Makes a directory's entries durable: after a rename (the chunk's name) or a mkdir (the
/// fan-out directory's name in its parent). Without it the name can vanish on power loss
/// even though the file's data was synced.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| StoreError::Io {
        op: "fsync directory",
        path: dir.to_owned(),
        source,
    })
}
