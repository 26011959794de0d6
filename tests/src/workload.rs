//! A deterministic, self-describing write workload for crash trials.
//!
//! Every 512-byte sector a write puts on the volume starts with the op index and the
//! sector's own number, followed by bytes derived from (seed, op, sector). After a crash a
//! checker can therefore name, for every sector, which op wrote what it holds, and decide
//! whether that is allowed: the last op at or before the last acknowledged flush that
//! touched the sector, or any op after it — never an older value, never garbage.

use std::sync::atomic::{AtomicUsize, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::nbd_client::NbdClient;

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

/// The test's random generator and its seed (`KEEL_TEST_SEED` pins it; the seed is printed).
pub fn seeded(test: &str) -> (rand::rngs::StdRng, u64) {
    let seed = std::env::var("KEEL_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: KEEL_TEST_SEED={seed}");
    (rand::rngs::StdRng::seed_from_u64(seed), seed)
}

/// Runs `ops` over NBD against the part of the volume starting at `base`, recording in
/// `acked` how many ops were covered by an acknowledged flush or FUA write, until the
/// daemon dies or the ops run out.
pub fn run_client(mut client: NbdClient, seed: u64, base: u64, ops: &[Op], acked: &AtomicUsize) {
    for (index, op) in ops.iter().enumerate() {
        let result = match *op {
            Op::Write { sector, sectors, fua } => {
                client.write(base + sector * SECTOR, &write_payload(seed, index as u64, sector, sectors), fua)
            }
            Op::Zero { sector, sectors, trim: true } => client.trim(base + sector * SECTOR, (sectors * SECTOR) as u32),
            Op::Zero { sector, sectors, trim: false } => {
                client.write_zeroes(base + sector * SECTOR, (sectors * SECTOR) as u32)
            }
            Op::Flush => client.flush(),
        };
        if result.is_err() {
            return; // the daemon died under us
        }
        if op.is_barrier() {
            acked.store(index + 1, Ordering::SeqCst);
        }
    }
}

/// Several NBD clients, each running its own generated ops against its own part of a
/// volume and recording how many were covered by an acknowledged FLUSH or FUA write, until
/// the server dies under them or the ops run out.
pub struct Load {
    part: u64,
    ops_per_client: usize,
    clients: Vec<LoadClient>,
}

struct LoadClient {
    seed: u64,
    ops: std::sync::Arc<Vec<Op>>,
    acked: std::sync::Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

impl Load {
    /// Starts one client per seed on `export` at `socket`; client `i` writes the `part`
    /// bytes starting at `i * part`.
    pub fn start(
        socket: &std::path::Path,
        export: &str,
        seeds: &[u64],
        part: u64,
        ops_per_client: usize,
    ) -> anyhow::Result<Self> {
        let mut clients = Vec::new();
        for (index, &seed) in seeds.iter().enumerate() {
            let ops = std::sync::Arc::new(generate(seed, part, ops_per_client));
            let acked = std::sync::Arc::new(AtomicUsize::new(0));
            let client = NbdClient::connect(socket, export)?;
            let base = index as u64 * part;
            let thread = {
                let (ops, acked) = (ops.clone(), acked.clone());
                std::thread::spawn(move || run_client(client, seed, base, &ops, &acked))
            };
            clients.push(LoadClient { seed, ops, acked, thread });
        }
        Ok(Self { part, ops_per_client, clients })
    }

    /// Ops acknowledged so far, over all clients.
    pub fn acked(&self) -> usize {
        self.clients.iter().map(|c| c.acked.load(Ordering::SeqCst)).sum()
    }

    /// Whether every client has stopped (its ops ran out, or the server failed it).
    pub fn finished(&self) -> bool {
        self.clients.iter().all(|c| c.thread.is_finished())
    }

    /// Spins until `n` ops are acknowledged or every client stopped; progress comes from
    /// the acknowledgements, not from time.
    pub fn wait_acked(&self, n: usize) {
        while self.acked() < n && !self.finished() {
            std::thread::yield_now();
        }
    }

    /// Waits for every client to stop, then checks each one's part as read through
    /// `reader`: every acknowledged op is there, nothing holds garbage. Returns the
    /// acknowledged counts, or every violation found (with the client's seed).
    pub fn verify(self, reader: &mut NbdClient) -> Result<Vec<usize>, String> {
        let mut counts = Vec::new();
        let mut violations = Vec::new();
        for (index, client) in self.clients.into_iter().enumerate() {
            client.thread.join().map_err(|_| format!("client {index} panicked"))?;
            let acked = client.acked.load(Ordering::SeqCst);
            let mut contents = vec![0u8; self.part as usize];
            for (i, chunk) in contents.chunks_mut(1 << 20).enumerate() {
                reader
                    .read(index as u64 * self.part + ((i as u64) << 20), chunk)
                    .map_err(|e| format!("read client {index}'s part: {e}"))?;
            }
            if let Err(violation) = verify(client.seed, &client.ops, acked, self.ops_per_client, &contents) {
                violations
                    .push(format!("client {index} (seed {}), {acked} ops acknowledged: {violation}", client.seed));
            }
            counts.push(acked);
        }
        if violations.is_empty() {
            Ok(counts)
        } else {
            Err(violations.join("\n"))
        }
    }
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
