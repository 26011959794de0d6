//! Random operations interrupted by simulated power cuts: after every crash and reopen,
//! every sector holds either the value it had at the last acknowledged flush or a value
//! written after it — never anything else, and never an older value.

use keel_engine::testing::FaultyEnv;
use keel_engine::PersistMode;
use rand::Rng;

use crate::support::{create_and_open, reopen, rng, SECTOR};

const SIZE: u64 = 1 << 20;
const SECTORS: usize = SIZE as usize / SECTOR;

/// Per sector: the value as of the last acknowledged flush, and every value written since.
struct Expectation {
    durable: Vec<Vec<u8>>,
    since: Vec<Vec<Vec<u8>>>,
}

impl Expectation {
    fn new() -> Self {
        Self { durable: vec![vec![0; SECTOR]; SECTORS], since: vec![Vec::new(); SECTORS] }
    }
    fn wrote(&mut self, first: usize, data: &[u8]) {
        for (i, chunk) in data.chunks(SECTOR).enumerate() {
            self.since[first + i].push(chunk.to_vec());
        }
    }
    fn flushed(&mut self, contents: &[u8]) {
        for (i, chunk) in contents.chunks(SECTOR).enumerate() {
            self.durable[i] = chunk.to_vec();
            self.since[i].clear();
        }
    }
    fn check(&self, contents: &[u8], seed: u64) {
        for (i, chunk) in contents.chunks(SECTOR).enumerate() {
            let ok = chunk == &self.durable[i][..] || self.since[i].iter().any(|v| v == chunk);
            assert!(ok, "sector {i} holds a value that was never acknowledged or written since (seed {seed})");
        }
    }
}

#[test]
fn acknowledged_writes_survive_random_power_cuts() {
    let (mut rng, seed) = rng("acknowledged_writes_survive_random_power_cuts");
    for round in 0..12 {
        let env = FaultyEnv::new();
        let dir = std::path::PathBuf::from(format!("/crash{round}"));
        let (mut volume, _) = create_and_open(&env, &dir, SIZE);
        let mut expect = Expectation::new();
        let mut live = vec![0u8; SIZE as usize];
        for _crash in 0..6 {
            let ops = rng.gen_range(1..150);
            for _ in 0..ops {
                let first = rng.gen_range(0..SECTORS);
                let count = rng.gen_range(1..=(SECTORS - first).min(96));
                let at = (first * SECTOR) as u64;
                match rng.gen_range(0..10) {
                    0..=5 => {
                        let data: Vec<u8> = (0..count * SECTOR).map(|_| rng.gen()).collect();
                        let fua = rng.gen_bool(0.1);
                        let mode = if fua { PersistMode::Durable } else { PersistMode::Buffered };
                        volume.write(at, &data, mode).unwrap();
                        live[at as usize..at as usize + data.len()].copy_from_slice(&data);
                        expect.wrote(first, &data);
                        if fua {
                            expect.flushed(&live);
                        }
                    }
                    6 => {
                        let len = (count * SECTOR) as u64;
                        volume.write_zeroes(at, len, rng.gen(), PersistMode::Buffered).unwrap();
                        live[at as usize..(at + len) as usize].fill(0);
                        expect.wrote(first, &vec![0; len as usize]);
                    }
                    7 => {
                        let len = (count * SECTOR) as u64;
                        volume.trim(at, len, PersistMode::Buffered).unwrap();
                        live[at as usize..(at + len) as usize].fill(0);
                        expect.wrote(first, &vec![0; len as usize]);
                    }
                    8 => {
                        volume.flush().unwrap();
                        expect.flushed(&live);
                    }
                    _ => volume.checkpoint().unwrap(),
                }
            }
            // Power cut: the volume's in-memory state is abandoned without a flush.
            std::mem::forget(volume);
            env.crash(&mut rng);
            let (reopened, _report) = reopen(&env, &dir).unwrap_or_else(|e| panic!("reopen failed (seed {seed}): {e}"));
            volume = reopened;
            volume.read(0, &mut live).unwrap();
            expect.check(&live, seed);
            // Recovery made what it found durable: that is the new baseline.
            expect.flushed(&live);
        }
    }
}
