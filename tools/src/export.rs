//! Serving an engine volume over NBD: the adapter from [`keel_engine::Volume`] to
//! [`keel_net::Export`].

use std::sync::Arc;

use keel_engine::{Error, PersistMode, Volume};
use keel_net::repl::volume::ReplVolume;
use keel_net::{Export, ExportError, ExportErrorKind};

/// A volume as an NBD export. FLUSH is the volume's group commit, which covers writes
/// from every connection, so the server may advertise `CAN_MULTI_CONN`.
///
/// A replicated volume serves I/O only while this node is its primary, and a FLUSH (or a
/// FUA write) completes only when the replication layer confirms it: durable on the
/// standby too, or the witness recorded the standby Outdated.
#[derive(Debug)]
pub struct VolumeExport {
    volume: Arc<Volume>,
    repl: Option<Arc<ReplVolume>>,
}

impl VolumeExport {
    /// Wraps an open volume.
    pub fn new(volume: Arc<Volume>) -> Self {
        Self { volume, repl: None }
    }

    /// Wraps a replicated volume.
    pub fn replicated(repl: Arc<ReplVolume>) -> Self {
        Self { volume: Arc::clone(repl.volume()), repl: Some(repl) }
    }

    /// Refuses I/O unless this node may write the volume.
    fn gate(&self) -> Result<(), ExportError> {
        match &self.repl {
            Some(repl) => repl.check_writable().map_err(|e| ExportError::new(ExportErrorKind::Io, e)),
            None => Ok(()),
        }
    }

    /// Completes a write: with FUA, durable here and confirmed by replication.
    fn finish(&self, seq: u64, fua: bool) -> Result<(), ExportError> {
        match (&self.repl, fua) {
            (Some(repl), true) => {
                repl.request_sync(seq);
                self.volume.flush().map_err(to_export_error)?;
                repl.wait_replicated(seq).map_err(|e| ExportError::new(ExportErrorKind::Io, e))
            }
            _ => Ok(()),
        }
    }

    /// FUA is done by the volume itself only when nothing is replicated.
    fn local_persist(&self, fua: bool) -> PersistMode {
        if self.repl.is_some() {
            PersistMode::Buffered
        } else {
            persist(fua)
        }
    }
}

fn to_export_error(error: Error) -> ExportError {
    let kind = match &error {
        Error::OutOfRange { .. } | Error::InvalidArgument(_) => ExportErrorKind::InvalidArgument,
        // Poisoned, corrupt or failed I/O: the client sees EIO, the log has the detail.
        _ => ExportErrorKind::Io,
    };
    ExportError::new(kind, error.to_string())
}

fn persist(fua: bool) -> PersistMode {
    if fua {
        PersistMode::Durable
    } else {
        PersistMode::Buffered
    }
}

impl Export for VolumeExport {
    fn name(&self) -> &str {
        self.volume.name()
    }

    fn description(&self) -> String {
        format!("Keel volume {} ({})", self.volume.name(), crate::units::format_size(self.volume.size()))
    }

    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        if let Some(repl) = &self.repl {
            if repl.role() != keel_net::repl::state::Role::Primary {
                return Err(ExportError::new(
                    ExportErrorKind::Io,
                    format!("{}: this node is the standby", repl.name()),
                ));
            }
        }
        self.volume.read(offset, buf).map_err(to_export_error)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        self.gate()?;
        let seq = self.volume.write(offset, data, self.local_persist(fua)).map_err(to_export_error)?;
        self.finish(seq, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_punch_hole: bool, fua: bool) -> Result<(), ExportError> {
        self.gate()?;
        let seq =
            self.volume.write_zeroes(offset, len, may_punch_hole, self.local_persist(fua)).map_err(to_export_error)?;
        self.finish(seq, fua)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.gate()?;
        let seq = self.volume.trim(offset, len, self.local_persist(fua)).map_err(to_export_error)?;
        self.finish(seq, fua)
    }

    fn flush(&self) -> Result<(), ExportError> {
        let Some(repl) = &self.repl else {
            return self.volume.flush().map(drop).map_err(to_export_error);
        };
        // Every write answered before this FLUSH has a seq at or below the last one.
        let seq = self.volume.last_seq();
        repl.request_sync(seq);
        self.volume.flush().map_err(to_export_error)?;
        repl.wait_replicated(seq).map_err(|e| ExportError::new(ExportErrorKind::Io, e))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, ExportError> {
        let extents = self.volume.allocation(offset, len).map_err(to_export_error)?;
        Ok(extents.into_iter().map(|e| (e.len, e.hole)).collect())
    }
}
