//! A real `redis-server` for the tests, on a free loopback port, without persistence; killed
//! when dropped. Without the binary a test is skipped, except under CI (`CI` set), where it
//! fails: CI must run the Redis tests (`./scripts/test` installs redis-server).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Child,
    pub url: String,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Starts a redis-server, or `None` (with a note) when it is not installed outside CI.
pub fn start() -> Option<RedisServer> {
    let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let spawned = Command::new(&binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn();
    let child = match spawned {
        Ok(child) => child,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && !in_ci() => {
            eprintln!(
                "SKIPPED: `{binary}` is not installed (apt-get install redis-server); \
                 under CI=true this test fails instead"
            );
            return None;
        }
        Err(error) => panic!("starting `{binary}`: {error} (apt-get install redis-server)"),
    };
    let server = RedisServer {
        child,
        url: format!("redis://127.0.0.1:{port}"),
    };
    // Ready once it answers PING.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
            let mut reply = [0u8; 7];
            stream.set_read_timeout(Some(Duration::from_secs(1))).ok();
            if stream.write_all(b"PING\r\n").is_ok()
                && stream.read_exact(&mut reply).is_ok()
                && &reply == b"+PONG\r\n"
            {
                return Some(server);
            }
        }
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}
