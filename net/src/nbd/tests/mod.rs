//! Tests that need a running server: a hand-written client over real
//! sockets, an in-memory export, and interop with qemu-io and nbdinfo.

pub(crate) mod client;
pub(crate) mod mem_export;

mod interop;
mod server;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::nbd::export::Export;
use crate::nbd::server::NbdServer;

/// A server on a Unix socket in a temporary directory.
pub(crate) struct TestServer {
    pub(crate) server: NbdServer,
    pub(crate) path: PathBuf,
    pub(crate) shutdown: CancellationToken,
    pub(crate) task: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub(crate) async fn start(exports: Vec<Arc<dyn Export>>) -> Self {
        let dir = tempfile::tempdir().expect("create temp dir");
        let path = dir.path().join("nbd.sock");
        let server = NbdServer::new(exports).expect("create server");
        let listener = server.bind_unix(&path).await.expect("bind unix socket");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(listener.serve(shutdown.clone()));
        Self { server, path, shutdown, task, _dir: dir }
    }

    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(10), self.task)
            .await
            .expect("server did not stop within 10 s")
            .expect("server task panicked");
    }
}
