//! `keel up`, the README's first command: it starts a witness and a replicated pair,
//! writes `up.json` with the volume's NBD URI on its primary, serves real clients there,
//! and stops cleanly on Ctrl-C.

use std::process::{Command, Stdio};
use std::time::Duration;

use keel_tests::cmd::{run_ok, wait_for};
use keel_tests::daemon::workspace_bin;

/// Kills `keel up` (and so its node) if the test fails before stopping it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) only reads its arguments; the child is ours and not yet reaped.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGINT);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::yield_now();
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn keel_up_serves_the_demo_volume_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(workspace_bin("keel"))
        .arg("up")
        .arg("--dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut up = KillOnDrop(child);
    let state_path = dir.path().join("up.json");
    let state: serde_json::Value = wait_for("up.json", Duration::from_secs(60), || {
        if let Ok(Some(status)) = up.0.try_wait() {
            anyhow::bail!("keel up exited early with {status}");
        }
        Ok(std::fs::read_to_string(&state_path).ok().and_then(|text| serde_json::from_str(&text).ok()))
    })
    .unwrap();
    let volume = &state["volumes"][0];
    assert_eq!(volume["name"], "demo");
    assert_eq!(volume["size"], 1u64 << 30);
    let roles: Vec<&str> = state["nodes"].as_array().unwrap().iter().map(|n| n["role"].as_str().unwrap()).collect();
    assert_eq!(roles.iter().filter(|r| **r == "primary").count(), 1, "{state}");
    assert_eq!(roles.iter().filter(|r| **r == "standby").count(), 1, "{state}");
    assert_eq!(roles.iter().filter(|r| **r == "witness").count(), 1, "{state}");
    let uri = volume["nbd_uri"].as_str().unwrap().to_string();
    assert!(uri.starts_with("nbd+unix:///demo?socket="), "{uri}");

    let output = run_ok(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "flush",
            "-c",
            "read -P 0x5a 0 1M",
        ]),
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(!output.combined().contains("Pattern verification failed"), "{}", output.describe());
    run_ok(Command::new("nbdinfo").arg(&uri), Duration::from_secs(60)).unwrap();

    // Ctrl-C: the node stops cleanly and `keel up` exits 0 and removes up.json.
    // SAFETY: kill(2) only reads its arguments; the child is ours and not yet reaped.
    unsafe {
        libc::kill(up.0.id() as i32, libc::SIGINT);
    }
    let status = wait_for("keel up to exit", Duration::from_secs(60), || Ok(up.0.try_wait()?)).unwrap();
    assert!(status.success(), "keel up exited with {status}");
    assert!(!state_path.exists(), "up.json left behind");
    for node in ["node-a", "node-b"] {
        let log = std::fs::read_to_string(dir.path().join(node).join("keel.log")).unwrap();
        assert!(log.contains("closed"), "{node} did not close its volume cleanly:\n{log}");
    }
}
