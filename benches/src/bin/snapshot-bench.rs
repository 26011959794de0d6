//! `snapshot-bench`: drives `keel_snapshot` on an image file, for
//! `benches/compare/snapshot.sh` (Keel next to restic and borg).
//!
//! Subcommands, each printing one JSON line of results on stdout:
//!
//! - `full --image F --repo DIR [--chunk-size N] [--zstd L] [--threads T]`: a full snapshot
//!   (every chunk read) of F into the local vault DIR.
//! - `incr --image F --repo DIR --changed-pages FILE [--zstd L] [--threads T]`: an
//!   incremental snapshot whose parent is the newest snapshot in DIR. FILE lists the byte
//!   offsets of the 8 KiB pages the churn step wrote, one per line. They become the chunk
//!   list exactly as a volume's change map would report them: every 64 KiB region a page
//!   touches (`VolumeOptions::default().change_region_bytes`), widened to whole chunks by
//!   the same function `keel snapshot` uses (`keel_tools::snapshot::regions_to_chunks`).
//! - `restore --repo DIR --to FILE [--threads T]`: restores the newest snapshot in DIR into
//!   a new sparse file (holes are skipped, not written), then fsyncs it.
//!
//! The key is a fixed test key; volume, tenant and vault are all named `bench`. Sizes
//! take K/M/G suffixes (powers of 1024). Seconds are the library call alone (the script
//! also times the whole process); CPU seconds are the process's user + system time.

use std::path::PathBuf;
use std::time::Instant;

use keel_snapshot::create::{create_snapshot, Changed, CreateOptions, CreateReport, FileSource};
use keel_snapshot::maintain;
use keel_snapshot::manifest::Manifest;
use keel_snapshot::restore::{restore, FileTarget, RestoreOptions};
use keel_snapshot::vault::LocalVault;
use keel_snapshot::TenantKey;
use serde_json::{json, Value};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A fixed key: the benchmark measures the pipeline, not key handling.
const BENCH_KEY: [u8; 32] = *b"keel-snapshot-bench-fixed-key-01";
const NAME: &str = "bench";
/// The churn step writes pages of this size (PostgreSQL's page).
const PAGE_BYTES: u64 = 8 << 10;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.split_first() {
        Some((command, rest)) => Options::parse(rest).and_then(|options| match command.as_str() {
            "full" => full(&options),
            "incr" => incremental(&options),
            "restore" => restore_newest(&options),
            other => Err(format!("unknown subcommand {other:?} (full, incr or restore)").into()),
        }),
        None => Err("usage: snapshot-bench full|incr|restore [options] (see the module docs)".into()),
    };
    match outcome {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("snapshot-bench: {e}");
            std::process::exit(1);
        }
    }
}

struct Options {
    image: Option<PathBuf>,
    repo: Option<PathBuf>,
    to: Option<PathBuf>,
    changed_pages: Option<PathBuf>,
    chunk_size: u32,
    zstd_level: i32,
    threads: usize,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let mut options = Self {
            image: None,
            repo: None,
            to: None,
            changed_pages: None,
            chunk_size: 64 << 10,
            zstd_level: 3,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let number =
                || -> Result<u64> { parse_size(value).ok_or_else(|| format!("{flag} {value:?}: not a size").into()) };
            match flag.as_str() {
                "--image" => options.image = Some(value.into()),
                "--repo" => options.repo = Some(value.into()),
                "--to" => options.to = Some(value.into()),
                "--changed-pages" => options.changed_pages = Some(value.into()),
                "--chunk-size" => options.chunk_size = u32::try_from(number()?)?,
                "--zstd" => options.zstd_level = value.parse()?,
                "--threads" => options.threads = usize::try_from(number()?)?.max(1),
                other => return Err(format!("unknown argument {other:?}").into()),
            }
        }
        Ok(options)
    }

    fn required<'a>(value: &'a Option<PathBuf>, flag: &str) -> Result<&'a PathBuf> {
        value.as_ref().ok_or_else(|| format!("{flag} is required").into())
    }

    fn vault(&self) -> Result<LocalVault> {
        Ok(LocalVault::open_deferred(NAME, Self::required(&self.repo, "--repo")?, NAME)?)
    }

    fn create_options(&self, chunk_size: u32, marker_seq: u64) -> CreateOptions {
        CreateOptions {
            volume: NAME.into(),
            marker: format!("bench-{marker_seq}"),
            marker_seq,
            node: NAME.into(),
            chunk_size,
            zstd_level: self.zstd_level,
            threads: self.threads,
            snapshot_id: None,
            created_unix: None,
            group: None,
            read_limit: None,
            busy_read_limit: None,
            // restic and borg run at normal priority: like for like (on a quiet machine
            // the daemon's default, idle, reads and seals as fast).
            cpu_priority: keel_snapshot::priority::CpuPriority::Normal,
            stop: None,
        }
    }
}

/// `64K`, `1M`, `4096`.
fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'K' | b'k' => (&text[..text.len() - 1], 10),
        b'M' | b'm' => (&text[..text.len() - 1], 20),
        b'G' | b'g' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn full(options: &Options) -> Result<Value> {
    let vault = options.vault()?;
    let source = FileSource::open(Options::required(&options.image, "--image")?)?;
    let create = options.create_options(options.chunk_size, 1);
    let started = Instant::now();
    let report = create_snapshot(
        &TenantKey::from_bytes(BENCH_KEY),
        &vault,
        &source,
        &create,
        None,
        Changed::All("full snapshot benchmark".into()),
        &|_| {},
    )?;
    Ok(create_json("full", &create, &report, started.elapsed().as_secs_f64(), json!({})))
}

fn incremental(options: &Options) -> Result<Value> {
    let vault = options.vault()?;
    let key = TenantKey::from_bytes(BENCH_KEY);
    let parent = newest(&vault, &key)?;
    let chunk_size = parent.chunk_size();
    let pages_path = Options::required(&options.changed_pages, "--changed-pages")?;
    let text = std::fs::read_to_string(pages_path).map_err(|e| format!("read {}: {e}", pages_path.display()))?;
    let pages: Vec<u64> = text
        .split_whitespace()
        .map(|word| word.parse().map_err(|e| format!("{}: {word:?}: {e}", pages_path.display())))
        .collect::<std::result::Result<_, _>>()?;
    let started = Instant::now();
    // What the change map would hold after those writes: every region a page touches.
    let region_bytes = u64::from(keel_engine::VolumeOptions::default().change_region_bytes);
    let mut regions: Vec<u64> =
        pages.iter().flat_map(|&offset| offset / region_bytes..=(offset + PAGE_BYTES - 1) / region_bytes).collect();
    regions.sort_unstable();
    regions.dedup();
    let chunks = keel_tools::snapshot::regions_to_chunks(&regions, region_bytes, chunk_size);
    let chunk_count = chunks.len();
    let source = FileSource::open(Options::required(&options.image, "--image")?)?;
    let create = options.create_options(chunk_size, parent.marker_seq() + 1);
    let report = create_snapshot(&key, &vault, &source, &create, Some(&parent), Changed::Chunks(chunks), &|_| {})?;
    if let Some(reason) = &report.full_read {
        return Err(format!("the incremental read everything: {reason}").into());
    }
    let extra = json!({
        "parent": parent.snapshot_id(),
        "changed_pages": pages.len(),
        "changed_regions": regions.len(),
        "region_bytes": region_bytes,
        "changed_chunks": chunk_count,
    });
    Ok(create_json("incr", &create, &report, started.elapsed().as_secs_f64(), extra))
}

fn restore_newest(options: &Options) -> Result<Value> {
    let vault = options.vault()?;
    let key = TenantKey::from_bytes(BENCH_KEY);
    let manifest = newest(&vault, &key)?;
    let to = Options::required(&options.to, "--to")?;
    let started = Instant::now();
    let target = FileTarget::create_sparse(to, manifest.volume_size())?;
    let restore_options = RestoreOptions { threads: options.threads, target_is_zeroed: true };
    let report = restore(&key, &[&vault], &manifest, &target, &restore_options, &|_| {})?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(json!({
        "op": "restore",
        "snapshot_id": manifest.snapshot_id(),
        "chunk_size": manifest.chunk_size(),
        "threads": options.threads,
        "volume_bytes": manifest.volume_size(),
        "seconds": seconds,
        "mib_per_s": manifest.volume_size() as f64 / (1 << 20) as f64 / seconds,
        "chunks_written": report.chunks_written,
        "holes": report.holes,
        "bytes_written": report.bytes_written,
        "cpu_s": cpu_seconds(),
    }))
}

/// The newest snapshot of volume `bench` in the vault, authenticated.
fn newest(vault: &LocalVault, key: &TenantKey) -> Result<Manifest> {
    let keys = maintain::manifest_keys(vault, Some(NAME))?;
    let newest = keys.last().ok_or("the repo holds no snapshot (run `full` first)")?;
    Ok(maintain::read_manifest(vault, &newest.key, Some(key))?)
}

fn create_json(op: &str, create: &CreateOptions, report: &CreateReport, seconds: f64, extra: Value) -> Value {
    let mut line = json!({
        "op": op,
        "snapshot_id": report.snapshot_id,
        "chunk_size": create.chunk_size,
        "zstd_level": create.zstd_level,
        "threads": create.threads,
        "seconds": seconds,
        "bytes_read": report.bytes_read,
        "read_mib_per_s": report.bytes_read as f64 / (1 << 20) as f64 / seconds,
        "chunks_total": report.chunks_total,
        "chunks_read": report.stats.chunks_read,
        "zero_chunks": report.stats.zero_chunks,
        "new_chunks": report.stats.new_chunks,
        "new_plain_bytes": report.stats.new_plain_bytes,
        "new_stored_bytes": report.stats.new_stored_bytes,
        "index_written": report.index_written,
        "cpu_s": cpu_seconds(),
    });
    if let (Some(line), Value::Object(extra)) = (line.as_object_mut(), extra) {
        line.extend(extra);
    }
    line
}

/// CPU time (user + system, all threads) this process has used.
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one `rusage` into the pointer, which points at one.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return f64::NAN;
    }
    // SAFETY: getrusage succeeded, so it initialised the struct (zeroed before anyway).
    let usage = unsafe { usage.assume_init() };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}
