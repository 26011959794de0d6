//! The chunk codec: plaintext → (id, sealed frame) and back. The byte layout is defined
//! here and only here; docs/format-chunk.md explains it.
//!
//! Encoding: id = keyed BLAKE3(plaintext); zstd when it saves at least 1/16; XChaCha20-Poly1305
//! over the stored bytes with the header and the id as associated data; CRC32 trailer.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::mem::size_of;

use crate::error::ChunkError;
use crate::key::{ChunkId, TenantKey, TAG_LEN, XNONCE_LEN as NONCE_LEN};
use crate::layout::{self, Writer};

/// The largest plaintext a chunk may hold (16 MiB). Decoding refuses larger `plaintext_len`
/// values before allocating, so a corrupt header cannot make us allocate more than this.
pub const MAX_CHUNK_LEN: usize = 16 << 20;

/// First four bytes of every chunk.
pub const MAGIC: [u8; 4] = *b"KCHK";

/// Flag bit 0: the stored bytes are a zstd frame.
const FLAG_COMPRESSED: u8 = 0b0000_0001;
/// All flag bits this version defines; any other bit set is corruption.
const KNOWN_FLAGS: u8 = FLAG_COMPRESSED;

/// CRC32 trailer length.
const CRC_LEN: usize = size_of::<u32>();

/// Header length: magic, version, flags, reserved, plaintext_len, stored_len, nonce.
pub const HEADER_LEN: usize = MAGIC.len()
    + size_of::<u8>()
    + size_of::<u8>()
    + size_of::<u16>()
    + size_of::<u32>()
    + size_of::<u32>()
    + NONCE_LEN;
/// Bytes a chunk adds to its stored payload: header, tag and CRC.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN + CRC_LEN;

const _: () = assert!(HEADER_LEN == 40);
const _: () = assert!(OVERHEAD == 60);
const _: () = assert!(MAX_CHUNK_LEN <= u32::MAX as usize - OVERHEAD);

/// Chunk format versions. Old versions stay decodable forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FormatVersion {
    /// 2026: the first format.
    V1 = 1,
}

impl FormatVersion {
    /// The version new chunks are written in.
    pub const CURRENT: FormatVersion = FormatVersion::V1;

    fn from_u8(byte: u8) -> Result<Self, ChunkError> {
        match byte {
            1 => Ok(FormatVersion::V1),
            found => Err(ChunkError::UnsupportedVersion { found }),
        }
    }
}

/// The fixed-size chunk header. Encoded and decoded field by field in the same order; the
/// order is the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    version: FormatVersion,
    flags: u8,
    plaintext_len: u32,
    stored_len: u32,
    nonce: [u8; NONCE_LEN],
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let mut w = Writer(&mut out);
        w.put(&MAGIC);
        w.put(&[self.version as u8]);
        w.put(&[self.flags]);
        w.put(&0u16.to_le_bytes());
        w.put(&self.plaintext_len.to_le_bytes());
        w.put(&self.stored_len.to_le_bytes());
        w.put(&self.nonce);
        debug_assert!(w.0.is_empty(), "header fields must fill HEADER_LEN exactly");
        out
    }

    /// Parses the header. Magic and version are checked by the caller first (they come
    /// before the CRC check); this checks the fields' own invariants.
    fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, ChunkError> {
        let mut r: &[u8] = bytes;
        let _magic: [u8; 4] = take(&mut r)?;
        let [version] = take(&mut r)?;
        let [flags] = take(&mut r)?;
        let reserved = u16::from_le_bytes(take(&mut r)?);
        let plaintext_len = u32::from_le_bytes(take(&mut r)?);
        let stored_len = u32::from_le_bytes(take(&mut r)?);
        let nonce = take(&mut r)?;
        let header = Header { version: FormatVersion::from_u8(version)?, flags, plaintext_len, stored_len, nonce };
        if reserved != 0 {
            return Err(ChunkError::Corruption { what: "reserved header field is not zero" });
        }
        if flags & !KNOWN_FLAGS != 0 {
            return Err(ChunkError::Corruption { what: "unknown flag bits set" });
        }
        if plaintext_len as usize > MAX_CHUNK_LEN {
            return Err(ChunkError::Corruption { what: "plaintext_len exceeds the maximum chunk size" });
        }
        if header.compressed() {
            // The encoder keeps zstd output only when it is smaller.
            if stored_len >= plaintext_len {
                return Err(ChunkError::Corruption { what: "compressed payload not smaller than plaintext" });
            }
        } else if stored_len != plaintext_len {
            return Err(ChunkError::Corruption { what: "uncompressed payload length differs from plaintext_len" });
        }
        Ok(header)
    }

    fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }
}

/// Takes `N` bytes off the front of `r`; total (never panics).
fn take<const N: usize>(r: &mut &[u8]) -> Result<[u8; N], ChunkError> {
    layout::take(r).ok_or(ChunkError::Corruption { what: "header too short" })
}

/// The associated data the AEAD authenticates: the whole header, then the chunk id. Binding
/// the id means a valid chunk cannot be served under another id.
fn associated_data(header: &[u8; HEADER_LEN], id: &ChunkId) -> [u8; HEADER_LEN + 32] {
    let mut aad = [0u8; HEADER_LEN + 32];
    let mut w = Writer(&mut aad);
    w.put(header);
    w.put(id.as_bytes());
    aad
}

/// True when every byte is zero. Such chunks are not stored: the caller records a hole.
pub fn is_zero(bytes: &[u8]) -> bool {
    // OR-reduce fixed blocks (vectorises) with an early exit between blocks.
    bytes.chunks(4096).all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Encodes `plaintext` for `key`: returns its id and the sealed chunk frame.
///
/// `zstd_level` is passed to zstd (0 = zstd's default, 3; negative levels are faster).
/// Compression is kept only when it saves at least 1/16 of the plaintext (and at least one
/// byte); otherwise the raw bytes are sealed and the compressed flag is clear.
///
/// Fails only for a plaintext longer than [`MAX_CHUNK_LEN`] (or an AEAD library refusal).
pub fn encode_chunk(key: &TenantKey, plaintext: &[u8], zstd_level: i32) -> Result<(ChunkId, Vec<u8>), ChunkError> {
    let id = key.chunk_id(plaintext);
    seal_chunk(key, &id, plaintext, zstd_level).map(|frame| (id, frame))
}

/// [`encode_chunk`] for a plaintext whose id the caller already computed with
/// [`TenantKey::chunk_id`] (to skip sealing chunks a store already holds). `id` must be
/// that id: a wrong one makes a frame that never decodes.
pub fn seal_chunk(key: &TenantKey, id: &ChunkId, plaintext: &[u8], zstd_level: i32) -> Result<Vec<u8>, ChunkError> {
    let len = plaintext.len();
    if len > MAX_CHUNK_LEN {
        return Err(ChunkError::TooLarge { len, max: MAX_CHUNK_LEN });
    }

    // One allocation sized for the uncompressed case; truncated if compression pays.
    let mut out = vec![0u8; len + OVERHEAD];
    let (header_buf, rest) = out.split_at_mut(HEADER_LEN);
    let limit = len.saturating_sub(len.div_ceil(16).max(1));
    let compressed = match rest.get_mut(..limit) {
        // zstd fails with "destination too small" when the output would exceed `limit`.
        Some(dest) if limit > 0 => compress(plaintext, dest, zstd_level),
        _ => None,
    };
    let (flags, stored_len) = match compressed {
        Some(n) if n <= limit => (FLAG_COMPRESSED, n),
        _ => {
            let (dest, _) = rest.split_at_mut(len);
            dest.copy_from_slice(plaintext);
            (0, len)
        }
    };

    let header = Header {
        version: FormatVersion::CURRENT,
        flags,
        // Both fit: len <= MAX_CHUNK_LEN, asserted below u32::MAX above.
        plaintext_len: len as u32,
        stored_len: stored_len as u32,
        nonce: rand::random(),
    };
    let header_bytes = header.encode();
    header_buf.copy_from_slice(&header_bytes);

    let (body, rest) = rest.split_at_mut(stored_len);
    let tag = key
        .seal_in_place(&header.nonce, &associated_data(&header_bytes, id), body)
        .ok_or(ChunkError::Encode("XChaCha20-Poly1305 refused to seal the chunk"))?;
    let (tag_buf, _) = rest.split_at_mut(TAG_LEN);
    tag_buf.copy_from_slice(&tag);

    let crc_at = HEADER_LEN + stored_len + TAG_LEN;
    out.truncate(crc_at + CRC_LEN);
    let (covered, crc_buf) = out.split_at_mut(crc_at);
    crc_buf.copy_from_slice(&crc32fast::hash(covered).to_le_bytes());
    debug_assert!(check_frame(&out).is_ok(), "encoder must produce a well-formed frame");
    Ok(out)
}

thread_local! {
    /// This thread's zstd compression context and its level. Creating one per chunk cost
    /// 8 % of a full snapshot's CPU (allocating and clearing its tables).
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    /// This thread's zstd decompression context.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// zstd-compresses `plaintext` into `dest` at `level` with this thread's context; `None`
/// when the output would not fit (or zstd fails: the chunk is then stored raw).
fn compress(plaintext: &[u8], dest: &mut [u8], level: i32) -> Option<usize> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        if !matches!(&*slot, Some((l, _)) if *l == level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, compressor) = slot.as_mut()?;
        compressor.compress_to_buffer(plaintext, dest).ok()
    })
}

/// Decompresses `stored` into exactly `dest` with this thread's context; the destination
/// bounds the output (zstd fails rather than write past it).
fn decompress(stored: &[u8], dest: &mut [u8]) -> Result<usize, ChunkError> {
    let fresh = || zstd::bulk::Decompressor::new().map_err(|e| ChunkError::Decompress(e.to_string()));
    DECOMPRESSOR.with(|cell| match cell.try_borrow_mut() {
        Ok(mut slot) => {
            if slot.is_none() {
                *slot = Some(fresh()?);
            }
            let decompressor = slot.as_mut().ok_or_else(|| ChunkError::Decompress("no context".into()))?;
            decompressor.decompress_to_buffer(stored, dest).map_err(|e| ChunkError::Decompress(e.to_string()))
        }
        // Re-entered on this thread (cannot happen today): a context of its own.
        Err(_) => fresh()?.decompress_to_buffer(stored, dest).map_err(|e| ChunkError::Decompress(e.to_string())),
    })
}

/// A frame that passed [`check_frame`]: its header and the sealed payload and tag.
struct Frame<'a> {
    header: Header,
    header_bytes: &'a [u8; HEADER_LEN],
    body: &'a [u8],
    tag: &'a [u8; TAG_LEN],
}

/// Checks, without the key, that `bytes` is a well-formed chunk frame: length, magic,
/// version, CRC, then header consistency, in that order. A store or vault can run this on
/// chunks it cannot decrypt.
pub fn check_frame(bytes: &[u8]) -> Result<(), ChunkError> {
    parse_frame(bytes).map(|_| ())
}

fn parse_frame(bytes: &[u8]) -> Result<Frame<'_>, ChunkError> {
    let truncated = || ChunkError::Truncated { len: bytes.len(), min: OVERHEAD };
    if bytes.len() < OVERHEAD {
        return Err(truncated());
    }
    let (header_bytes, after_header) = bytes.split_first_chunk::<HEADER_LEN>().ok_or_else(truncated)?;
    let (covered, crc_bytes) = bytes.split_last_chunk::<CRC_LEN>().ok_or_else(truncated)?;
    let (magic, _) = header_bytes.split_first_chunk::<4>().ok_or(ChunkError::Corruption { what: "header" })?;
    if *magic != MAGIC {
        return Err(ChunkError::BadMagic { found: *magic });
    }
    let version = header_bytes.get(MAGIC.len()).copied().unwrap_or_default();
    FormatVersion::from_u8(version)?;
    let expected = u32::from_le_bytes(*crc_bytes);
    let got = crc32fast::hash(covered);
    if expected != got {
        return Err(ChunkError::ChecksumMismatch { expected, got });
    }
    let header = Header::decode(header_bytes)?;
    let stored_len = header.stored_len as usize;
    if bytes.len() != stored_len + OVERHEAD {
        return Err(ChunkError::Corruption { what: "frame length disagrees with stored_len" });
    }
    let (body, after_body) = after_header
        .split_at_checked(stored_len)
        .ok_or(ChunkError::Corruption { what: "frame length disagrees with stored_len" })?;
    let (tag, _) =
        after_body.split_first_chunk::<TAG_LEN>().ok_or(ChunkError::Corruption { what: "missing AEAD tag" })?;
    Ok(Frame { header, header_bytes, body, tag })
}

/// Decodes a chunk frame for `key`, checking that it is the chunk `id`.
///
/// Checks in order: length, magic, version, CRC, header fields, AEAD (wrong key, wrong id
/// or tampering → [`ChunkError::Unauthenticated`]), bounded decompression to exactly
/// `plaintext_len` bytes, and finally that the keyed hash of the plaintext is `id`.
/// Never panics and never allocates more than `stored_len + plaintext_len` (≤ 2 × 16 MiB).
pub fn decode_chunk(key: &TenantKey, id: &ChunkId, bytes: &[u8]) -> Result<Vec<u8>, ChunkError> {
    let frame = parse_frame(bytes)?;
    let mut stored = Vec::with_capacity(frame.body.len() + TAG_LEN);
    stored.extend_from_slice(frame.body);
    stored.extend_from_slice(frame.tag);
    let opened = key
        .open_in_place(&frame.header.nonce, &associated_data(frame.header_bytes, id), &mut stored)
        .ok_or(ChunkError::Unauthenticated)?;
    stored.truncate(opened);

    let plaintext_len = frame.header.plaintext_len as usize;
    let plaintext = if frame.header.compressed() {
        let mut plaintext = vec![0u8; plaintext_len];
        let n = decompress(&stored, plaintext.as_mut_slice())?;
        if n != plaintext_len {
            return Err(ChunkError::Decompress(format!("{n} bytes, header says {plaintext_len}")));
        }
        plaintext
    } else {
        stored
    };

    let got = key.chunk_id(&plaintext);
    if got != *id {
        return Err(ChunkError::IdMismatch { expected: *id, got });
    }
    Ok(plaintext)
}

#[cfg(test)]
mod tests;
