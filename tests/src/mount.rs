//! A volume mounted the way these machines can: `nbdfuse` exposes the export as a file,
//! `losetup --direct-io=on` makes it a block device, ext4 goes on top. Every layer is a
//! guard that tears itself down on drop (lazily if it has to), so a failing test leaves
//! no mount, loop device or nbdfuse process behind.
//!
//! Tests that use this take [`machine_lock`] first: loop devices and mounts are shared by
//! every test process on the machine.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::{run, run_ok, wait_for, Output};

const STEP_TIMEOUT: Duration = Duration::from_secs(120);
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why this machine cannot run the mount tests, or `None` if it can.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (loop devices and mounts)".into());
    }
    for device in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(device).exists() {
            return Some(format!("{device} is missing"));
        }
    }
    None
}

/// An exclusive lock over every test on this machine that mounts or attaches loop
/// devices (an flock on a file in /tmp; held until dropped).
#[derive(Debug)]
pub struct MachineLock {
    _file: File,
}

/// Takes the [`MachineLock`], waiting up to ten minutes for other tests to finish.
pub fn machine_lock() -> Result<MachineLock> {
    let path = Path::new("/tmp/keel-tests-mount.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    wait_for("the machine-wide mount lock", Duration::from_secs(600), || {
        // SAFETY: flock only reads its arguments; the descriptor is open for the call.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        Ok(locked.then_some(()))
    })?;
    Ok(MachineLock { _file: file })
}

/// A running `nbdfuse DIR/FILE URI`.
#[derive(Debug)]
pub struct NbdFuse {
    child: Option<Child>,
    dir: PathBuf,
    file: PathBuf,
    log: PathBuf,
    mounted: bool,
}

impl NbdFuse {
    /// Mounts `uri` as `dir/vol` and waits until the file is there with the export's
    /// `size`. `dir` is created if needed.
    pub fn start(dir: &Path, uri: &str, size: u64) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = dir.join("vol");
        let log = dir.with_extension("nbdfuse.log");
        let log_file = File::create(&log)?;
        let child = Command::new("nbdfuse")
            .arg(&file)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("failed to start nbdfuse")?;
        let mut fuse = Self { child: Some(child), dir: dir.to_path_buf(), file, log, mounted: true };
        let ready = wait_for("nbdfuse to expose the export", READY_TIMEOUT, || {
            if let Some(status) = fuse.child.as_mut().context("no child")?.try_wait()? {
                fuse.child = None;
                bail!("nbdfuse exited with {status} before it was ready: {}", fuse.log_text());
            }
            Ok(match std::fs::metadata(&fuse.file) {
                Ok(m) if m.len() == size => Some(()),
                Ok(m) => bail!("nbdfuse exposes {} bytes, expected {size}", m.len()),
                Err(_) => None,
            })
        });
        ready.map(|()| fuse)
    }

    /// The file standing for the export.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// What nbdfuse printed.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the nbdfuse process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Unmounts cleanly (`fusermount3 -u`, retried while the file is still busy) and
    /// checks that nbdfuse then exits successfully.
    pub fn stop(mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            let out = run(Command::new("fusermount3").arg("-u").arg(&self.dir), STEP_TIMEOUT)?;
            if out.status.success() {
                break;
            }
            if !out.stderr.contains("busy") || started.elapsed() > EXIT_TIMEOUT {
                bail!("{}", out.describe());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.mounted = false;
        let mut child = self.child.take().context("nbdfuse is not running")?;
        let status =
            wait_for("nbdfuse to exit after unmount", EXIT_TIMEOUT, || Ok(child.try_wait()?)).inspect_err(|_| {
                let _ = child.kill();
                let _ = child.wait();
            })?;
        if !status.success() {
            bail!("nbdfuse exited with {status}: {}", self.log_text());
        }
        Ok(())
    }

    /// Best-effort teardown for a dead or wedged stack: lazy unmount, then wait for the
    /// process a while, then kill it.
    fn teardown(&mut self) {
        if self.mounted {
            let out = run(Command::new("fusermount3").arg("-u").arg(&self.dir), STEP_TIMEOUT);
            if !out.is_ok_and(|o| o.status.success()) {
                let _ = run(Command::new("fusermount3").arg("-u").arg("-z").arg(&self.dir), STEP_TIMEOUT);
            }
            self.mounted = false;
        }
        if let Some(mut child) = self.child.take() {
            let exited = wait_for("nbdfuse to exit", Duration::from_secs(10), || Ok(child.try_wait()?));
            if exited.is_err() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for NbdFuse {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// An attached loop device.
#[derive(Debug)]
pub struct LoopDevice {
    dev: Option<String>,
}

impl LoopDevice {
    /// `losetup --direct-io=on -f --show FILE`, and checks direct I/O really is on.
    pub fn attach(file: &Path) -> Result<Self> {
        let out = run_ok(Command::new("losetup").args(["--direct-io=on", "-f", "--show"]).arg(file), STEP_TIMEOUT)?;
        let dev = out.stdout.trim().to_string();
        if !dev.starts_with("/dev/loop") {
            bail!("losetup printed {:?}", out.stdout);
        }
        let device = Self { dev: Some(dev) };
        let info =
            run_ok(Command::new("losetup").args(["--noheadings", "-O", "DIO"]).arg(device.path()), STEP_TIMEOUT)?;
        if info.stdout.trim() != "1" {
            bail!("{} was attached without direct I/O (DIO {:?})", device.path(), info.stdout.trim());
        }
        Ok(device)
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &str {
        self.dev.as_deref().unwrap_or("/dev/null")
    }

    /// `losetup -d`, reporting failure.
    pub fn detach(mut self) -> Result<()> {
        let dev = self.dev.take().context("not attached")?;
        run_ok(Command::new("losetup").arg("-d").arg(&dev), STEP_TIMEOUT)?;
        Ok(())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Some(dev) = self.dev.take() {
            let _ = run(Command::new("losetup").arg("-d").arg(&dev), STEP_TIMEOUT);
        }
    }
}

/// A mounted filesystem.
#[derive(Debug)]
pub struct Mount {
    target: Option<PathBuf>,
}

impl Mount {
    /// Mounts `dev` (ext4) on `target`, creating the directory.
    pub fn new(dev: &str, target: &Path) -> Result<Self> {
        std::fs::create_dir_all(target)?;
        run_ok(Command::new("mount").args(["-t", "ext4", dev]).arg(target), STEP_TIMEOUT)?;
        Ok(Self { target: Some(target.to_path_buf()) })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.target.as_deref().unwrap_or(Path::new("/nonexistent"))
    }

    /// A clean `umount`, reporting failure.
    pub fn unmount(mut self) -> Result<()> {
        let target = self.target.take().context("not mounted")?;
        run_ok(Command::new("umount").arg(&target), STEP_TIMEOUT)?;
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(target) = self.target.take() {
            let _ = run(Command::new("umount").arg("-l").arg(&target), STEP_TIMEOUT);
        }
    }
}

/// nbdfuse + loop (+ a mount when asked). Fields drop in order: mount, loop, nbdfuse.
#[derive(Debug)]
pub struct Stack {
    mount: Option<Mount>,
    device: Option<LoopDevice>,
    fuse: Option<NbdFuse>,
    dir: PathBuf,
}

impl Stack {
    /// Exposes `uri` (an export of `size` bytes) through nbdfuse under `dir/fuse` and
    /// attaches it to a loop device.
    pub fn attach(dir: &Path, uri: &str, size: u64) -> Result<Self> {
        let fuse = NbdFuse::start(&dir.join("fuse"), uri, size)?;
        let device = LoopDevice::attach(fuse.file())?;
        Ok(Self { mount: None, device: Some(device), fuse: Some(fuse), dir: dir.to_path_buf() })
    }

    /// The loop device.
    pub fn device(&self) -> &str {
        self.device.as_ref().map_or("/dev/null", LoopDevice::path)
    }

    /// `mkfs.ext4` on the device (inode tables and journal initialised now, so no lazy
    /// init thread writes behind the test's back).
    pub fn mkfs(&self) -> Result<Output> {
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-L", "keeltest"])
                .arg(self.device()),
            STEP_TIMEOUT,
        )
    }

    /// Mounts the device on `dir/fs` and returns the mount point.
    pub fn mount(&mut self) -> Result<PathBuf> {
        let target = self.dir.join("fs");
        self.mount = Some(Mount::new(self.device(), &target)?);
        Ok(target)
    }

    /// A clean unmount.
    pub fn unmount(&mut self) -> Result<()> {
        self.mount.take().context("not mounted")?.unmount()
    }

    /// `e2fsck -fn` on the (unmounted) device; fails unless it reports a clean filesystem.
    pub fn fsck(&self) -> Result<Output> {
        run_ok(Command::new("e2fsck").arg("-fn").arg(self.device()), STEP_TIMEOUT)
    }

    /// Whether nbdfuse still runs.
    pub fn fuse_running(&mut self) -> bool {
        self.fuse.as_mut().is_some_and(NbdFuse::is_running)
    }

    /// Clean teardown of a healthy stack: unmount, detach, unmount nbdfuse and check it
    /// exited successfully.
    pub fn teardown(mut self) -> Result<()> {
        if let Some(mount) = self.mount.take() {
            mount.unmount()?;
        }
        if let Some(device) = self.device.take() {
            device.detach()?;
        }
        if let Some(fuse) = self.fuse.take() {
            fuse.stop()?;
        }
        Ok(())
    }

    /// Teardown after the server died: `umount -l`, `losetup -d`, then nbdfuse is
    /// unmounted lazily and ended if it still runs (the drop guards do exactly this).
    pub fn abandon(self) {
        drop(self);
    }
}
