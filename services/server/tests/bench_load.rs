//! `blip2 bench load`: its statistics on their own, then the command against `blip2 serve all`
//! on the committed fixture checkpoint, checked through its JSON result.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

// The statistics module depends on serde only, so the test compiles it from the binary's source.
#[path = "../src/bench_stats.rs"]
#[allow(dead_code)]
mod bench_stats;

use bench_stats::{percentile, Distribution, GroupSummary, TurnSample};

#[test]
fn percentiles_interpolate_between_ranks() {
    let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
    assert_eq!(percentile(&sorted, 50.0), Some(50.5));
    assert_eq!(percentile(&sorted, 0.0), Some(1.0));
    assert_eq!(percentile(&sorted, 100.0), Some(100.0));
    let p99 = percentile(&sorted, 99.0).unwrap();
    assert!((p99 - 99.01).abs() < 1e-9, "{p99}");
    assert_eq!(percentile(&[7.0], 95.0), Some(7.0));
    assert_eq!(percentile(&[], 50.0), None);
    // Past the ends: the extremes, not an out-of-range read.
    assert_eq!(percentile(&[1.0, 2.0], 150.0), Some(2.0));
    assert_eq!(percentile(&[1.0, 2.0], -5.0), Some(1.0));
}

#[test]
fn distributions_are_in_milliseconds_and_ordered() {
    let d = Distribution::from_seconds(&[0.3, 0.1, 0.2, f64::NAN]);
    assert_eq!(d.count, 3);
    assert!((d.mean.unwrap() - 200.0).abs() < 1e-9);
    assert!((d.p50.unwrap() - 200.0).abs() < 1e-9);
    assert!(d.p50 <= d.p95 && d.p95 <= d.p99 && d.p99 <= d.max);
    assert_eq!(d.max, Some(300.0));
    let empty = Distribution::from_seconds(&[]);
    assert_eq!((empty.count, empty.p50, empty.mean), (0, None, None));
}

#[test]
fn group_summaries_pool_gaps_and_count_tokens() {
    let a = TurnSample {
        ttft: 0.5,
        inter_token: vec![0.1, 0.1, 0.1],
        latency: 0.8,
        generated_tokens: 4,
        prompt_tokens: 40,
        cached_prompt_tokens: 0,
    };
    let b = TurnSample {
        ttft: 0.1,
        inter_token: vec![0.2],
        latency: 0.3,
        generated_tokens: 2,
        prompt_tokens: 80,
        cached_prompt_tokens: 40,
    };
    let g = GroupSummary::from_samples([&a, &b]);
    assert_eq!(g.turns, 2);
    assert_eq!(g.generated_tokens, 6);
    assert_eq!(g.itl_ms.count, 4);
    assert_eq!(g.mean_prompt_tokens, Some(60.0));
    assert_eq!(g.mean_cached_prompt_tokens, Some(20.0));
    // Stream rates: a: 3 gaps in 0.3 s = 10/s, b: 1 in 0.2 s = 5/s; the median of two: 7.5.
    assert!((g.stream_tokens_per_second_p50.unwrap() - 7.5).abs() < 1e-9);
    let none = GroupSummary::from_samples(std::iter::empty());
    assert_eq!(none.turns, 0);
    assert_eq!(none.ttft_ms.p50, None);
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// `blip2 serve all`, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn serve_all(model: &Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_blip2"))
        .args(["serve", "all", "--listen", "127.0.0.1:0", "--model"])
        .arg(model)
        // No OpenAI-compatible gateway on its fixed default port: tests run in parallel.
        .args(["--http-listen", "off"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("blip2 serve all exited before listening")
            .unwrap();
        if let Some(addr) = line.strip_prefix("blip2 session listening on ") {
            break format!("http://{addr}");
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Server { child, addr }
}

fn check_ordered(d: &serde_json::Value, what: &str) {
    let p = |k: &str| d[k].as_f64().unwrap_or_else(|| panic!("{what}.{k}: {d}"));
    assert!(p("p50") > 0.0, "{what}: {d}");
    assert!(
        p("p50") <= p("p95") && p("p95") <= p("p99") && p("p99") <= p("max"),
        "{what}: {d}"
    );
}

#[test]
fn bench_load_against_serve_all() {
    let server = serve_all(&fixtures().join("models/opt-a"));
    let json = std::env::temp_dir().join(format!("blip2-bench-load-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_blip2"))
        .args(["bench", "load", "--addr", &server.addr])
        .args([
            "--sessions",
            "2",
            "--turns",
            "2",
            "--new-tokens",
            "6",
            "--no-progress",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "blip2 bench load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("TTFT p50") && table.contains("tokens/s"),
        "{table}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    std::fs::remove_file(&json).ok();
    assert_eq!(r["sessions"], 2);
    assert_eq!(r["turns_per_session"], 2);
    assert_eq!(r["turns_completed"], 4, "{r}");
    assert_eq!(r["turns_failed"], 0, "{r}");
    assert!(r["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(r["requests_per_second"].as_f64().unwrap() > 0.0);
    for group in ["first_turns", "later_turns"] {
        let g = &r[group];
        assert_eq!(g["turns"], 2, "{group}: {g}");
        // min_new_tokens = max_new_tokens: exactly 6 tokens per turn, EOS or not.
        assert_eq!(g["generated_tokens"], 12, "{group}: {g}");
        check_ordered(&g["ttft_ms"], group);
        check_ordered(&g["latency_ms"], group);
        assert!(g["mean_prompt_tokens"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(r["all_turns"]["generated_tokens"], 24);
    // A later turn's prompt holds the first turn and its answer.
    assert!(
        r["later_turns"]["mean_prompt_tokens"].as_f64()
            > r["first_turns"]["mean_prompt_tokens"].as_f64(),
        "{r}"
    );

    // A bad request is an error exit with a message, not a panic.
    let out = Command::new(env!("CARGO_BIN_EXE_blip2"))
        .args(["bench", "load", "--addr", &server.addr, "--sessions", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sessions"));
}
