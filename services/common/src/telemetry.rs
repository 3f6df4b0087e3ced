//! Traces and logs of a tier: the `tracing` subscriber, OpenTelemetry export, W3C trace context.
//!
//! - [`init`] installs the process's subscriber: log lines on stderr (text, or one JSON object a
//!   line with `trace_id`/`span_id` while a span is active), filtered by `RUST_LOG` (default
//!   `info`); and, when the standard OpenTelemetry environment asks for it, an OpenTelemetry layer
//!   that exports every span over OTLP/gRPC.
//! - [`traced_request`] / [`inject`] put the current span's W3C `traceparent` (and `tracestate`)
//!   into an outgoing call's metadata; [`RpcLayer`] (in [`crate::rpc`]) takes it out of an incoming
//!   one, so a call's server span is the child of its caller's span.
//!
//! # Configuration (the standard OTEL_* variables)
//! Export is on when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set
//! (or `OTEL_TRACES_EXPORTER=otlp`: the default endpoint `http://localhost:4317`), and off when
//! none is, or with `OTEL_SDK_DISABLED=true` / `OTEL_TRACES_EXPORTER=none`. The SDK reads the
//! rest itself: `OTEL_SERVICE_NAME` (default `blip2-<tier>`), `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default `parentbased_always_on`),
//! `OTEL_BSP_SCHEDULE_DELAY` / `OTEL_BSP_MAX_QUEUE_SIZE` / `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_EXPORTER_OTLP_HEADERS`. The transport is gRPC only
//! (`OTEL_EXPORTER_OTLP_PROTOCOL` other than `grpc` is refused at start rather than ignored).
//! The same environment turns on OTLP metrics export ([`crate::otlp_metrics`]).
//!
//! # Versions
//! opentelemetry / opentelemetry_sdk / opentelemetry-otlp / opentelemetry-proto 0.33 and
//! tracing-opentelemetry 0.34 (the bridge built against 0.33) are one release line, and the OTLP
//! exporter's gRPC transport (`grpc-tonic`) is built on tonic 0.14 / prost 0.14, the workspace's
//! own: `cargo tree -d` shows no second tonic, prost, hyper or http. So the stock exporter is
//! used rather than an exporter of our own or the http/protobuf transport.
//!
//! # Why the exporter runs on the tier's runtime
//! The SDK's batch span processor exports from a thread of its own, blocking on the export
//! future there; the tonic exporter needs a Tokio reactor. [`init`] captures the runtime it is
//! called in and every export future is polled inside that runtime's context (its I/O is driven by
//! the runtime's workers), so no second runtime is started.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`, `span`, and
    /// `trace_id` / `span_id` while a traced span is active.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format `{other}` (text or json)")),
        }
    }
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTEL_EXPORTER_OTLP_PROTOCOL={0}: only `grpc` is supported")]
    Protocol(String),
    #[error("building the OTLP span exporter: {0}")]
    Exporter(String),
    #[error("telemetry must start inside the tier's Tokio runtime")]
    NoRuntime,
    #[error("starting the OTLP metrics exporter: {0}")]
    MetricsExporter(String),
    #[error("a tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// The installed telemetry; [`Telemetry::shutdown`] exports the spans still buffered.
#[must_use = "shut it down at exit, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    exporting: bool,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// Exports what is buffered and stops the exporter (a blocking call: run it off the async
    /// workers, e.g. in `spawn_blocking`, while the runtime still runs).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown() {
                eprintln!("OpenTelemetry shutdown: {error}");
            }
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Whether the OTEL_* environment asks for span export (see the module docs).
pub fn export_requested() -> bool {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    match env("OTEL_TRACES_EXPORTER") {
        Some(v) if v.eq_ignore_ascii_case("none") => return false,
        Some(v) if v.eq_ignore_ascii_case("otlp") => return true,
        _ => {}
    }
    env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
}

/// Installs the process's subscriber (see the module docs). `service` names the process in
/// traces unless `OTEL_SERVICE_NAME` does. Must be called inside the Tokio runtime that serves
/// the tier when export is on.
pub fn init(service: &str, format: LogFormat) -> Result<Telemetry, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = if export_requested() {
        Some(provider(service)?)
    } else if format == LogFormat::Json {
        // No export, but log lines still carry trace ids (and the trace context still travels
        // to the next tier): spans are recorded and dropped.
        Some(resource_provider(service, SdkTracerProvider::builder()))
    } else {
        None
    };
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(JsonLines)
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed(),
    };
    // Spans are traced at INFO and above whatever RUST_LOG says about log lines.
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("blip2"))
            .with_filter(LevelFilter::INFO)
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    // The metrics registry pushed over OTLP as well, when asked for (Prometheus needs nothing).
    crate::otlp_metrics::start(service).map_err(TelemetryError::MetricsExporter)?;
    Ok(Telemetry {
        provider,
        exporting: export_requested(),
    })
}

fn resource_provider(
    service: &str,
    builder: opentelemetry_sdk::trace::TracerProviderBuilder,
) -> SdkTracerProvider {
    // The default resource reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    let resource = match env("OTEL_SERVICE_NAME") {
        Some(_) => Resource::builder().build(),
        None => Resource::builder()
            .with_service_name(service.to_string())
            .build(),
    };
    builder.with_resource(resource).build()
}

fn provider(service: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let protocol =
        env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"));
    if let Some(protocol) = protocol.filter(|p| p != "grpc") {
        return Err(TelemetryError::Protocol(protocol));
    }
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
    // Endpoint, headers and timeout come from the environment.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let exporter = OnRuntime {
        inner: exporter,
        runtime,
    };
    // The batch processor reads OTEL_BSP_* and the sampler OTEL_TRACES_SAMPLER itself.
    Ok(resource_provider(
        service,
        SdkTracerProvider::builder().with_batch_exporter(exporter),
    ))
}

/// A span exporter whose exports run inside a Tokio runtime's context.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: E,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter> SpanExporter for OnRuntime<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let runtime = self.runtime.clone();
        let export = {
            let _context = runtime.enter();
            self.inner.export(batch)
        };
        InRuntime {
            runtime,
            future: Box::pin(export),
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let _context = self.runtime.enter();
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        let _context = self.runtime.enter();
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Polls `future` with `runtime` as the current Tokio runtime.
struct InRuntime<F> {
    runtime: tokio::runtime::Handle,
    future: Pin<Box<F>>,
}

impl<F: Future> Future for InRuntime<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let _context = this.runtime.enter();
        this.future.as_mut().poll(cx)
    }
}

/// `message` as a request carrying the current span's trace context.
pub fn traced_request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    inject(request.metadata_mut());
    request
}

/// Writes the current span's W3C trace context into `metadata` (nothing when no span is traced).
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return;
    }
    TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(metadata));
}

/// The trace context an incoming request's headers carry (empty when none).
pub fn extract(headers: &http::HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes());
        let value = tonic::metadata::MetadataValue::try_from(value.as_str());
        if let (Ok(key), Ok(value)) = (key, value) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The current trace and span ids (hex), while a traced span is active.
pub fn current_ids() -> Option<(String, String)> {
    let context = opentelemetry::Context::current();
    let span = context.span();
    let ids = span.span_context();
    ids.is_valid()
        .then(|| (ids.trace_id().to_string(), ids.span_id().to_string()))
}

/// JSON log lines.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = serde_json::Map::new();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let metadata = event.metadata();
        line.insert("timestamp".into(), timestamp.into());
        line.insert("level".into(), metadata.level().as_str().into());
        line.insert("target".into(), metadata.target().into());
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        line.insert("fields".into(), fields.0.into());
        if let Some(span) = ctx.lookup_current() {
            line.insert("span".into(), span.name().into());
        }
        if let Some((trace_id, span_id)) = current_ids() {
            line.insert("trace_id".into(), trace_id.into());
            line.insert("span_id".into(), span_id.into());
        }
        writeln!(writer, "{}", serde_json::Value::Object(line))
    }
}

#[derive(Default)]
struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_context_round_trips_through_metadata() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("caller");
            let _entered = span.enter();
            let request = traced_request(());
            let traceparent = request
                .metadata()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let traceparent = traceparent.unwrap_or_default();
            let expected = span.context().span().span_context().trace_id().to_string();
            assert!(traceparent.contains(&expected), "{traceparent}");

            let mut headers = http::HeaderMap::new();
            if let Ok(value) = http::HeaderValue::from_str(&traceparent) {
                headers.insert("traceparent", value);
            }
            let extracted = extract(&headers);
            assert_eq!(
                extracted.span().span_context().trace_id().to_string(),
                expected
            );
        });
    }

    #[test]
    fn nothing_is_injected_without_a_traced_span() {
        let request = traced_request(());
        assert!(request.metadata().get("traceparent").is_none());
    }

    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(data);
            Ok(data.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_the_trace_and_span_ids() {
        let provider = SdkTracerProvider::builder().build();
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(JsonLines)
                    .with_writer(move || writer.clone()),
            );
        let (trace_id, span_id) = tracing::subscriber::with_default(subscriber, || {
            tracing::info!(answer = 42, "outside");
            let span = tracing::info_span!("turn");
            let _entered = span.enter();
            tracing::info!(ok = true, "inside");
            let context = span.context();
            let ids = context.span().span_context().clone();
            (ids.trace_id().to_string(), ids.span_id().to_string())
        });
        let text = String::from_utf8(buffer.0.lock().map(|b| b.clone()).unwrap_or_default())
            .unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_default())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["fields"]["message"], "outside");
        assert_eq!(lines[0]["fields"]["answer"], 42);
        assert_eq!(lines[0]["level"], "INFO");
        assert!(lines[0].get("trace_id").is_none(), "{text}");
        assert_eq!(lines[1]["fields"]["ok"], true);
        assert_eq!(lines[1]["span"], "turn");
        assert_eq!(lines[1]["trace_id"], trace_id.as_str());
        assert_eq!(lines[1]["span_id"], span_id.as_str());
    }

    #[test]
    fn log_formats_parse() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("TEXT".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("xml".parse::<LogFormat>().is_err());
    }
}
