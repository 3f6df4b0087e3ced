//! Metrics of a process in the Prometheus text format, and the HTTP endpoint that serves them.
//!
//! Two kinds of figures:
//! - recorded ones (counters, histograms) kept here, in one process-wide registry: RPCs by
//!   method and status ([`crate::rpc`]), TTFT, inter-token latency, tokens;
//! - read ones: figures a tier keeps anyway (queue depth, running sequences, cache hits) are not
//!   copied here; the tier registers a [`Collect`] that reads them at scrape time.
//!
//! Every series carries a `tier` label, so `blip2 serve all` serves the three tiers' figures on
//! one endpoint.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

/// Label pairs of one series.
pub type Labels = Vec<(&'static str, String)>;

/// Upper bounds (seconds) of the latency histograms.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Series {
    Value(f64),
    Histogram {
        buckets: &'static [f64],
        /// Per bucket (not cumulative); one more for +Inf.
        counts: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

#[derive(Clone, Debug)]
pub(crate) struct Family {
    pub(crate) help: &'static str,
    pub(crate) kind: Kind,
    pub(crate) series: BTreeMap<Labels, Series>,
}

pub(crate) type Families = BTreeMap<&'static str, Family>;

/// Reads figures a tier keeps, at scrape time.
pub trait Collect: Send + Sync {
    fn collect(&self, out: &mut Samples);
}

/// Reads figures a tier keeps behind an async call (a session store), at scrape time.
pub trait CollectAsync: Send + Sync {
    fn collect<'a>(&'a self, out: &'a mut Samples)
        -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
}

/// What collectors write into during a scrape.
pub struct Samples {
    families: Families,
}

impl Samples {
    /// A value that goes up and down.
    pub fn gauge(&mut self, name: &'static str, help: &'static str, labels: Labels, value: f64) {
        set(&mut self.families, name, help, Kind::Gauge, labels, value);
    }

    /// A total since start kept by the tier.
    pub fn counter(&mut self, name: &'static str, help: &'static str, labels: Labels, value: f64) {
        set(&mut self.families, name, help, Kind::Counter, labels, value);
    }
}

fn family<'a>(
    families: &'a mut Families,
    name: &'static str,
    help: &'static str,
    kind: Kind,
) -> &'a mut Family {
    families.entry(name).or_insert_with(|| Family {
        help,
        kind,
        series: BTreeMap::new(),
    })
}

fn set(
    families: &mut Families,
    name: &'static str,
    help: &'static str,
    kind: Kind,
    labels: Labels,
    value: f64,
) {
    family(families, name, help, kind)
        .series
        .insert(labels, Series::Value(value));
}

/// The process-wide registry.
#[derive(Default)]
pub struct Registry {
    families: Mutex<Families>,
    collectors: Mutex<Vec<Weak<dyn Collect>>>,
    async_collectors: Mutex<Vec<Weak<dyn CollectAsync>>>,
}

/// How long a scrape waits for an async collector.
const ASYNC_COLLECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The registry of this process.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

impl Registry {
    fn families(&self) -> std::sync::MutexGuard<'_, Families> {
        self.families.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `value` to a counter.
    pub fn add(&self, name: &'static str, help: &'static str, labels: Labels, value: u64) {
        let mut families = self.families();
        let series = family(&mut families, name, help, Kind::Counter)
            .series
            .entry(labels)
            .or_insert(Series::Value(0.0));
        if let Series::Value(total) = series {
            *total += value as f64;
        }
    }

    /// Records one observation in a histogram with bounds `buckets`.
    pub fn observe(
        &self,
        name: &'static str,
        help: &'static str,
        labels: Labels,
        buckets: &'static [f64],
        value: f64,
    ) {
        let mut families = self.families();
        let series = family(&mut families, name, help, Kind::Histogram)
            .series
            .entry(labels)
            .or_insert_with(|| Series::Histogram {
                buckets,
                counts: vec![0; buckets.len() + 1],
                sum: 0.0,
                count: 0,
            });
        if let Series::Histogram {
            buckets,
            counts,
            sum,
            count,
        } = series
        {
            let slot = buckets
                .iter()
                .position(|&bound| value <= bound)
                .unwrap_or(buckets.len());
            if let Some(c) = counts.get_mut(slot) {
                *c += 1;
            }
            *sum += value;
            *count += 1;
        }
    }

    /// Reads `collector` at every scrape while it is alive.
    pub fn register(&self, collector: Weak<dyn Collect>) {
        self.collectors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(collector);
    }

    /// Reads `collector` at every scrape of [`serve`] while it is alive.
    pub fn register_async(&self, collector: Weak<dyn CollectAsync>) {
        self.async_collectors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(collector);
    }

    /// [`Registry::render`] with the async collectors' figures too (one that does not answer
    /// within 2 s is left out of this scrape).
    pub async fn render_async(&self) -> String {
        render(&self.snapshot().await)
    }

    /// Every family now, the async collectors' included.
    pub(crate) async fn snapshot(&self) -> Families {
        let collectors: Vec<Arc<dyn CollectAsync>> = {
            let mut collectors = self
                .async_collectors
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            collectors.retain(|c| c.strong_count() > 0);
            collectors.iter().filter_map(Weak::upgrade).collect()
        };
        let mut samples = self.samples();
        for collector in collectors {
            let mut extra = Samples {
                families: Families::new(),
            };
            let collected =
                tokio::time::timeout(ASYNC_COLLECT_TIMEOUT, collector.collect(&mut extra)).await;
            if collected.is_ok() {
                samples.families.extend(extra.families);
            }
        }
        samples.families
    }

    /// Everything but the async collectors' figures, in the Prometheus text exposition format
    /// (0.0.4).
    pub fn render(&self) -> String {
        render(&self.samples().families)
    }

    fn samples(&self) -> Samples {
        let mut samples = Samples {
            families: self.families().clone(),
        };
        let collectors: Vec<Arc<dyn Collect>> = {
            let mut collectors = self
                .collectors
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            collectors.retain(|c| c.strong_count() > 0);
            collectors.iter().filter_map(Weak::upgrade).collect()
        };
        for collector in collectors {
            collector.collect(&mut samples);
        }
        samples
    }
}

fn render(families: &Families) -> String {
    let mut out = String::new();
    for (name, family) in families {
        let _ = writeln!(out, "# HELP {name} {}", family.help);
        let _ = writeln!(out, "# TYPE {name} {}", family.kind.as_str());
        for (labels, series) in &family.series {
            match series {
                Series::Value(value) => {
                    let _ = writeln!(out, "{name}{} {}", label_text(labels, None), number(*value));
                }
                Series::Histogram {
                    buckets,
                    counts,
                    sum,
                    count,
                } => {
                    let mut cumulative = 0;
                    for (bound, c) in buckets.iter().zip(counts) {
                        cumulative += c;
                        let le = number(*bound);
                        let _ = writeln!(
                            out,
                            "{name}_bucket{} {cumulative}",
                            label_text(labels, Some(&le))
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{name}_bucket{} {count}",
                        label_text(labels, Some("+Inf"))
                    );
                    let _ = writeln!(
                        out,
                        "{name}_sum{} {}",
                        label_text(labels, None),
                        number(*sum)
                    );
                    let _ = writeln!(out, "{name}_count{} {count}", label_text(labels, None));
                }
            }
        }
    }
    out
}

fn number(value: f64) -> String {
    if value.is_finite() && value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

fn label_text(labels: &Labels, le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` (the registry, Prometheus text format) on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                registry().render_async().await,
            )
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl Collect for Fixed {
        fn collect(&self, out: &mut Samples) {
            out.gauge("test_depth", "Depth.", vec![("tier", "t".into())], 3.0);
        }
    }

    #[test]
    fn renders_counters_histograms_and_collected_gauges() {
        let registry = Registry::default();
        let labels = vec![("tier", "t".to_string()), ("method", "a\"b".to_string())];
        registry.add("test_total", "Things.", labels.clone(), 2);
        registry.add("test_total", "Things.", labels, 1);
        let h = vec![("tier", "t".to_string())];
        registry.observe("test_seconds", "Time.", h.clone(), &[0.1, 1.0], 0.05);
        registry.observe("test_seconds", "Time.", h.clone(), &[0.1, 1.0], 0.5);
        registry.observe("test_seconds", "Time.", h, &[0.1, 1.0], 5.0);
        let fixed: Arc<dyn Collect> = Arc::new(Fixed);
        registry.register(Arc::downgrade(&fixed));
        let text = registry.render();
        assert!(text.contains("# TYPE test_total counter\n"), "{text}");
        assert!(
            text.contains("test_total{tier=\"t\",method=\"a\\\"b\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("test_seconds_bucket{tier=\"t\",le=\"0.1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("test_seconds_bucket{tier=\"t\",le=\"1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("test_seconds_bucket{tier=\"t\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("test_seconds_count{tier=\"t\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("test_seconds_sum{tier=\"t\"} 5.55\n"),
            "{text}"
        );
        assert!(text.contains("test_depth{tier=\"t\"} 3\n"), "{text}");
        drop(fixed);
        assert!(!registry.render().contains("test_depth"));
    }
}
