//! Tenant key files: the 32-byte master key, optionally sealed under a passphrase.
//!
//! ```text
//! offset size field
//!      0    4 magic "KKEY"
//!      4    1 version (1)
//!      5    1 kind: 0 = plain key, 1 = passphrase-sealed
//!      6    2 reserved (0)
//!      8    8 key id (TenantKey::key_id), so a wrong key is named before anything else
//!     16   16 argon2id salt (kind 1; zero for kind 0)
//!     32    4 argon2 memory KiB   36 4 iterations   40 4 parallelism   44 4 reserved
//!     48   24 XChaCha20-Poly1305 nonce (kind 1; zero for kind 0)
//!     72   48 kind 0: the key then 16 zero bytes; kind 1: the sealed key and its tag
//!    120    4 crc32 of bytes 0..120
//! ```
//!
//! A plain key file relies on its permissions (0600, checked on load); a sealed one needs
//! the passphrase (argon2id, 64 MiB, 3 passes). A wrong passphrase is reported as such.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::key::{TenantKey, KEY_LEN};

const MAGIC: [u8; 4] = *b"KKEY";
const LEN: usize = 124;
const MEMORY_KIB: u32 = 64 * 1024;
const ITERATIONS: u32 = 3;
const PARALLELISM: u32 = 1;

/// Why a key file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// Reading or writing the file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid key file.
    #[error("key file {path}: {what}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// The passphrase does not open the key.
    #[error("key file {path}: wrong passphrase")]
    WrongPassphrase {
        /// The file.
        path: String,
    },
    /// The file is sealed and no passphrase was given.
    #[error("key file {path} is protected by a passphrase; set KEEL_KEY_PASSPHRASE or pass --passphrase-file")]
    NeedPassphrase {
        /// The file.
        path: String,
    },
    /// A plain key file that others can read.
    #[error("key file {path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    TooOpen {
        /// The file.
        path: String,
        /// Its mode.
        mode: u32,
    },
}

fn argon2_key(
    passphrase: &[u8],
    salt: &[u8; 16],
    memory: u32,
    iterations: u32,
    lanes: u32,
) -> Result<[u8; 32], String> {
    let params = argon2::Params::new(memory, iterations, lanes, Some(32)).map_err(|e| e.to_string())?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    argon.hash_password_into(passphrase, salt, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Encodes `master` as a key file, sealed under `passphrase` when given.
pub fn encode_key_file(master: &[u8; KEY_LEN], passphrase: Option<&[u8]>) -> Result<Vec<u8>, String> {
    let key = TenantKey::from_bytes(*master);
    let mut out = vec![0u8; LEN];
    out[..4].copy_from_slice(&MAGIC);
    out[4] = 1;
    out[8..16].copy_from_slice(&key.key_id());
    match passphrase {
        None => out[72..104].copy_from_slice(master),
        Some(passphrase) => {
            out[5] = 1;
            let salt: [u8; 16] = rand::random();
            let nonce: [u8; 24] = rand::random();
            out[16..32].copy_from_slice(&salt);
            out[32..36].copy_from_slice(&MEMORY_KIB.to_le_bytes());
            out[36..40].copy_from_slice(&ITERATIONS.to_le_bytes());
            out[40..44].copy_from_slice(&PARALLELISM.to_le_bytes());
            out[48..72].copy_from_slice(&nonce);
            let wrapping = argon2_key(passphrase, &salt, MEMORY_KIB, ITERATIONS, PARALLELISM)?;
            let aead = XChaCha20Poly1305::new(&wrapping.into());
            let mut sealed = master.to_vec();
            let (header, _) = out.split_at(48);
            let tag = aead
                .encrypt_in_place_detached(XNonce::from_slice(&nonce), header, &mut sealed)
                .map_err(|_| "seal the key".to_owned())?;
            out[72..104].copy_from_slice(&sealed);
            out[104..120].copy_from_slice(&tag);
        }
    }
    let crc = crc32fast::hash(&out[..120]);
    out[120..124].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes key file `bytes` (named `path` in errors).
pub fn decode_key_file(bytes: &[u8], passphrase: Option<&[u8]>, path: &str) -> Result<TenantKey, KeyFileError> {
    let invalid = |what: &str| KeyFileError::Invalid { path: path.to_owned(), what: what.to_owned() };
    if bytes.len() != LEN {
        return Err(invalid(&format!("{} bytes, a key file has {LEN}", bytes.len())));
    }
    if bytes[..4] != MAGIC {
        return Err(invalid("not a Keel key file (magic is not KKEY)"));
    }
    let stored = u32::from_le_bytes([bytes[120], bytes[121], bytes[122], bytes[123]]);
    if crc32fast::hash(&bytes[..120]) != stored {
        return Err(invalid("checksum mismatch (damaged file)"));
    }
    if bytes[4] != 1 {
        return Err(invalid(&format!("unsupported version {}", bytes[4])));
    }
    let mut master = [0u8; KEY_LEN];
    match bytes[5] {
        0 => master.copy_from_slice(&bytes[72..104]),
        1 => {
            let passphrase = passphrase.ok_or_else(|| KeyFileError::NeedPassphrase { path: path.to_owned() })?;
            let le = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
            let (memory, iterations, lanes) = (le(32), le(36), le(40));
            // Refuse parameters that would exhaust the machine (a forged file).
            if memory > 4 << 20 || iterations > 64 || lanes > 16 {
                return Err(invalid("argon2 parameters out of range"));
            }
            let salt: [u8; 16] = bytes[16..32].try_into().unwrap_or_default();
            let wrapping = argon2_key(passphrase, &salt, memory, iterations, lanes).map_err(|e| invalid(&e))?;
            let aead = XChaCha20Poly1305::new(&wrapping.into());
            master.copy_from_slice(&bytes[72..104]);
            aead.decrypt_in_place_detached(
                XNonce::from_slice(&bytes[48..72]),
                &bytes[..48],
                &mut master,
                bytes[104..120].into(),
            )
            .map_err(|_| KeyFileError::WrongPassphrase { path: path.to_owned() })?;
        }
        kind => return Err(invalid(&format!("unknown kind {kind}"))),
    }
    let key = TenantKey::from_bytes(master);
    if key.key_id()[..] != bytes[8..16] {
        return Err(invalid("the key does not match its recorded key id"));
    }
    Ok(key)
}

/// Loads the key file at `path`. A plain key file must not be readable by others.
pub fn load_key_file(path: &Path, passphrase: Option<&[u8]>) -> Result<TenantKey, KeyFileError> {
    let name = path.display().to_string();
    let io = |source| KeyFileError::Io { path: name.clone(), source };
    let bytes = fs::read(path).map_err(io)?;
    if bytes.get(5) == Some(&0) {
        let mode = fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::TooOpen { path: name, mode });
        }
    }
    decode_key_file(&bytes, passphrase, &name)
}

/// Creates a new key file with a random key at `path` (mode 0600; refuses to overwrite).
pub fn create_key_file(path: &Path, passphrase: Option<&[u8]>) -> Result<TenantKey, KeyFileError> {
    let name = path.display().to_string();
    let io = |source| KeyFileError::Io { path: name.clone(), source };
    let (master, key) = TenantKey::generate();
    let bytes =
        encode_key_file(&master, passphrase).map_err(|what| KeyFileError::Invalid { path: name.clone(), what })?;
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_sealed_round_trip() {
        let master = [42u8; 32];
        let id = TenantKey::from_bytes(master).key_id();
        let plain = encode_key_file(&master, None).unwrap();
        assert_eq!(decode_key_file(&plain, None, "k").unwrap().key_id(), id);
        let sealed = encode_key_file(&master, Some(b"correct horse")).unwrap();
        assert_eq!(decode_key_file(&sealed, Some(b"correct horse"), "k").unwrap().key_id(), id);
        let err = decode_key_file(&sealed, Some(b"wrong"), "k").unwrap_err();
        assert!(matches!(err, KeyFileError::WrongPassphrase { .. }), "{err}");
        assert!(matches!(decode_key_file(&sealed, None, "k"), Err(KeyFileError::NeedPassphrase { .. })));
        for i in 0..LEN {
            let mut bad = plain.clone();
            bad[i] ^= 1;
            assert!(decode_key_file(&bad, None, "k").is_err(), "flip at {i}");
        }
    }

    #[test]
    fn files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.key");
        let key = create_key_file(&path, None).unwrap();
        assert_eq!(load_key_file(&path, None).unwrap().key_id(), key.key_id());
        assert!(create_key_file(&path, None).is_err(), "never overwrites a key");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load_key_file(&path, None), Err(KeyFileError::TooOpen { .. })));
    }
}
