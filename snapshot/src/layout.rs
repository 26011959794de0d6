//! Helpers for the fixed byte layouts of the chunk frame and the pack files: a
//! sequential writer and a sequential reader, both total (they never panic).

/// Sequential writer over a fixed buffer; only used with lengths checked by const asserts
/// (a write past the end would panic, which those asserts rule out).
pub(crate) struct Writer<'a>(pub(crate) &'a mut [u8]);

impl Writer<'_> {
    pub(crate) fn put(&mut self, bytes: &[u8]) {
        let (head, tail) = std::mem::take(&mut self.0).split_at_mut(bytes.len());
        head.copy_from_slice(bytes);
        self.0 = tail;
    }
}

/// Takes `N` bytes off the front of `r`; `None`, leaving `r` as it was, when it is shorter.
pub(crate) fn take<const N: usize>(r: &mut &[u8]) -> Option<[u8; N]> {
    let (head, tail) = r.split_first_chunk::<N>()?;
    *r = tail;
    Some(*head)
}
