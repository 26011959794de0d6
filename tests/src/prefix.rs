//! The model check for snapshots taken under writes: a writer writes 4 KiB blocks in a
//! planned order, write `k` carrying `k + 1` in every word of its block, on a volume that
//! starts zeroed. A consistent snapshot is the volume after some prefix of the plan;
//! [`consistent_prefix`] finds which, by applying the writes one at a time to a model.

/// Bytes per planned write.
pub const BLOCK: u64 = 4096;

/// The bytes write `k` of a plan writes: `k + 1`, little-endian, in every word.
pub fn payload(k: usize) -> Vec<u8> {
    (k as u64 + 1).to_le_bytes().repeat(BLOCK as usize / 8)
}

/// The `k` in `[lo, hi]` such that `image` is a zeroed volume of `image.len()` bytes after
/// the first `k` writes of `plan` (block numbers), or a description of how far it is from
/// every such prefix. Takes `lo` = the writes acknowledged before the snapshot was asked
/// for (it must hold them) and `hi` = those acknowledged after it returned, plus the one in
/// flight.
pub fn consistent_prefix(image: &[u8], plan: &[u64], lo: usize, hi: usize) -> Result<usize, String> {
    let blocks = image.len() as u64 / BLOCK;
    let range = |b: u64| (b * BLOCK) as usize..((b + 1) * BLOCK) as usize;
    let mut model = vec![0u8; image.len()];
    let differs = |model: &[u8], b: u64| model[range(b)] != image[range(b)];
    // How many blocks of the model differ from the image, kept up to date write by write.
    let mut mismatched: usize = (0..blocks).filter(|&b| differs(&model, b)).count();
    let hi = hi.min(plan.len());
    for (k, &b) in plan.iter().enumerate().take(hi) {
        if k >= lo && mismatched == 0 {
            return Ok(k);
        }
        let before = differs(&model, b);
        model[range(b)].copy_from_slice(&payload(k));
        let after = differs(&model, b);
        mismatched = mismatched + usize::from(after) - usize::from(before);
    }
    if mismatched == 0 {
        return Ok(hi);
    }
    Err(format!(
        "the image is not the volume after any prefix of writes in [{lo}, {hi}]: {mismatched} blocks differ at {hi}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_after(plan: &[u64], blocks: u64, k: usize) -> Vec<u8> {
        let mut image = vec![0u8; (blocks * BLOCK) as usize];
        for (i, &b) in plan.iter().enumerate().take(k) {
            image[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].copy_from_slice(&payload(i));
        }
        image
    }

    #[test]
    fn finds_the_prefix_and_refuses_what_is_none() {
        let plan = [3, 1, 3, 0, 2, 1];
        assert_eq!(consistent_prefix(&image_after(&plan, 4, 4), &plan, 2, 6), Ok(4));
        assert_eq!(consistent_prefix(&image_after(&plan, 4, 6), &plan, 0, 6), Ok(6));
        // Holding fewer writes than were acknowledged before is not consistent enough.
        assert!(consistent_prefix(&image_after(&plan, 4, 2), &plan, 3, 6).is_err());
        // Write 3 without write 2 is no prefix.
        let mut torn = image_after(&plan, 4, 2);
        torn[0..BLOCK as usize].copy_from_slice(&payload(3));
        assert!(consistent_prefix(&torn, &plan, 0, 6).is_err());
    }
}
