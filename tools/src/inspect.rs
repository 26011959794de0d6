//! `keel-inspect`: read a volume directory offline and show what is on disk.
//!
//! Reads go around the daemon (no lock is taken), so run it on a stopped node, or accept
//! that a live volume may change while it is read.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use keel_engine::format::{ChangeMapHeader, RecordKind, CHANGEMAP_HEADER_LEN};
use keel_engine::{list_segments, scan, Env, OpenMode, PosixEnv, Volume};
use serde::Serialize;
use serde_json::json;

use crate::units::format_size;

fn env() -> Arc<dyn Env> {
    Arc::new(PosixEnv::posix())
}

/// `keel-inspect volume DIR`.
pub fn volume(dir: &Path, as_json: bool) -> Result<()> {
    let env = env();
    let sb = Volume::read_superblock(env.as_ref(), dir)?;
    let segments = list_segments(env.as_ref(), dir, sb.volume_id)?;
    let changemap = read_changemap(env.as_ref(), dir);
    let id = hex(&sb.volume_id);
    if as_json {
        let value = json!({
            "name": sb.name,
            "volume_id": id,
            "size": sb.size,
            "block_size": sb.block_size,
            "epoch": sb.epoch,
            "checkpoint": { "seq": sb.checkpoint_seq, "segment": sb.checkpoint_segment, "offset": sb.checkpoint_offset },
            "journal": {
                "segment_bytes": sb.segment_bytes,
                "segment_count_max": sb.segment_count_max,
                "slots": segments.iter().map(|s| json!({
                    "slot": s.index,
                    "segment": s.header.map(|h| h.segment_no),
                    "first_seq": s.header.map(|h| h.first_seq),
                    "state": s.header_error.clone().unwrap_or_else(|| "in use".into()),
                })).collect::<Vec<_>>(),
            },
            "change_map": changemap.as_ref().map(|(h, changed)| json!({
                "generation": h.generation,
                "trusted": changemap_trusted(h, &sb),
                "base_seq": h.base_seq,
                "region_bytes": h.region_bytes,
                "regions": h.region_count,
                "changed_regions": changed,
            })).unwrap_or_else(|e| json!({ "error": e })),
            "extent_file_bytes": sb.extent_file_bytes,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("volume      {}", sb.name);
    println!("id          {id}");
    println!("size        {} ({} bytes, block {} B)", format_size(sb.size), sb.size, sb.block_size);
    println!("epoch       {}", sb.epoch);
    println!(
        "checkpoint  seq {} at segment {} offset {}",
        sb.checkpoint_seq, sb.checkpoint_segment, sb.checkpoint_offset
    );
    println!(
        "journal     {} segments of {} (max {})",
        segments.len(),
        format_size(sb.segment_bytes),
        sb.segment_count_max
    );
    println!("  {:>4}  {:>8}  {:>12}  state", "slot", "segment", "first seq");
    for s in &segments {
        let (no, first) =
            s.header.map_or(("-".into(), "-".into()), |h| (h.segment_no.to_string(), h.first_seq.to_string()));
        println!("  {:>4}  {:>8}  {:>12}  {}", s.index, no, first, s.header_error.as_deref().unwrap_or("in use"));
    }
    match changemap {
        Ok((h, changed)) => {
            let trust = if changemap_trusted(&h, &sb) {
                "trusted"
            } else {
                "NOT trusted (generation, volume or geometry mismatch: rebuilt on open)"
            };
            println!(
                "change map  generation {} ({trust}), {} regions of {}, {} changed since seq {}",
                h.generation,
                h.region_count,
                format_size(u64::from(h.region_bytes)),
                changed,
                h.base_seq
            );
        }
        Err(e) => println!("change map  unusable: {e} (will be rebuilt on open; incrementals fall back to full scans)"),
    }
    Ok(())
}

/// The same trust test the engine applies when it opens the volume.
fn changemap_trusted(h: &ChangeMapHeader, sb: &keel_engine::format::Superblock) -> bool {
    h.generation == sb.changemap_generation
        && h.volume_id == sb.volume_id
        && h.region_bytes == sb.change_region_bytes
        && h.region_count == sb.size.div_ceil(u64::from(sb.change_region_bytes))
}

/// The change map's header and number of changed regions; an error when the map is
/// unreadable or its bitmap does not match the header's checksum.
fn read_changemap(env: &dyn Env, dir: &Path) -> Result<(ChangeMapHeader, u64), String> {
    let file = env.open(&dir.join("changemap.bin"), OpenMode::Existing).map_err(|e| e.to_string())?;
    let mut block = vec![0u8; CHANGEMAP_HEADER_LEN];
    file.read_at(&mut block, 0).map_err(|e| e.to_string())?;
    let header = ChangeMapHeader::decode(&block).map_err(|e| e.to_string())?;
    let mut bits = vec![0u8; header.region_count.div_ceil(64) as usize * 8];
    file.read_at(&mut bits, CHANGEMAP_HEADER_LEN as u64).map_err(|e| e.to_string())?;
    let crc = crc32fast::hash(&bits);
    if crc != header.bitmap_crc {
        return Err(format!("bitmap checksum mismatch (expected {:#010x}, got {crc:#010x})", header.bitmap_crc));
    }
    let changed = bits.iter().map(|b| u64::from(b.count_ones())).sum();
    Ok((header, changed))
}

#[derive(Serialize)]
struct RecordRow {
    seq: u64,
    kind: &'static str,
    epoch: u64,
    offset: u64,
    length: u64,
    segment: u64,
    file_offset: u64,
}

/// `keel-inspect journal DIR`: the records after the checkpoint; `--all` starts at the
/// oldest segment still on disk; `--verify` checks every record and exits non-zero on
/// corruption.
pub fn journal(dir: &Path, all: bool, verify: bool, limit: usize, as_json: bool) -> Result<bool> {
    let env = env();
    let sb = Volume::read_superblock(env.as_ref(), dir)?;
    let segments = list_segments(env.as_ref(), dir, sb.volume_id)?;
    let (start_segment, start_offset, start_seq) = if all {
        oldest_start(&segments, sb.checkpoint_segment).unwrap_or((
            sb.checkpoint_segment,
            sb.checkpoint_offset,
            sb.checkpoint_seq + 1,
        ))
    } else {
        (sb.checkpoint_segment, sb.checkpoint_offset, sb.checkpoint_seq + 1)
    };
    let mut rows = Vec::new();
    let mut total = 0u64;
    let params = keel_engine::ScanParams {
        segment_bytes: sb.segment_bytes,
        volume_size: sb.size,
        start_segment,
        start_offset,
        start_seq,
    };
    let outcome = scan(env.as_ref(), &sb.name, &segments, params, |r| {
        total += 1;
        if rows.len() < limit {
            rows.push(RecordRow {
                seq: r.header.seq,
                kind: r.header.kind.name(),
                epoch: r.header.epoch,
                offset: r.header.offset,
                length: r.header.length,
                segment: r.segment_no,
                file_offset: r.file_offset,
            });
        }
        Ok(())
    });
    let verdict = match &outcome {
        Ok(end) => match &end.torn {
            Some(t) => format!(
                "ok, with a torn tail: {} bytes at segment {} offset {} (seq {}): {} — dropped on next open",
                t.bytes_dropped, t.segment_no, t.offset, t.seq, t.reason
            ),
            None => "ok".to_string(),
        },
        Err(e) => format!("CORRUPT: {e}"),
    };
    if as_json {
        let value = json!({
            "volume": sb.name,
            "from_seq": start_seq,
            "records": total,
            "shown": rows,
            "next_seq": outcome.as_ref().ok().map(|e| e.next_seq),
            "verify": if verify { Some(&verdict) } else { None },
            "corrupt": outcome.is_err(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "{:>10}  {:<8}  {:>5}  {:>14}  {:>10}  {:>7}  {:>10}",
            "seq", "kind", "epoch", "offset", "length", "segment", "at"
        );
        for row in &rows {
            let offset = if row.kind == RecordKind::Barrier.name() {
                format!("durable≤{}", row.offset)
            } else {
                row.offset.to_string()
            };
            println!(
                "{:>10}  {:<8}  {:>5}  {:>14}  {:>10}  {:>7}  {:>10}",
                row.seq, row.kind, row.epoch, offset, row.length, row.segment, row.file_offset
            );
        }
        if (total as usize) > rows.len() {
            println!("… {} more records (use --limit)", total as usize - rows.len());
        }
        println!("{total} records from seq {start_seq}");
        if verify || outcome.is_err() {
            println!("verify: {verdict}");
        }
    }
    Ok(outcome.is_ok())
}

/// The oldest retained segment in an unbroken run of segment numbers ending at the
/// checkpoint segment (the scan then checks that first seqs chain).
fn oldest_start(segments: &[keel_engine::SegmentInfo], checkpoint_segment: u64) -> Option<(u64, u64, u64)> {
    let mut no = checkpoint_segment;
    let mut found = None;
    while let Some(h) = segments.iter().filter_map(|s| s.header).find(|h| h.segment_no == no) {
        found = Some((h.segment_no, keel_engine::format::SEGMENT_HEADER_LEN as u64, h.first_seq));
        no = no.checked_sub(1)?;
    }
    found
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens nothing, but checks the path looks like a volume, for friendlier errors.
pub fn require_volume_dir(dir: &Path) -> Result<()> {
    if !dir.join(keel_engine::SUPERBLOCK_FILE).exists() {
        anyhow::bail!("{} is not a Keel volume directory (no {})", dir.display(), keel_engine::SUPERBLOCK_FILE);
    }
    std::fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    Ok(())
}
