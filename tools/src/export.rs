//! Serving an engine volume over NBD: the adapter from [`keel_engine::Volume`] to
//! [`keel_net::Export`].

use std::sync::Arc;

use keel_engine::{Error, PersistMode, Volume};
use keel_net::{Export, ExportError, ExportErrorKind};

/// A volume as an NBD export. FLUSH is the volume's group commit, which covers writes
/// from every connection, so the server may advertise `CAN_MULTI_CONN`.
#[derive(Debug)]
pub struct VolumeExport {
    volume: Arc<Volume>,
}

impl VolumeExport {
    /// Wraps an open volume.
    pub fn new(volume: Arc<Volume>) -> Self {
        Self { volume }
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
        self.volume.read(offset, buf).map_err(to_export_error)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        self.volume.write(offset, data, persist(fua)).map(drop).map_err(to_export_error)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_punch_hole: bool, fua: bool) -> Result<(), ExportError> {
        self.volume.write_zeroes(offset, len, may_punch_hole, persist(fua)).map(drop).map_err(to_export_error)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.volume.trim(offset, len, persist(fua)).map(drop).map_err(to_export_error)
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.volume.flush().map(drop).map_err(to_export_error)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, ExportError> {
        let extents = self.volume.allocation(offset, len).map_err(to_export_error)?;
        Ok(extents.into_iter().map(|e| (e.len, e.hole)).collect())
    }
}
