//! Shared by the end-to-end tests: the `blip2` binary of this build, tier processes, fixtures.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn fixture(path: &str) -> PathBuf {
    root().join("tests/fixtures").join(path)
}

/// The `blip2` binary of this build (built by `cargo test --workspace`, next to this test).
pub fn blip2_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(format!("blip2{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} not built: run `cargo test --workspace`",
        path.display()
    );
    path
}

/// A tier process, killed when dropped.
pub struct Tier {
    pub child: Child,
    pub addr: String,
}

impl Drop for Tier {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

pub fn spawn(args: &[&str]) -> Tier {
    let mut child = Command::new(blip2_binary())
        .arg("serve")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning blip2 serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let tier = args[0];
    let prefix = format!("blip2 {tier} listening on ");
    let addr = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(addr) = line.strip_prefix(&prefix) {
                    break format!("http://{addr}");
                }
            }
            _ => panic!("blip2 serve {tier} exited before listening"),
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Tier { child, addr }
}
