//! Tenant keys, their derived subkeys, and chunk ids.

use std::fmt;
use std::str::FromStr;

use chacha20::cipher::consts::U10;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

/// `blake3::derive_key` context for the chunk-id subkey. Never change it: ids would change.
const ID_CONTEXT: &str = "keel 2026 chunk id";
/// `blake3::derive_key` context for the AEAD subkey. Never change it: old chunks would not decrypt.
const ENCRYPTION_CONTEXT: &str = "keel 2026 chunk encryption";

/// `blake3::derive_key` context for the manifest MAC subkey. Never change it.
const MANIFEST_CONTEXT: &str = "keel 2026 manifest mac";
/// `blake3::derive_key` context for the public key id. Never change it.
const KEY_ID_CONTEXT: &str = "keel 2026 key id";

/// Length of a tenant key and of each subkey.
pub const KEY_LEN: usize = 32;

/// Length of an XChaCha20-Poly1305 nonce.
pub(crate) const XNONCE_LEN: usize = 24;
/// Length of a Poly1305 tag.
pub(crate) const TAG_LEN: usize = 16;

/// A tenant's 32-byte master key and the two subkeys derived from it.
///
/// The chunk id is a keyed BLAKE3 under one subkey, so the same data under two tenants has
/// unrelated ids and deduplication never crosses tenants; chunks are sealed with
/// XChaCha20-Poly1305 under the other. The master key itself is not kept.
///
/// XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha-03) is built from two parts: HChaCha20
/// derives a one-time key from the encryption key and the nonce's first 16 bytes, and
/// ChaCha20-Poly1305 (RFC 8439; `ring`'s assembly, 2.2x the pure-Rust crate here) seals
/// under it with the nonce `0000 || nonce[16..24]`. The output is byte for byte that of
/// the `chacha20poly1305` crate's `XChaCha20Poly1305`, which a test checks.
///
/// `Debug` does not print key material.
#[derive(Clone)]
pub struct TenantKey {
    id_key: [u8; KEY_LEN],
    manifest_key: [u8; KEY_LEN],
    key_id: [u8; 8],
    encryption_key: [u8; KEY_LEN],
}

impl TenantKey {
    /// Derives the subkeys from a tenant's master key.
    pub fn from_bytes(master: [u8; KEY_LEN]) -> Self {
        let id_key = blake3::derive_key(ID_CONTEXT, &master);
        let encryption_key = blake3::derive_key(ENCRYPTION_CONTEXT, &master);
        let manifest_key = blake3::derive_key(MANIFEST_CONTEXT, &master);
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&blake3::derive_key(KEY_ID_CONTEXT, &master)[..8]);
        TenantKey { id_key, manifest_key, key_id, encryption_key }
    }

    /// A new random master key from the OS RNG (returned so the caller can store it).
    pub fn generate() -> ([u8; KEY_LEN], Self) {
        let master: [u8; KEY_LEN] = rand::random();
        (master, Self::from_bytes(master))
    }

    /// The chunk id of `plaintext` for this tenant: keyed BLAKE3 under the id subkey.
    pub fn chunk_id(&self, plaintext: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.id_key, plaintext).as_bytes())
    }

    /// A public 8-byte fingerprint of the key, recorded in manifests so that "wrong key"
    /// can be told apart from "tampered" (it reveals nothing usable about the key).
    pub fn key_id(&self) -> [u8; 8] {
        self.key_id
    }

    /// The keyed BLAKE3 MAC of a manifest's bytes under the manifest subkey.
    pub(crate) fn manifest_mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_keyed(&self.manifest_key);
        for part in parts {
            hasher.update(part);
        }
        *hasher.finalize().as_bytes()
    }

    /// ChaCha20-Poly1305 under the one-time key for `nonce`, and the 12-byte nonce to
    /// use with it.
    fn one_time(&self, nonce: &[u8; XNONCE_LEN]) -> Option<(LessSafeKey, Nonce)> {
        let (head, tail) = nonce.split_at(16);
        let subkey = chacha20::hchacha::<U10>(&self.encryption_key.into(), head.into());
        let key = UnboundKey::new(&CHACHA20_POLY1305, subkey.as_slice()).ok()?;
        let mut short = [0u8; 12];
        short.get_mut(4..)?.copy_from_slice(tail);
        Some((LessSafeKey::new(key), Nonce::assume_unique_for_key(short)))
    }

    /// Encrypts `data` in place with XChaCha20-Poly1305 and returns the tag; `None` only
    /// if the library refuses (it does not for any input a chunk can have).
    pub(crate) fn seal_in_place(&self, nonce: &[u8; XNONCE_LEN], aad: &[u8], data: &mut [u8]) -> Option<[u8; TAG_LEN]> {
        let (key, nonce) = self.one_time(nonce)?;
        let tag = key.seal_in_place_separate_tag(nonce, Aad::from(aad), data).ok()?;
        tag.as_ref().try_into().ok()
    }

    /// Decrypts `sealed` (ciphertext followed by its tag) in place and returns the
    /// plaintext's length; `None` when the tag does not authenticate (wrong key, wrong
    /// associated data, or tampering).
    pub(crate) fn open_in_place(&self, nonce: &[u8; XNONCE_LEN], aad: &[u8], sealed: &mut [u8]) -> Option<usize> {
        let (key, nonce) = self.one_time(nonce)?;
        key.open_in_place(nonce, Aad::from(aad), sealed).ok().map(|plain| plain.len())
    }
}

impl fmt::Debug for TenantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TenantKey(<redacted>)")
    }
}

/// A chunk's id: the keyed BLAKE3 of its plaintext (see [`TenantKey::chunk_id`]).
///
/// Displays and parses as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

/// A string that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunk id {input:?}: expected 64 hex digits")]
pub struct ParseChunkIdError {
    /// The rejected input (truncated to 80 characters).
    pub input: String,
}

impl FromStr for ChunkId {
    type Err = ParseChunkIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseChunkIdError { input: s.chars().take(80).collect() };
        let digits = s.as_bytes();
        if digits.len() != 64 {
            return Err(err());
        }
        let mut id = [0u8; 32];
        for (byte, pair) in id.iter_mut().zip(digits.chunks_exact(2)) {
            let [hi, lo] = pair else { return Err(err()) };
            *byte = (hex_value(*hi).ok_or_else(err)? << 4) | hex_value(*lo).ok_or_else(err)?;
        }
        Ok(ChunkId(id))
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ChunkId(std::array::from_fn(|i| (i * 7) as u8));
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<ChunkId>(), Ok(id));
        assert_eq!(text.to_uppercase().parse::<ChunkId>(), Ok(id));
        assert!("zz".repeat(32).parse::<ChunkId>().is_err());
        assert!(text[..62].parse::<ChunkId>().is_err());
        assert!(format!("{text}00").parse::<ChunkId>().is_err());
        assert!("é".repeat(32).parse::<ChunkId>().is_err());
    }

    /// The sealing is exactly XChaCha20-Poly1305 as the reference crate computes it, for
    /// lengths around the block sizes, and opening refuses any flipped bit.
    #[test]
    fn sealing_is_the_reference_xchacha20_poly1305() {
        use chacha20poly1305::aead::AeadInPlace;
        use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
        let key = TenantKey::from_bytes([9; 32]);
        let reference = XChaCha20Poly1305::new(&blake3::derive_key(ENCRYPTION_CONTEXT, &[9; 32]).into());
        for len in [0usize, 1, 15, 16, 63, 64, 65, 255, 256, 4096, 65_536 + 7] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let nonce: [u8; XNONCE_LEN] = std::array::from_fn(|i| (i * 13 + len) as u8);
            let aad = [len as u8; 72];
            let mut ours = plain.clone();
            let tag = key.seal_in_place(&nonce, &aad, &mut ours).unwrap();
            let mut theirs = plain.clone();
            let their_tag = reference.encrypt_in_place_detached(XNonce::from_slice(&nonce), &aad, &mut theirs).unwrap();
            assert_eq!(ours, theirs, "ciphertext, {len} bytes");
            assert_eq!(tag.as_slice(), their_tag.as_slice(), "tag, {len} bytes");
            let mut sealed = [ours, tag.to_vec()].concat();
            let mut tampered = sealed.clone();
            assert_eq!(key.open_in_place(&nonce, &aad, &mut sealed), Some(len));
            assert_eq!(&sealed[..len], &plain[..]);
            let bit = (len * 8 + 5) % (tampered.len() * 8);
            tampered[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(key.open_in_place(&nonce, &aad, &mut tampered), None, "flipped bit {bit}, {len} bytes");
            let mut resealed = plain.clone();
            let tag = key.seal_in_place(&nonce, &aad, &mut resealed).unwrap();
            resealed.extend_from_slice(&tag);
            let mut other_aad = aad;
            other_aad[71] ^= 1;
            assert_eq!(
                key.open_in_place(&nonce, &other_aad, &mut resealed),
                None,
                "other associated data, {len} bytes"
            );
        }
    }

    #[test]
    fn subkeys_differ_and_tenants_differ() {
        let a = TenantKey::from_bytes([1; 32]);
        let b = TenantKey::from_bytes([2; 32]);
        assert_ne!(a.chunk_id(b"data"), b.chunk_id(b"data"));
        assert_eq!(a.chunk_id(b"data"), TenantKey::from_bytes([1; 32]).chunk_id(b"data"));
        assert_ne!(a.id_key, blake3::derive_key(ENCRYPTION_CONTEXT, &[1; 32]));
        assert_eq!(format!("{a:?}"), "TenantKey(<redacted>)");
    }
}
