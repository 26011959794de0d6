//! Keel's snapshots and vaults: deduplicated, compressed, encrypted, incremental copies of
//! volumes. Nothing is implemented yet; the crate exists so the workspace shows the
//! architecture (`tools → {net, snapshot} → engine`). The engine already records snapshot
//! points ([`keel_engine::Volume::mark_snapshot`]) and tracks changed regions
//! ([`keel_engine::Volume::changed_since`]) for it.
#![warn(missing_docs)]
