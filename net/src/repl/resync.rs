//! Resync: copying to the standby what it lacks, on a stream of its own so that it never
//! sits in front of live records.
//!
//! The primary reads each block with [`keel_engine::Volume::read_at_seq`], which tells the
//! seq `s` the block's contents correspond to. Live records keep flowing on the journal
//! stream meanwhile, so a block may reach the standby after a record newer than `s` that
//! overlaps it. The standby therefore waits until it has applied the journal up to `s`,
//! then writes the block except the bytes that records after `s` already wrote (it keeps
//! the extents of the records it applied while a resync runs). The result is the state at
//! the standby's applied seq, byte for byte.
//!
//! # Invariants
//! - Block read seqs never decrease (blocks are read one after another).
//! - The standby never writes resync data over bytes a record newer than the block wrote.
//! - The standby's copy is marked inconsistent (durably) before the first resync write and
//!   consistent only after `sync_all` made every resync write durable.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use serde_json::json;

use super::node::{read_json, write_json};
use super::proto::{Control, Hello, HelloReply, StreamKind, Verdict};
use super::volume::{ReplVolume, ShipQueue};
use super::wire::{read_frame, FrameType, ResyncDataMsg, ResyncEndMsg, MAX_FRAME_PAYLOAD};

/// Largest block sent in one frame.
const BLOCK_BYTES: u64 = 1 << 20;
/// Live record extents kept on the standby while a resync runs.
const RING_MAX: usize = 1 << 20;

/// The standby's record of live writes while a resync runs (shared between the journal
/// applier and the resync applier).
#[derive(Debug, Default)]
pub(crate) struct ResyncGuard {
    inner: Mutex<GuardInner>,
    applied: Condvar,
}

#[derive(Debug, Default)]
struct GuardInner {
    applied_seq: u64,
    /// `(seq, offset, length)` of data records applied, in seq order.
    ring: VecDeque<(u64, u64, u64)>,
    /// Records with seq at or below this were dropped from the ring.
    floor: u64,
    closed: bool,
}

impl ResyncGuard {
    pub(crate) fn new(applied_seq: u64) -> Arc<Self> {
        let guard = Self::default();
        guard.inner.lock().applied_seq = applied_seq;
        guard.inner.lock().floor = applied_seq;
        Arc::new(guard)
    }

    /// Called by the journal applier for each record: `apply` writes it, and its extent is
    /// kept, with no resync write in between. Otherwise a resync block checked against the
    /// extents just before the record's data lands is written just after, over it, with
    /// older bytes (seen as diverged copies after partitions: `write_uncovered` holds the
    /// same lock from its check to its last write).
    pub(crate) fn apply(
        &self,
        seq: u64,
        extent: Option<(u64, u64)>,
        apply: impl FnOnce() -> Result<(), String>,
    ) -> Result<(), String> {
        let inner = self.inner.lock();
        apply()?;
        self.record_applied(inner, seq, extent);
        Ok(())
    }

    /// The journal applier applied `seq` (tests; the driver uses [`ResyncGuard::apply`]).
    #[cfg(test)]
    pub(crate) fn applied(&self, seq: u64, extent: Option<(u64, u64)>) {
        self.record_applied(self.inner.lock(), seq, extent);
    }

    fn record_applied(&self, mut inner: MutexGuard<'_, GuardInner>, seq: u64, extent: Option<(u64, u64)>) {
        inner.applied_seq = seq;
        if let Some((offset, length)) = extent {
            if inner.ring.len() == RING_MAX {
                if let Some((dropped, _, _)) = inner.ring.pop_front() {
                    inner.floor = dropped;
                }
            }
            inner.ring.push_back((seq, offset, length));
        }
        drop(inner);
        self.applied.notify_all();
    }

    pub(crate) fn close(&self) {
        self.inner.lock().closed = true;
        self.applied.notify_all();
    }

    /// Waits until the journal is applied up to `seq`, then calls `write` with each part of
    /// `[offset, offset+len)` that no record after `seq` wrote, while no record is applied.
    fn write_uncovered(
        &self,
        seq: u64,
        offset: u64,
        len: u64,
        mut write: impl FnMut(u64, u64) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut inner = self.inner.lock();
        for (offset, len) in self.uncovered_locked(&mut inner, seq, offset, len)? {
            write(offset, len)?;
        }
        Ok(())
    }

    /// The pieces [`ResyncGuard::write_uncovered`] would write (tests).
    #[cfg(test)]
    fn uncovered(&self, seq: u64, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, String> {
        self.uncovered_locked(&mut self.inner.lock(), seq, offset, len)
    }

    fn uncovered_locked(
        &self,
        inner: &mut MutexGuard<'_, GuardInner>,
        seq: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64)>, String> {
        while inner.applied_seq < seq {
            if inner.closed {
                return Err("the journal session ended".into());
            }
            self.applied.wait_for(inner, Duration::from_millis(100));
        }
        if inner.floor > seq {
            return Err(format!(
                "resync block of seq {seq} is older than the kept record extents (from {})",
                inner.floor
            ));
        }
        // Blocks come with non-decreasing seqs: extents at or below this one are done.
        while inner.ring.front().is_some_and(|&(s, _, _)| s <= seq) {
            inner.ring.pop_front();
            inner.floor = seq;
        }
        let mut covered: Vec<(u64, u64)> = inner
            .ring
            .iter()
            .filter(|&&(_, o, l)| o < offset + len && o + l > offset)
            .map(|&(_, o, l)| (o.max(offset), (o + l).min(offset + len)))
            .collect();
        covered.sort_unstable();
        let mut pieces = Vec::new();
        let mut at = offset;
        for (start, end) in covered {
            if start > at {
                pieces.push((at, start - at));
            }
            at = at.max(end);
        }
        if at < offset + len {
            pieces.push((at, offset + len - at));
        }
        Ok(pieces)
    }
}

/// Which blocks to copy.
enum Plan {
    /// These byte ranges (sorted, merged).
    Ranges(Vec<(u64, u64)>),
    /// Everything.
    Full,
}

impl Plan {
    /// A plan from unsorted, possibly overlapping ranges.
    fn ranges(mut ranges: Vec<(u64, u64)>) -> Self {
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (offset, len) in ranges {
            match merged.last_mut() {
                Some((o, l)) if offset <= *o + *l => *l = (*l).max(offset + len - *o),
                _ => merged.push((offset, len)),
            }
        }
        Plan::Ranges(merged)
    }

    /// The blocks to copy, as `(offset, len)`, at most [`BLOCK_BYTES`] each, clipped to
    /// the volume.
    fn blocks(&self, size: u64) -> Box<dyn Iterator<Item = (u64, u64)> + Send + '_> {
        let split = move |(offset, len): (u64, u64)| {
            let end = (offset + len).min(size);
            (offset..end).step_by(BLOCK_BYTES as usize).map(move |at| (at, BLOCK_BYTES.min(end - at)))
        };
        match self {
            Plan::Full => Box::new(split((0, size))),
            Plan::Ranges(ranges) => Box::new(ranges.iter().copied().filter(move |&(o, _)| o < size).flat_map(split)),
        }
    }

    fn total(&self, size: u64) -> u64 {
        self.blocks(size).map(|(_, l)| l).sum()
    }
}

/// Primary side: copies every region changed since `from` on either node.
pub(crate) async fn send(
    rv: &Arc<ReplVolume>,
    conn: &quinn::Connection,
    epoch: u64,
    from: u64,
    standby_region_bytes: u64,
    standby_regions: Option<Vec<u64>>,
    queue: &ShipQueue,
) -> Result<(), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("open the resync stream: {e}"))?;
    let _ = send.set_priority(0);
    let hello = Hello {
        volume: rv.name().to_string(),
        node: rv.config.node.clone(),
        stream: StreamKind::Resync,
        epoch,
        last_seq: rv.volume.last_seq(),
        history: rv.shared.lock().state.history.clone(),
        size: rv.volume.size(),
        features: Vec::new(),
    };
    write_json(&mut send, FrameType::Hello, &hello).await?;
    let reply: HelloReply = read_json(&mut recv, FrameType::HelloReply).await?;
    if reply.verdict != Verdict::Accept {
        return Err(format!("resync stream refused: {:?}", reply.verdict));
    }
    // What the standby may lack: what we wrote after `from` (our dirty map while we have
    // been primary long enough, else our change map), plus what it changed after `from`.
    let theirs: Option<Vec<(u64, u64)>> = standby_regions
        .map(|regions| regions.into_iter().map(|r| (r * standby_region_bytes, standby_region_bytes)).collect());
    let ours: Result<Vec<(u64, u64)>, String> = match rv.dirty.written_after(from) {
        Some(ranges) => Ok(ranges),
        None => rv
            .volume
            .changed_since(from)
            .map(|set| set.regions.into_iter().map(|r| (r * set.region_bytes, set.region_bytes)).collect())
            .map_err(|e| e.to_string()),
    };
    let plan = match (ours, theirs) {
        (Ok(mut ours), Some(theirs)) => {
            ours.extend(theirs);
            Plan::ranges(ours)
        }
        (ours, _) => {
            let why = match ours {
                Err(e) => format!("this node's change map cannot answer: {e}"),
                Ok(_) => "the standby's change map cannot answer".to_string(),
            };
            rv.emit("resync_full", json!({"reason": why}));
            Plan::Full
        }
    };
    let size = rv.volume.size();
    let total = plan.total(size);
    let started = Instant::now();
    rv.shared.lock().resync = Some((0, total));
    rv.emit("resync", json!({"state": "started", "from_seq": from, "total_bytes": total}));
    let mut done = 0u64;
    let mut last_seq = from;
    let mut next_report = total / 10;
    let rate = rv.config.resync_bytes_per_sec.max(1 << 20);
    for (offset, len) in plan.blocks(size) {
        // Live records first: while they queue up, resync waits (bounded).
        let mut yielded = 0;
        while queue.backlog() > (1 << 20) && yielded < 200 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            yielded += 1;
        }
        // Rate cap: stay under `rate` bytes per second on average.
        let due = started + Duration::from_secs_f64(done as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let volume = Arc::clone(&rv.volume);
        let block = tokio::task::spawn_blocking(move || read_block(&volume, offset, len))
            .await
            .map_err(|e| format!("resync read task failed: {e}"))??;
        last_seq = last_seq.max(block.read_seq);
        let msg = ResyncDataMsg { epoch, ..block };
        send.write_all_chunks(&mut msg.encode_chunks()).await.map_err(|e| format!("send resync data: {e}"))?;
        done += len;
        rv.shared.lock().resync = Some((done, total));
        if done >= next_report && total > 0 {
            rv.emit("resync", json!({"state": "progress", "done_bytes": done, "total_bytes": total}));
            next_report = done + total / 10;
        }
    }
    send.write_all(&ResyncEndMsg { epoch, upto_seq: last_seq }.encode())
        .await
        .map_err(|e| format!("send resync end: {e}"))?;
    let durable_seq = match read_json::<Control>(&mut recv, FrameType::Control).await? {
        Control::ResyncDone { durable_seq } => durable_seq,
        other => return Err(format!("expected ResyncDone, got {other:?}")),
    };
    {
        let mut shared = rv.shared.lock();
        shared.resync = None;
        if let Some(fence) = shared.primary.as_mut() {
            fence.handle_standby_in_sync(Instant::now(), durable_seq);
        }
    }
    rv.notify();
    let secs = started.elapsed().as_secs_f64();
    rv.emit(
        "resync",
        json!({"state": "done", "bytes": total, "seconds": secs, "mib_per_sec": total as f64 / (1u64 << 20) as f64 / secs.max(1e-6)}),
    );
    super::primary::finish(&mut send).await;
    Ok(())
}

/// Reads one block as of a definite seq; holes and all-zero blocks travel as zero ranges.
fn read_block(volume: &keel_engine::Volume, offset: u64, len: u64) -> Result<ResyncDataMsg, String> {
    let mut buf = vec![0u8; len as usize];
    let read_seq = volume.read_at_seq(offset, &mut buf).map_err(|e| format!("read {offset}+{len}: {e}"))?;
    let zero = buf.iter().all(|&b| b == 0);
    Ok(ResyncDataMsg {
        epoch: 0,
        read_seq,
        offset,
        length: len,
        zero,
        payload: if zero { bytes::Bytes::new() } else { bytes::Bytes::from(buf) },
    })
}

/// Standby side: applies resync blocks, then makes them durable and reports.
pub(crate) async fn receive(
    rv: &Arc<ReplVolume>,
    guard: Arc<ResyncGuard>,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    epoch: u64,
) -> Result<(), String> {
    let mut bytes = 0u64;
    loop {
        let frame = read_frame(recv, MAX_FRAME_PAYLOAD)
            .await
            .map_err(|e| format!("read resync data: {e}"))?
            .ok_or("the primary closed the resync stream early")?;
        match frame.ty {
            FrameType::ResyncData => {
                let msg = ResyncDataMsg::decode(&frame).map_err(|e| format!("bad resync frame: {e}"))?;
                if msg.epoch != epoch {
                    return Err(format!("resync data of epoch {} in epoch {epoch}", msg.epoch));
                }
                bytes += msg.length;
                let (volume, guard) = (Arc::clone(&rv.volume), Arc::clone(&guard));
                tokio::task::spawn_blocking(move || apply_block(&volume, &guard, &msg))
                    .await
                    .map_err(|e| format!("resync apply task failed: {e}"))??;
            }
            FrameType::ResyncEnd => {
                let end = ResyncEndMsg::decode(&frame).map_err(|e| format!("bad resync end: {e}"))?;
                if end.epoch != epoch {
                    return Err(format!("resync end of epoch {} in epoch {epoch}", end.epoch));
                }
                break;
            }
            other => return Err(format!("unexpected {other:?} frame on the resync stream")),
        }
    }
    let volume = Arc::clone(&rv.volume);
    let durable_seq = tokio::task::spawn_blocking(move || volume.sync_all())
        .await
        .map_err(|e| format!("sync task failed: {e}"))?
        .map_err(|e| format!("make the resync durable: {e}"))?;
    {
        let mut shared = rv.shared.lock();
        shared.state.consistent = true;
        shared.state.store(rv.volume.dir()).map_err(|e| format!("persist the replication state: {e}"))?;
        if let Some(fence) = shared.standby.as_mut() {
            fence.handle_in_sync(true);
        }
    }
    rv.emit("resync", json!({"state": "done", "bytes": bytes, "durable_seq": durable_seq}));
    rv.notify();
    write_json(send, FrameType::Control, &Control::ResyncDone { durable_seq }).await?;
    super::primary::finish(send).await;
    Ok(())
}

fn apply_block(volume: &keel_engine::Volume, guard: &ResyncGuard, msg: &ResyncDataMsg) -> Result<(), String> {
    if !msg.zero && msg.payload.len() as u64 != msg.length {
        return Err(format!("resync block at {} carries {} bytes for {}", msg.offset, msg.payload.len(), msg.length));
    }
    guard.write_uncovered(msg.read_seq, msg.offset, msg.length, |offset, len| {
        let result = if msg.zero {
            volume.zero_resync(offset, len)
        } else {
            let start = (offset - msg.offset) as usize;
            volume.write_resync(offset, &msg.payload[start..start + len as usize])
        };
        result.map_err(|e| format!("apply resync data at {offset}+{len}: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block read at seq 5 must not overwrite bytes that records 6.. wrote.
    #[test]
    fn uncovered_skips_newer_records() {
        let guard = ResyncGuard::new(4);
        guard.applied(5, Some((0, 4096)));
        guard.applied(6, Some((8192, 4096)));
        guard.applied(7, Some((12288, 100)));
        let pieces = guard.uncovered(5, 0, 16384).unwrap();
        assert_eq!(pieces, vec![(0, 8192), (12388, 16384 - 12388)]);
        // Extents at or below 5 are gone now; a later block at seq 7 sees nothing newer.
        assert_eq!(guard.uncovered(7, 0, 16384).unwrap(), vec![(0, 16384)]);
    }

    #[test]
    fn uncovered_refuses_blocks_older_than_the_ring() {
        let guard = ResyncGuard::new(10);
        guard.applied(11, Some((0, 512)));
        assert!(guard.uncovered(3, 0, 4096).is_err());
    }

    #[test]
    fn plans_merge_ranges_and_split_blocks() {
        let plan = Plan::ranges(vec![(65536, 65536), (0, 65536), (131072, 4096), (5 << 20, 3 << 20), (1 << 40, 10)]);
        let blocks: Vec<_> = plan.blocks(7 << 20).collect();
        assert_eq!(blocks, vec![(0, 135168), (5 << 20, 1 << 20), (6 << 20, 1 << 20)]);
        assert_eq!(Plan::Full.blocks(3 << 20).count(), 3);
        assert_eq!(Plan::Full.total((3 << 20) + 512), (3 << 20) + 512);
    }
}
