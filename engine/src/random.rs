//! Random identities: volume ids and segment nonces. They must differ between volumes and
//! between uses of a slot; they need not be secret.

/// `N` random bytes from the kernel, or (if getrandom fails) from time, pid and a counter,
/// which still differ between calls.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0u8; N];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer it is given.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != N as isize {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mixed = (t.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 32)
            ^ COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (mixed.rotate_left((i as u32 * 8) % 64) & 0xff) as u8;
        }
    }
    bytes
}

/// A random u64.
pub(crate) fn random_u64() -> u64 {
    u64::from_le_bytes(random_bytes())
}
