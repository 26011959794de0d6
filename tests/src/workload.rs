//! A deterministic, self-describing write workload for crash trials.
//!
//! Every 512-byte sector a write puts on the volume starts with the op index and the
//! sector's own number, followed by bytes derived from (seed, op, sector). After a crash a
//! checker can therefore name, for every sector, which op wrote what it holds, and decide
//! whether that is allowed: the last op at or before the last acknowledged flush that
//! touched the sector, or any op after it — never an older value, never garbage.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sector size the workload addresses.
pub const SECTOR: u64 = 512;

/// One operation of the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Write `sectors` sectors at `sector`; with `fua` the reply means durable.
    Write {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Forced unit access.
        fua: bool,
    },
    /// Zero (or trim) `sectors` sectors at `sector`.
    Zero {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Trim instead of write-zeroes.
        trim: bool,
    },
    /// Flush: everything before is durable once answered.
    Flush,
}

impl Op {
    /// True when the op's reply acknowledges durability of every earlier op.
    pub fn is_barrier(&self) -> bool {
        matches!(self, Op::Flush | Op::Write { fua: true, .. })
    }
}

/// Generates `count` ops for a volume of `size` bytes.
pub fn generate(seed: u64, size: u64, count: usize) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed);
    let total = size / SECTOR;
    (0..count)
        .map(|_| {
            // Writes cluster in a few hot areas, like a filesystem's journal and tables.
            let sector = if rng.gen_bool(0.5) { rng.gen_range(0..total.min(256)) } else { rng.gen_range(0..total) };
            let sectors = rng.gen_range(1..=64).min(total - sector);
            match rng.gen_range(0..20) {
                0..=13 => Op::Write { sector, sectors, fua: rng.gen_bool(0.05) },
                14 | 15 => Op::Zero { sector, sectors, trim: rng.gen_bool(0.5) },
                _ => Op::Flush,
            }
        })
        .collect()
}

/// The bytes op `op_index` writes into absolute sector `sector`.
pub fn sector_bytes(seed: u64, op_index: u64, sector: u64) -> [u8; SECTOR as usize] {
    let mut out = [0u8; SECTOR as usize];
    out[0..8].copy_from_slice(&(op_index + 1).to_le_bytes());
    out[8..16].copy_from_slice(&sector.to_le_bytes());
    let mut state = seed ^ op_index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ sector.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    for chunk in out[16..].chunks_mut(8) {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    out
}

/// The payload of a write op.
pub fn write_payload(seed: u64, op_index: u64, sector: u64, sectors: u64) -> Vec<u8> {
    (sector..sector + sectors).flat_map(|s| sector_bytes(seed, op_index, s)).collect()
}

/// What a sector may hold: written by op `n` (index), or zeros from op `n` (or never).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Data(u64),
    Zeros,
}

/// Checks `contents` (the whole volume after a crash) against the workload, given that
/// the client saw the reply of every op with index `< acked` and that op `acked - 1` (if
/// any) was a barrier, and that no op at or after `issued` was ever sent. Returns a
/// description of the first violation.
pub fn verify(seed: u64, ops: &[Op], acked: usize, issued: usize, contents: &[u8]) -> Result<(), String> {
    let total = contents.len() as u64 / SECTOR;
    // The last durable source of each sector: the last op before `acked` touching it.
    let mut durable = vec![Source::Zeros; total as usize];
    let mut durable_op = vec![None::<usize>; total as usize];
    let mut later: Vec<Vec<Source>> = vec![Vec::new(); total as usize];
    for (index, op) in ops.iter().enumerate().take(issued) {
        let (sector, sectors, source) = match *op {
            Op::Write { sector, sectors, .. } => (sector, sectors, Source::Data(index as u64)),
            Op::Zero { sector, sectors, .. } => (sector, sectors, Source::Zeros),
            Op::Flush => continue,
        };
        for s in sector..sector + sectors {
            if index < acked {
                durable[s as usize] = source;
                durable_op[s as usize] = Some(index);
            } else {
                later[s as usize].push(source);
            }
        }
    }
    for s in 0..total {
        let bytes = &contents[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize];
        let found = if bytes.iter().all(|&b| b == 0) {
            Source::Zeros
        } else {
            let op = u64::from_le_bytes(bytes[0..8].try_into().unwrap_or_default());
            if op == 0 || bytes != sector_bytes(seed, op - 1, s) {
                return Err(format!("sector {s} holds bytes no op wrote there (header says op {op})"));
            }
            Source::Data(op - 1)
        };
        let allowed = found == durable[s as usize] || later[s as usize].contains(&found);
        if !allowed {
            return Err(format!(
                "sector {s} holds {found:?}, but the last acknowledged op there was {:?} ({:?}) and later ops wrote {:?}",
                durable_op[s as usize], durable[s as usize], later[s as usize]
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_accepts_the_live_state_and_rejects_a_lost_acknowledged_write() {
        let size = 64 * SECTOR;
        let ops = vec![
            Op::Write { sector: 0, sectors: 4, fua: false },
            Op::Flush,
            Op::Write { sector: 2, sectors: 4, fua: false },
        ];
        let mut contents = vec![0u8; size as usize];
        let apply = |contents: &mut Vec<u8>, index: u64, sector: u64, sectors: u64| {
            let data = write_payload(7, index, sector, sectors);
            contents[(sector * SECTOR) as usize..((sector + sectors) * SECTOR) as usize].copy_from_slice(&data);
        };
        apply(&mut contents, 0, 0, 4);
        assert_eq!(verify(7, &ops, 2, 3, &contents), Ok(()));
        apply(&mut contents, 2, 2, 4);
        assert_eq!(verify(7, &ops, 2, 3, &contents), Ok(()));
        // Losing the acknowledged op 0 on sector 0 is caught.
        contents[..SECTOR as usize].fill(0);
        assert!(verify(7, &ops, 2, 3, &contents).is_err());
        // So is garbage.
        contents[0] = 1;
        assert!(verify(7, &ops, 2, 3, &contents).is_err());
    }
}
