//! Mutual-TLS QUIC endpoints for node↔node (`keel-repl/1`) and node↔witness
//! (`keel-witness/1`) traffic, and the cluster's certificate authority.
//!
//! # Trust model
//!
//! A cluster has one private CA (`keel cert init`). Every node and the witness hold a
//! certificate issued by it (`keel cert issue NODE`) whose only DNS subjectAltName is the
//! node's name. A node is trusted as the name in its certificate, never by address.
//!
//! # Connection setup, step by step
//!
//! 1. The connecting side ([`connect`]) sends the peer's node name as SNI and offers
//!    the endpoint's ALPN strings. Its rustls checks that the server certificate chains
//!    to the cluster CA, is valid now, and names exactly that peer.
//! 2. The accepting side's rustls checks that the client certificate chains to the
//!    cluster CA and is valid now; our verifier wrapper then refuses any node that is
//!    not in the endpoint's `allowed_peers`. ALPN must overlap or the handshake fails.
//! 3. [`accept`] reads the peer's name from its certificate and checks it against the
//!    caller's `allowed_peers` (which may be narrower than the endpoint's). It refuses by
//!    closing the connection with [`CLOSE_REFUSED`] and a reason; otherwise it admits the
//!    peer by opening a unidirectional stream carrying the single byte [`ADMITTED`].
//! 4. [`connect`] returns only once it has read that byte. In TLS 1.3 the client
//!    finishes its handshake before the server has verified the client certificate,
//!    so without step 3 a refused client would see a connection that works for a
//!    moment and then closes; with it, `connect` fails with the server's reason.
//!
//! Resumption is disabled on both sides so that every connection re-runs the checks
//! above (a resumed TLS 1.3 session skips certificate verification).
//!
//! # Failure detection
//!
//! Both sides send keep-alives every [`TransportConfig::keep_alive`] and drop the
//! connection after [`TransportConfig::idle_timeout`] without packets
//! ([`quinn::ConnectionError::TimedOut`]). A peer that keeps ACKing but stops
//! processing (for example stuck in fsync) is not detected here: the replication
//! protocol has its own acknowledgement deadlines.

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerifier as _};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, SignatureScheme};

/// Application close code: the accepting side refused this peer (the reason says why).
pub const CLOSE_REFUSED: u32 = 1;
/// The byte [`accept`] sends on its first unidirectional stream to admit a peer.
pub const ADMITTED: u8 = 1;
/// How long [`connect`] waits for the handshake and the peer's admission together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// File name of the cluster CA certificate, in the CA directory and in each node's.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the cluster CA private key (only in the CA directory).
pub const CA_KEY_FILE: &str = "ca.key";
/// Default validity of a cluster CA: 10 years.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default validity of a node certificate: 2 years.
pub const NODE_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Longest accepted validity, so that `now + validity` stays far from the X.509 date limit.
pub const VALIDITY_MAX: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Certificates start being valid this long before they are issued, so that a node whose
/// clock lags the issuer's accepts a fresh certificate.
const BACKDATE: Duration = Duration::from_secs(3600);
/// Before the first RTT sample; one data centre, so far below QUIC's 333 ms default.
const INITIAL_RTT: Duration = Duration::from_millis(1);
/// Longest node name: one DNS label.
const NODE_NAME_LEN_MAX: usize = 63;

/// Everything that can go wrong setting up QUIC endpoints, connections and certificates.
///
/// Each message already includes the underlying error (so `source()` is `None` and
/// `anyhow`'s `{:#}` does not repeat it); the variants keep it for matching.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("failed to read {}: {error}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        error: io::Error,
    },
    /// A file or directory could not be written.
    #[error("failed to write {}: {error}", path.display())]
    WriteFile {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        error: io::Error,
    },
    /// A file that would be overwritten already exists.
    #[error("{} already exists; remove it first to replace it", path.display())]
    AlreadyExists {
        /// The file.
        path: PathBuf,
    },
    /// A PEM file does not hold what it should, or a certificate is unusable.
    #[error("{}: {reason}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A node name is not a valid DNS label.
    #[error(
        "invalid node name {name:?}: {reason} (use 1-63 lowercase letters, digits and '-', starting with a letter)"
    )]
    InvalidNodeName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The requested certificate validity is zero or longer than [`VALIDITY_MAX`].
    #[error("invalid certificate validity of {validity:?}: must be between 1 s and 100 years")]
    InvalidValidity {
        /// The requested validity.
        validity: Duration,
    },
    /// rcgen failed to generate a key or a certificate.
    #[error("failed to generate {what}: {error}")]
    Generate {
        /// What was being generated ("CA key", "certificate for node \"a\"").
        what: String,
        /// The underlying error.
        error: rcgen::Error,
    },
    /// The transport or TLS settings are inconsistent.
    #[error("invalid QUIC/TLS configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// The UDP socket could not be created, configured or bound.
    #[error("failed to bind UDP socket on {addr}: {error}")]
    Bind {
        /// The requested address.
        addr: SocketAddr,
        /// The underlying error.
        error: io::Error,
    },
    /// An outgoing connection could not be started (bad peer name, endpoint closed).
    #[error("failed to connect to {peer} at {addr}: {error}")]
    StartConnect {
        /// The peer's node name.
        peer: String,
        /// The peer's address.
        addr: SocketAddr,
        /// The underlying error.
        error: quinn::ConnectError,
    },
    /// An outgoing connection failed: handshake error (the peer's certificate was rejected
    /// here, or no ALPN in common), timeout or loss.
    #[error("failed to connect to {peer} at {addr}: {error}")]
    Connect {
        /// The peer's node name.
        peer: String,
        /// The peer's address.
        addr: SocketAddr,
        /// The underlying error.
        error: quinn::ConnectionError,
    },
    /// The peer refused this node (its TLS verifier rejected our certificate, or its
    /// [`accept`] refused our name); `reason` is the peer's.
    #[error("{peer} at {addr} refused this node: {reason}")]
    Refused {
        /// The peer's node name.
        peer: String,
        /// The peer's address.
        addr: SocketAddr,
        /// The peer's reason, as received.
        reason: String,
    },
    /// The peer completed the handshake but did not admit or refuse this node in time.
    #[error("{peer} at {addr} did not admit this node within {timeout:?}; is it a Keel node of the same version?")]
    ConnectTimeout {
        /// The peer's node name.
        peer: String,
        /// The peer's address.
        addr: SocketAddr,
        /// How long [`connect`] waited.
        timeout: Duration,
    },
    /// An incoming connection failed during the handshake: the peer's certificate was
    /// rejected (another CA, expired, a node not allowed on this endpoint), no ALPN in
    /// common, or the peer went away.
    #[error("failed to accept connection from {addr}: {error}")]
    Accept {
        /// The peer's address.
        addr: SocketAddr,
        /// The underlying error.
        error: quinn::ConnectionError,
    },
    /// The peer's certificate names a node that is not an allowed peer.
    #[error("connection from {addr}: node {name:?} is not an allowed peer (allowed: {allowed:?})")]
    PeerNotAllowed {
        /// The peer's address.
        addr: SocketAddr,
        /// The node name in the peer's certificate.
        name: String,
        /// The names that would have been accepted.
        allowed: Vec<String>,
    },
    /// The peer's certificate does not carry exactly one node name.
    #[error("connection from {addr}: unusable peer certificate: {reason}")]
    PeerIdentity {
        /// The peer's address.
        addr: SocketAddr,
        /// What is wrong with it.
        reason: String,
    },
}

/// PEM files of one node's identity: the cluster CA certificate, the node certificate and
/// its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate (`ca.pem`); every certificate in it is trusted, so
    /// during a CA rotation it can hold the old and the new CA.
    pub ca_cert: PathBuf,
    /// The node certificate (`NODE.pem`); may be followed by intermediate certificates.
    pub cert: PathBuf,
    /// The node's private key (`NODE.key`, PKCS#8).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files `keel cert issue NODE --out DIR` writes: `DIR/ca.pem`, `DIR/NODE.pem`,
    /// `DIR/NODE.key`.
    pub fn in_dir(dir: &Path, node: &str) -> Self {
        Self {
            ca_cert: dir.join(CA_CERT_FILE),
            cert: dir.join(format!("{node}.pem")),
            key: dir.join(format!("{node}.key")),
        }
    }
}

/// One node's TLS identity, loaded and checked: the node name (its certificate's DNS
/// subjectAltName), the cluster CA roots, the certificate chain and the private key.
pub struct Identity {
    name: String,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Loads and checks the files: the key must match the certificate, the certificate
    /// must name one valid node and chain to the CA. An expired or not yet valid
    /// certificate only logs a warning here (peers will refuse it).
    pub fn load(files: &TlsFiles) -> Result<Self, Error> {
        let ca_certs = read_certs(&files.ca_cert)?;
        let mut roots = RootCertStore::empty();
        for ca in ca_certs {
            roots.add(ca).map_err(|e| bad_file(&files.ca_cert, format!("not a usable CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let chain = read_certs(&files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| pem_error(&files.key, "a private key", e))?;

        let end_entity = chain.first().ok_or_else(|| bad_file(&files.cert, "no certificate in the file".into()))?;
        let name = certificate_node_name(end_entity).map_err(|reason| bad_file(&files.cert, reason))?;
        validate_node_name(&name).map_err(|e| bad_file(&files.cert, e.to_string()))?;

        let provider = provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| bad_file(&files.key, format!("unusable private key: {e}")))?;
        rustls::sign::CertifiedKey::new(chain.clone(), signing_key).keys_match().map_err(|e| {
            bad_file(&files.key, format!("does not belong to the certificate in {}: {e}", files.cert.display()))
        })?;

        let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider)
            .build()
            .map_err(|e| bad_file(&files.ca_cert, format!("cannot build a verifier: {e}")))?;
        let server_name =
            ServerName::try_from(name.clone()).map_err(|e| bad_file(&files.cert, format!("bad name {name:?}: {e}")))?;
        let intermediates = chain.get(1..).unwrap_or_default();
        match verifier.verify_server_cert(end_entity, intermediates, &server_name, &[], UnixTime::now()) {
            Ok(_) => {}
            Err(rustls::Error::InvalidCertificate(
                e @ (CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. }),
            )) => {
                tracing::warn!(
                    "certificate {} of node {name:?}: {e}; peers will refuse it until a new one is issued (keel cert issue)",
                    files.cert.display()
                );
            }
            Err(e) => {
                return Err(bad_file(
                    &files.cert,
                    format!("not usable with the CA in {}: {e}", files.ca_cert.display()),
                ))
            }
        }
        Ok(Self { name, roots, chain, key })
    }

    /// The node name in this identity's certificate.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("name", &self.name).finish_non_exhaustive()
    }
}

/// Transport settings shared by both directions of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportConfig {
    /// A connection without any packet for this long is dead (`TimedOut`). The
    /// effective value is the smaller of the two peers'.
    pub idle_timeout: Duration,
    /// Interval of keep-alive packets; must be well below `idle_timeout` so that a
    /// single lost packet does not kill the connection.
    pub keep_alive: Duration,
    /// Flow-control window of each stream: how far the peer may send ahead of this
    /// side's reader. The journal is one stream, so this bounds a stalled standby.
    pub stream_window: u64,
    /// Unacknowledged bytes this side may have in flight: its memory bound per connection.
    pub send_window: u64,
    /// Bytes the peer may have in flight towards this side, all streams together.
    pub receive_window: u64,
    /// SO_RCVBUF and SO_SNDBUF of the UDP socket. Linux's default (~208 KiB) drops
    /// thousands of packets per GiB on loopback; the kernel caps this at
    /// `net.core.rmem_max`/`wmem_max`.
    pub socket_buffer: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(1),
            keep_alive: Duration::from_millis(200),
            stream_window: 16 << 20,
            send_window: 64 << 20,
            receive_window: 64 << 20,
            socket_buffer: 4 << 20,
        }
    }
}

/// Creates one UDP endpoint on `bind` that both accepts and initiates connections:
/// mutual TLS 1.3 against the cluster CA in `identity`, the ALPN strings `alpn` (the
/// protocols define them: `keel-repl/1`, `keel-witness/1`), accepting connections only
/// from nodes named in `allowed_peers`.
///
/// Must be called inside a tokio runtime (the endpoint's driver is spawned on it).
pub fn endpoint(
    bind: SocketAddr,
    identity: &Identity,
    config: &TransportConfig,
    alpn: &[&[u8]],
    allowed_peers: Vec<String>,
) -> Result<quinn::Endpoint, Error> {
    if alpn.is_empty() {
        return Err(Error::Config { reason: "no ALPN protocol given".into() });
    }
    let transport = quinn_transport(config)?;
    let provider = provider();
    let tls = |e: rustls::Error| Error::Config { reason: format!("TLS: {e}") };
    let alpn_protocols: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();

    let client_verifier = WebPkiClientVerifier::builder_with_provider(identity.roots.clone(), provider.clone())
        .build()
        .map_err(|e| Error::Config { reason: format!("client verifier: {e}") })?;
    let client_verifier = Arc::new(AllowedClients { inner: client_verifier, allowed: allowed_peers });
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(tls)?;
    server_tls.alpn_protocols = alpn_protocols.clone();
    server_tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server_tls.send_tls13_tickets = 0;
    let server_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)
        .map_err(|e| Error::Config { reason: format!("QUIC server: {e}") })?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server_config.transport_config(transport.clone());
    // A peer is identified by its certificate, and its address is logged with every
    // refusal: keep it fixed for the connection's life.
    server_config.migration(false);

    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_root_certificates(identity.roots.clone())
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(tls)?;
    client_tls.alpn_protocols = alpn_protocols;
    client_tls.resumption = rustls::client::Resumption::disabled();
    let client_crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)
        .map_err(|e| Error::Config { reason: format!("QUIC client: {e}") })?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(client_crypto));
    client_config.transport_config(transport);

    let socket = udp_socket(bind, config.socket_buffer)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let mut endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server_config), socket, runtime)
        .map_err(|error| Error::Bind { addr: bind, error })?;
    endpoint.set_default_client_config(client_config);
    Ok(endpoint)
}

/// Connects to `addr`, expecting the peer's certificate to name `peer`, and waits until
/// the peer has admitted this node (see the module docs), at most [`CONNECT_TIMEOUT`].
///
/// Cancel-safe: dropping the future abandons the connection.
pub async fn connect(endpoint: &quinn::Endpoint, addr: SocketAddr, peer: &str) -> Result<quinn::Connection, Error> {
    let connecting =
        endpoint.connect(addr, peer).map_err(|error| Error::StartConnect { peer: peer.to_owned(), addr, error })?;
    let admitted = async {
        let conn = connecting.await.map_err(|error| Error::Connect { peer: peer.to_owned(), addr, error })?;
        let refused = |e: quinn::ConnectionError| refusal(peer, addr, e);
        let mut stream = conn.accept_uni().await.map_err(refused)?;
        let mut byte = [0u8; 1];
        match stream.read_exact(&mut byte).await {
            Ok(()) if byte == [ADMITTED] => Ok(conn),
            Ok(()) => Err(Error::Refused {
                peer: peer.to_owned(),
                addr,
                reason: format!("unexpected admission byte {:#04x}", byte[0]),
            }),
            Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e))) => Err(refused(e)),
            Err(e) => Err(Error::Refused { peer: peer.to_owned(), addr, reason: format!("admission stream: {e}") }),
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, admitted).await.unwrap_or(Err(Error::ConnectTimeout {
        peer: peer.to_owned(),
        addr,
        timeout: CONNECT_TIMEOUT,
    }))
}

/// Completes an incoming connection and returns it with the peer's verified node name.
///
/// Refuses a peer whose certificate comes from another CA or is expired or not yet
/// valid (rustls, during the handshake) and a peer whose name is not in `allowed_peers`
/// (closing with [`CLOSE_REFUSED`] and the reason). Every failure is logged here as one
/// line naming the address and the reason, so callers need not log it again.
///
/// Cancel-safe: dropping the future abandons the connection.
pub async fn accept(incoming: quinn::Incoming, allowed_peers: &[String]) -> Result<(quinn::Connection, String), Error> {
    let addr = incoming.remote_address();
    let result = admit(incoming, allowed_peers).await;
    match &result {
        Ok((_, name)) => tracing::debug!("accepted connection from {name} at {addr}"),
        Err(e) => tracing::warn!("refused connection: {e}"),
    }
    result
}

/// The node name in the peer's certificate, once the handshake has completed; `None`
/// if there is no certificate or it does not name exactly one node.
pub fn peer_name(conn: &quinn::Connection) -> Option<String> {
    peer_certificate_name(conn).ok()
}

/// The ALPN protocol negotiated on `conn` (one of the endpoint's `alpn` strings).
pub fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?.protocol
}

/// Checks that `name` can be a node name: one DNS label of 1-63 lowercase letters,
/// digits and '-', starting with a letter and not ending with '-'.
pub fn validate_node_name(name: &str) -> Result<(), Error> {
    let invalid = |reason| Err(Error::InvalidNodeName { name: name.to_owned(), reason });
    let Some(first) = name.bytes().next() else {
        return invalid("empty");
    };
    if name.len() > NODE_NAME_LEN_MAX {
        return invalid("longer than 63 characters");
    }
    if !first.is_ascii_lowercase() {
        return invalid("does not start with a lowercase letter");
    }
    if name.ends_with('-') {
        return invalid("ends with '-'");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return invalid("contains a character other than a-z, 0-9 and '-'");
    }
    Ok(())
}

/// Creates a cluster CA in `dir` (created if missing, mode 0700): `ca.pem` and `ca.key`
/// (mode 0600). Refuses to overwrite an existing CA.
pub fn create_ca(dir: &Path, cluster_name: &str, validity: Duration) -> Result<(), Error> {
    let now = SystemTime::now();
    create_ca_with_validity(dir, cluster_name, now - BACKDATE, valid_until(now, validity)?)
}

/// Issues a certificate for `node` from the CA in `ca_dir` and writes `NODE.pem` and
/// `NODE.key` (mode 0600) into `out_dir`, plus a copy of `ca.pem` when `out_dir` is
/// another directory, so that `out_dir` is all a node needs. DNS subjectAltName = `node`,
/// extended key usage server and client authentication. Refuses to overwrite.
pub fn issue_cert(ca_dir: &Path, node: &str, out_dir: &Path, validity: Duration) -> Result<TlsFiles, Error> {
    let now = SystemTime::now();
    issue_cert_with_validity(ca_dir, node, out_dir, now - BACKDATE, valid_until(now, validity)?)
}

fn valid_until(now: SystemTime, validity: Duration) -> Result<SystemTime, Error> {
    if validity.is_zero() || validity > VALIDITY_MAX {
        return Err(Error::InvalidValidity { validity });
    }
    Ok(now + validity)
}

fn create_ca_with_validity(
    dir: &Path,
    cluster_name: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), Error> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    refuse_existing(&[&cert_path, &key_path])?;
    let generate = |error| Error::Generate { what: format!("CA for cluster {cluster_name:?}"), error };
    let key = KeyPair::generate().map_err(generate)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    params.distinguished_name.push(DnType::CommonName, format!("Keel cluster CA {cluster_name}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, not_before, not_after)?;
    let cert = params.self_signed(&key).map_err(generate)?;

    create_dir(dir)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    sync_dir(dir)
}

fn issue_cert_with_validity(
    ca_dir: &Path,
    node: &str,
    out_dir: &Path,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<TlsFiles, Error> {
    validate_node_name(node)?;
    let files = TlsFiles::in_dir(out_dir, node);
    refuse_existing(&[&files.cert, &files.key])?;
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_pem = read_to_string(&ca_cert_path)?;
    let ca_key = KeyPair::from_pem(&read_to_string(&ca_key_path)?)
        .map_err(|e| bad_file(&ca_key_path, format!("not a CA private key: {e}")))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .map_err(|e| bad_file(&ca_cert_path, format!("not a CA certificate: {e}")))?;
    // A copy of a CA certificate that is not this one would make the node trust another cluster.
    let copy_ca = files.ca_cert != ca_cert_path;
    if copy_ca && files.ca_cert.exists() && read_to_string(&files.ca_cert)? != ca_pem {
        return Err(bad_file(&files.ca_cert, format!("differs from {}; remove it first", ca_cert_path.display())));
    }

    let generate = |error| Error::Generate { what: format!("certificate for node {node:?}"), error };
    let key = KeyPair::generate().map_err(generate)?;
    let mut params = CertificateParams::new(vec![node.to_owned()]).map_err(generate)?;
    params.distinguished_name.push(DnType::CommonName, node);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, not_before, not_after)?;
    let cert = params.signed_by(&key, &issuer).map_err(generate)?;

    create_dir(out_dir)?;
    write_new(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&files.cert, cert.pem().as_bytes(), 0o644)?;
    if copy_ca && !files.ca_cert.exists() {
        write_new(&files.ca_cert, ca_pem.as_bytes(), 0o644)?;
    }
    sync_dir(out_dir)?;
    Ok(files)
}

/// rustls with ring, explicitly: never the process-wide default provider.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn quinn_transport(config: &TransportConfig) -> Result<Arc<quinn::TransportConfig>, Error> {
    let invalid = |reason: String| Error::Config { reason };
    if config.keep_alive.is_zero() || config.keep_alive >= config.idle_timeout {
        return Err(invalid(format!(
            "keep_alive ({:?}) must be non-zero and below idle_timeout ({:?})",
            config.keep_alive, config.idle_timeout
        )));
    }
    let varint = |what: &str, value: u64| {
        quinn::VarInt::from_u64(value).map_err(|_| invalid(format!("{what} of {value} is too large")))
    };
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(config.idle_timeout)
                .map_err(|_| invalid(format!("idle_timeout {:?} is too large", config.idle_timeout)))?,
        ))
        .keep_alive_interval(Some(config.keep_alive))
        .initial_rtt(INITIAL_RTT)
        .stream_receive_window(varint("stream_window", config.stream_window)?)
        .receive_window(varint("receive_window", config.receive_window)?)
        .send_window(config.send_window);
    Ok(Arc::new(transport))
}

/// A non-blocking UDP socket with the requested buffer sizes, as quinn wants it.
fn udp_socket(bind: SocketAddr, buffer: usize) -> Result<std::net::UdpSocket, Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let fail = |error| Error::Bind { addr: bind, error };
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP)).map_err(fail)?;
    socket.set_recv_buffer_size(buffer).map_err(fail)?;
    socket.set_send_buffer_size(buffer).map_err(fail)?;
    // Linux reports twice the value it granted; anything below the request means the
    // sysctl cap applied.
    let granted = socket.recv_buffer_size().map_err(fail)?.min(socket.send_buffer_size().map_err(fail)?);
    if granted < buffer {
        tracing::warn!(
            "UDP socket buffers on {bind} are {granted} bytes, less than the {buffer} requested; raise \
             net.core.rmem_max and net.core.wmem_max to avoid packet loss"
        );
    }
    socket.set_nonblocking(true).map_err(fail)?;
    socket.bind(&bind.into()).map_err(fail)?;
    Ok(socket.into())
}

async fn admit(incoming: quinn::Incoming, allowed_peers: &[String]) -> Result<(quinn::Connection, String), Error> {
    let addr = incoming.remote_address();
    let accept_error = |error| Error::Accept { addr, error };
    let conn = incoming.accept().map_err(accept_error)?.await.map_err(accept_error)?;
    let name = match peer_certificate_name(&conn) {
        Ok(name) => name,
        Err(reason) => {
            refuse(&conn, &format!("unusable certificate: {reason}"));
            return Err(Error::PeerIdentity { addr, reason });
        }
    };
    if !allowed_peers.contains(&name) {
        refuse(&conn, &format!("node {name:?} is not an allowed peer"));
        return Err(Error::PeerNotAllowed { addr, name, allowed: allowed_peers.to_vec() });
    }
    let mut stream = conn.open_uni().await.map_err(accept_error)?;
    // `write_all` is not cancel-safe, but cancelling here drops the connection anyway.
    match stream.write_all(&[ADMITTED]).await {
        Ok(()) => {}
        Err(quinn::WriteError::ConnectionLost(error)) => return Err(accept_error(error)),
        Err(e) => return Err(Error::PeerIdentity { addr, reason: format!("peer stopped the admission stream: {e}") }),
    }
    // Only fails if the stream was already finished or reset.
    let _ = stream.finish();
    Ok((conn, name))
}

/// Closes `conn` with [`CLOSE_REFUSED`] and `reason` for the peer's error message.
fn refuse(conn: &quinn::Connection, reason: &str) {
    conn.close(quinn::VarInt::from_u32(CLOSE_REFUSED), reason.as_bytes());
}

/// Turns the error that ended a connection while waiting for admission into a refusal
/// carrying the peer's reason where it sent one.
fn refusal(peer: &str, addr: SocketAddr, error: quinn::ConnectionError) -> Error {
    let reason = match &error {
        quinn::ConnectionError::ApplicationClosed(close) => String::from_utf8_lossy(&close.reason).into_owned(),
        quinn::ConnectionError::ConnectionClosed(close) => close.to_string(),
        _ => return Error::Connect { peer: peer.to_owned(), addr, error },
    };
    Error::Refused { peer: peer.to_owned(), addr, reason }
}

fn peer_certificate_name(conn: &quinn::Connection) -> Result<String, String> {
    let identity = conn.peer_identity().ok_or("no peer certificate")?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().map_err(|_| "not an X.509 certificate chain")?;
    certificate_node_name(chain.first().ok_or("empty certificate chain")?)
}

/// The single DNS subjectAltName of a certificate: the node name.
fn certificate_node_name(der: &CertificateDer<'_>) -> Result<String, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("cannot parse certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("no subjectAltName in the certificate")?;
    let mut names = san.value.general_names.iter().filter_map(|name| match name {
        GeneralName::DNSName(dns) => Some(*dns),
        _ => None,
    });
    match (names.next(), names.next()) {
        (Some(name), None) => Ok(name.to_owned()),
        (None, _) => Err("no DNS name in the certificate's subjectAltName".into()),
        (Some(_), Some(_)) => Err("more than one DNS name in the certificate's subjectAltName".into()),
    }
}

/// The client-certificate verifier of an endpoint: rustls' WebPKI verifier against the
/// cluster CA, then the node name against the endpoint's allowed peers.
#[derive(Debug)]
struct AllowedClients {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CertificateRefusal(String);

impl ClientCertVerifier for AllowedClients {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let refuse = |reason: String| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(CertificateRefusal(reason)))))
        };
        let name = certificate_node_name(end_entity).map_err(refuse)?;
        if !self.allowed.contains(&name) {
            return Err(refuse(format!("node {name} is not an allowed peer of this endpoint")));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Sets rcgen's validity without naming the `time` crate's types.
fn set_validity(params: &mut CertificateParams, not_before: SystemTime, not_after: SystemTime) -> Result<(), Error> {
    let since_epoch = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH).map_err(|_| Error::Config { reason: "certificate validity before 1970".into() })
    };
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since_epoch(not_before)?;
    params.not_after = epoch + since_epoch(not_after)?;
    Ok(())
}

fn read_to_string(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|error| Error::ReadFile { path: path.to_owned(), error })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bytes = fs::read(path).map_err(|error| Error::ReadFile { path: path.to_owned(), error })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, "certificates", e))?;
    if certs.is_empty() {
        return Err(bad_file(path, "no PEM certificate in the file".into()));
    }
    Ok(certs)
}

fn pem_error(path: &Path, what: &str, error: rustls::pki_types::pem::Error) -> Error {
    match error {
        rustls::pki_types::pem::Error::Io(error) => Error::ReadFile { path: path.to_owned(), error },
        e => bad_file(path, format!("expected {what} in PEM: {e:?}")),
    }
}

fn bad_file(path: &Path, reason: String) -> Error {
    Error::BadFile { path: path.to_owned(), reason }
}

fn refuse_existing(paths: &[&Path]) -> Result<(), Error> {
    match paths.iter().find(|path| path.exists()) {
        Some(path) => Err(Error::AlreadyExists { path: path.to_path_buf() }),
        None => Ok(()),
    }
}

fn create_dir(dir: &Path) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|error| Error::WriteFile { path: dir.to_owned(), error })
}

/// Writes a new file and fsyncs it: a CA key lost to a crash after `keel cert init`
/// reported success would orphan every certificate issued from it.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let fail = |error| Error::WriteFile { path: path.to_owned(), error };
    let mut file =
        fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => Error::AlreadyExists { path: path.to_owned() },
            _ => fail(e),
        })?;
    file.write_all(contents).map_err(fail)?;
    file.sync_all().map_err(fail)
}

/// Makes the new directory entries durable.
fn sync_dir(dir: &Path) -> Result<(), Error> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|error| Error::WriteFile { path: dir.to_owned(), error })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::net::UdpSocket;
    use tokio::task::JoinHandle;

    use super::*;

    const ALPN_REPL: &[u8] = b"keel-repl/1";
    const ALPN_WITNESS: &[u8] = b"keel-witness/1";

    /// Generous bound on anything that should happen within a few round trips or one
    /// idle timeout; the tests never sleep.
    const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// A cluster CA in `dir/ca` with nodes alice, bob and carol in `dir/nodes`, and a
    /// second cluster's CA in `dir/other-ca` with its own "bob" in `dir/other`.
    struct Setup {
        dir: tempfile::TempDir,
        alice: Identity,
        bob: Identity,
        carol: Identity,
    }

    impl Setup {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let ca = dir.path().join("ca");
            create_ca(&ca, "test", CA_VALIDITY).expect("create CA");
            let nodes = dir.path().join("nodes");
            let issue = |node: &str| {
                Identity::load(&issue_cert(&ca, node, &nodes, NODE_VALIDITY).expect("issue")).expect("load")
            };
            let (alice, bob, carol) = (issue("alice"), issue("bob"), issue("carol"));
            Self { dir, alice, bob, carol }
        }

        fn ca_dir(&self) -> PathBuf {
            self.dir.path().join("ca")
        }

        /// "bob" with a certificate from another cluster's CA, trusting this cluster's CA:
        /// an impostor that knows the (public) CA certificate and the name.
        fn impostor(&self) -> Identity {
            let other_ca = self.dir.path().join("other-ca");
            create_ca(&other_ca, "other", CA_VALIDITY).expect("create CA");
            let files = issue_cert(&other_ca, "bob", &self.dir.path().join("other"), NODE_VALIDITY).expect("issue");
            let own = Identity::load(&files).expect("consistent in its own cluster");
            Identity { roots: self.alice.roots.clone(), ..own }
        }

        /// "bob" with a certificate of this cluster that expired yesterday.
        fn expired_bob(&self) -> Identity {
            let now = SystemTime::now();
            let out = self.dir.path().join("expired");
            let files = issue_cert_with_validity(&self.ca_dir(), "bob", &out, now - 2 * DAY, now - DAY).expect("issue");
            Identity::load(&files).expect("an expired certificate loads with a warning")
        }
    }

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn local_endpoint(identity: &Identity, allowed: &[&str], alpn: &[u8]) -> quinn::Endpoint {
        let bind = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        endpoint(bind, identity, &TransportConfig::default(), &[alpn], names(allowed)).expect("endpoint")
    }

    /// One connection attempt: `client` connects to `server` (at `addr`) expecting node
    /// `peer`, while `server` accepts with `accept_allowed`.
    async fn attempt(
        server: &quinn::Endpoint,
        client: &quinn::Endpoint,
        addr: SocketAddr,
        peer: &str,
        accept_allowed: &[&str],
    ) -> (Result<(quinn::Connection, String), Error>, Result<quinn::Connection, Error>) {
        let accept_allowed = names(accept_allowed);
        let server_side = async {
            let incoming = server.accept().await.expect("endpoint open");
            accept(incoming, &accept_allowed).await
        };
        let both = async { tokio::join!(server_side, connect(client, addr, peer)) };
        tokio::time::timeout(EVENT_TIMEOUT, both).await.expect("connection attempt ends")
    }

    #[tokio::test]
    async fn good_pair_exchanges_a_bi_stream() {
        let setup = Setup::new();
        let server = local_endpoint(&setup.alice, &["bob"], ALPN_REPL);
        let client = local_endpoint(&setup.bob, &["alice"], ALPN_REPL);
        let addr = server.local_addr().expect("addr");

        let (accepted, connected) = attempt(&server, &client, addr, "alice", &["bob"]).await;
        let (server_conn, name) = accepted.expect("server accepts bob");
        let client_conn = connected.expect("bob connects");
        assert_eq!(name, "bob");
        assert_eq!(peer_name(&server_conn).as_deref(), Some("bob"));
        assert_eq!(peer_name(&client_conn).as_deref(), Some("alice"));
        assert_eq!(alpn(&server_conn).as_deref(), Some(ALPN_REPL));
        assert_eq!(alpn(&client_conn).as_deref(), Some(ALPN_REPL));

        let echo = tokio::spawn(async move {
            let (mut send, mut recv) = server_conn.accept_bi().await.expect("accept bi");
            let request = recv.read_to_end(1024).await.expect("read request");
            send.write_all(&[b"re: ".as_slice(), &request].concat()).await.expect("write reply");
            send.finish().expect("finish");
            server_conn.closed().await
        });
        let (mut send, mut recv) = client_conn.open_bi().await.expect("open bi");
        send.write_all(b"ping").await.expect("write");
        send.finish().expect("finish");
        let reply = tokio::time::timeout(EVENT_TIMEOUT, recv.read_to_end(1024)).await.expect("reply in time");
        assert_eq!(reply.expect("read reply"), b"re: ping");

        client_conn.close(quinn::VarInt::from_u32(0), b"done");
        let closed = tokio::time::timeout(EVENT_TIMEOUT, echo).await.expect("server sees the close").expect("join");
        assert!(
            matches!(closed, quinn::ConnectionError::ApplicationClosed(ref c) if &c.reason[..] == b"done"),
            "{closed}"
        );
    }

    #[tokio::test]
    async fn client_from_another_ca_is_refused() {
        let setup = Setup::new();
        let server = local_endpoint(&setup.alice, &["bob"], ALPN_REPL);
        let client = local_endpoint(&setup.impostor(), &["alice"], ALPN_REPL);
        let addr = server.local_addr().expect("addr");

        let (accepted, connected) = attempt(&server, &client, addr, "alice", &["bob"]).await;
        let accepted = accepted.expect_err("server refuses the impostor");
        assert!(matches!(accepted, Error::Accept { .. }), "{accepted}");
        assert!(accepted.to_string().contains("UnknownIssuer"), "{accepted}");
        let connected = connected.expect_err("the impostor is told");
        assert!(matches!(connected, Error::Refused { .. }), "{connected}");
    }

    #[tokio::test]
    async fn server_from_another_ca_is_refused() {
        let setup = Setup::new();
        let server = local_endpoint(&setup.impostor(), &["alice"], ALPN_REPL);
        let client = local_endpoint(&setup.alice, &["bob"], ALPN_REPL);
        let addr = server.local_addr().expect("addr");

        let (accepted, connected) = attempt(&server, &client, addr, "bob", &["alice"]).await;
        let connected = connected.expect_err("alice refuses the impostor");
        assert!(matches!(connected, Error::Connect { .. }), "{connected}");
        assert!(connected.to_string().contains("UnknownIssuer"), "{connected}");
        assert!(matches!(accepted, Err(Error::Accept { .. })), "{accepted:?}");
    }

    #[tokio::test]
    async fn expired_client_certificate_is_refused() {
        let setup = Setup::new();
        let server = local_endpoint(&setup.alice, &["bob"], ALPN_REPL);
        let client = local_endpoint(&setup.expired_bob(), &["alice"], ALPN_REPL);
        let addr = server.local_addr().expect("addr");

        let (accepted, connected) = attempt(&server, &client, addr, "alice", &["bob"]).await;
        let accepted = accepted.expect_err("server refuses an expired certificate");
        assert!(accepted.to_string().contains("expired"), "{accepted}");
        assert!(matches!(connected, Err(Error::Refused { .. })), "{connected:?}");
    }

    #[tokio::test]
    async fn expired_server_certificate_is_refused() {
        let setup = Setup::new();
        let server = local_endpoint(&setup.expired_bob(), &["alice"], ALPN_REPL);
        let client = local_endpoint(&setup.alice, &["bob"], ALPN_REPL);
        let addr = server.local_addr().expect("addr");

        let (accepted, connected) = attempt(&server, &client, addr, "bob", &["alice"]).await;
        let connected = connected.expect_err("alice refuses an expired certificate");
        assert!(matches!(connected, Error::Connect { .. }), "{connected}");
        assert!(connected.to_string().contains("expired"), "{connected}");
        assert!(matches!(accepted, Err(Error::Accept { .. })), "{accepted:?}");
    }

    #[tokio::test]
    async fn node_not_allowed_by_the_endpoint_is_refused_in_the_handshake() {
        let setup = Setup::new();
        let server = local_endpoint(&setup.alice, &["bob"], ALPN_REPL);
        let client = local_endpoint(&setup.carol, &["alice"], ALPN_REPL);
        let addr = server.local_addr().expect("addr");

        let (accepted, connected) = attempt(&server, &client, addr, "alice", &["bob"]).await;
        let accepted = accepted.expect_err("server refuses carol");
        assert!(matches!(accepted, Error::Accept { .. }), "{accepted}");
        assert!(accepted.to_string().contains("node carol is not an allowed peer"), "{accepted}");
        let connected = connected.expect_err("carol is told");
        assert!(
            matches!(connected, Error::Refused { ref reason, .. } if reason.contains("node carol is not an allowed peer")),
            "{connected}"
        );
    }

    #[tokio::test]
    async fn node_not_allowed_by_accept_is_refused_with_its_name() {
        let setup = Setup::new();
        let server = local_endpoint(&setup.alice, &["bob", "carol"], ALPN_REPL);
        let client = local_endpoint(&setup.carol, &["alice"], ALPN_REPL);
        let addr = server.local_addr().expect("addr");

        let (accepted, connected) = attempt(&server, &client, addr, "alice", &["bob"]).await;
        let accepted = accepted.expect_err("accept refuses carol");
        assert!(matches!(accepted, Error::PeerNotAllowed { ref name, .. } if name == "carol"), "{accepted}");
        let connected = connected.expect_err("carol is told");
        assert!(
            matches!(connected, Error::Refused { ref reason, .. } if reason.contains("node \"carol\" is not an allowed peer")),
            "{connected}"
        );
    }

    #[tokio::test]
    async fn connecting_to_the_wrong_node_name_fails() {
        let setup = Setup::new();
        let server = local_endpoint(&setup.alice, &["bob"], ALPN_REPL);
        let client = local_endpoint(&setup.bob, &["carol"], ALPN_REPL);
        let addr = server.local_addr().expect("addr");

        let (accepted, connected) = attempt(&server, &client, addr, "carol", &["bob"]).await;
        let connected = connected.expect_err("alice's certificate does not name carol");
        assert!(connected.to_string().contains("not valid for name \"carol\""), "{connected}");
        assert!(matches!(accepted, Err(Error::Accept { .. })), "{accepted:?}");
    }

    #[tokio::test]
    async fn alpn_mismatch_is_refused() {
        let setup = Setup::new();
        let server = local_endpoint(&setup.alice, &["bob"], ALPN_WITNESS);
        let client = local_endpoint(&setup.bob, &["alice"], ALPN_REPL);
        let addr = server.local_addr().expect("addr");

        let (accepted, connected) = attempt(&server, &client, addr, "alice", &["bob"]).await;
        let accepted = accepted.expect_err("no protocol in common");
        assert!(accepted.to_string().contains("error 120"), "{accepted}");
        let connected = connected.expect_err("no protocol in common");
        assert!(connected.to_string().contains("error 120"), "{connected}");
    }

    /// Forwards UDP datagrams between one client and `server` until aborted: aborting
    /// it cuts the path without either QUIC endpoint sending a CONNECTION_CLOSE, as a
    /// crashed host or a partition would.
    async fn relay(server: SocketAddr) -> (SocketAddr, JoinHandle<()>) {
        let front = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind front");
        let back = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind back");
        back.connect(server).await.expect("connect back");
        let addr = front.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
            let mut client = None;
            loop {
                tokio::select! {
                    Ok((len, from)) = front.recv_from(&mut up) => {
                        client = Some(from);
                        let _ = back.send(&up[..len]).await;
                    }
                    Ok(len) = back.recv(&mut down) => {
                        if let Some(client) = client {
                            let _ = front.send_to(&down[..len], client).await;
                        }
                    }
                }
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn dead_peer_is_detected_by_the_idle_timeout() {
        let setup = Setup::new();
        let server = local_endpoint(&setup.alice, &["bob"], ALPN_REPL);
        let client = local_endpoint(&setup.bob, &["alice"], ALPN_REPL);
        let (addr, link) = relay(server.local_addr().expect("addr")).await;

        let (accepted, connected) = attempt(&server, &client, addr, "alice", &["bob"]).await;
        let (server_conn, _) = accepted.expect("accepted through the relay");
        let client_conn = connected.expect("connected through the relay");

        link.abort();
        let both = async { tokio::join!(client_conn.closed(), server_conn.closed()) };
        let (client_closed, server_closed) =
            tokio::time::timeout(EVENT_TIMEOUT, both).await.expect("both sides notice within the idle timeout");
        assert!(matches!(client_closed, quinn::ConnectionError::TimedOut), "{client_closed}");
        assert!(matches!(server_closed, quinn::ConnectionError::TimedOut), "{server_closed}");
    }

    #[test]
    fn certificate_files_are_checked_and_never_overwritten() {
        let setup = Setup::new();
        let ca = setup.ca_dir();
        assert!(matches!(create_ca(&ca, "again", CA_VALIDITY), Err(Error::AlreadyExists { .. })));
        let nodes = setup.dir.path().join("nodes");
        assert!(matches!(issue_cert(&ca, "bob", &nodes, NODE_VALIDITY), Err(Error::AlreadyExists { .. })));
        assert!(matches!(issue_cert(&ca, "Bob", &nodes, NODE_VALIDITY), Err(Error::InvalidNodeName { .. })));
        assert!(matches!(issue_cert(&ca, "dave", &nodes, Duration::ZERO), Err(Error::InvalidValidity { .. })));

        use std::os::unix::fs::PermissionsExt as _;
        let mode = |path: &Path| fs::metadata(path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&ca.join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(&nodes.join("bob.key")), 0o600);
        assert_eq!(mode(&nodes.join("bob.pem")), 0o644);
        assert_eq!(setup.bob.name(), "bob");

        // Issuing into the CA directory itself needs no copy of ca.pem.
        let files = issue_cert(&ca, "dave", &ca, NODE_VALIDITY).expect("issue into the CA dir");
        assert_eq!(files.ca_cert, ca.join(CA_CERT_FILE));
        assert_eq!(Identity::load(&files).expect("load").name(), "dave");

        // Another node's key, and a certificate from another CA, are caught at load time.
        let mismatched = TlsFiles { key: nodes.join("alice.key"), ..TlsFiles::in_dir(&nodes, "bob") };
        let e = Identity::load(&mismatched).expect_err("key of another node");
        assert!(e.to_string().contains("does not belong to the certificate"), "{e}");
        setup.impostor();
        let foreign =
            TlsFiles { ca_cert: ca.join(CA_CERT_FILE), ..TlsFiles::in_dir(&setup.dir.path().join("other"), "bob") };
        let e = Identity::load(&foreign).expect_err("certificate from another CA");
        assert!(e.to_string().contains("not usable with the CA"), "{e}");
        let missing = TlsFiles::in_dir(&nodes, "nobody");
        assert!(matches!(Identity::load(&missing), Err(Error::ReadFile { .. })));
    }

    #[test]
    fn node_names_are_dns_labels() {
        for good in ["a", "node-1", "db1", &"x".repeat(63)] {
            assert!(validate_node_name(good).is_ok(), "{good}");
        }
        for bad in ["", "1node", "-a", "a-", "Node", "a.b", "a_b", "é", &"x".repeat(64)] {
            assert!(matches!(validate_node_name(bad), Err(Error::InvalidNodeName { .. })), "{bad}");
        }
    }

    #[test]
    fn transport_config_is_validated() {
        let bad = TransportConfig { keep_alive: Duration::from_secs(2), ..TransportConfig::default() };
        assert!(matches!(quinn_transport(&bad), Err(Error::Config { .. })));
        let bad = TransportConfig { stream_window: u64::MAX, ..TransportConfig::default() };
        assert!(matches!(quinn_transport(&bad), Err(Error::Config { .. })));
        assert!(quinn_transport(&TransportConfig::default()).is_ok());
    }
}
