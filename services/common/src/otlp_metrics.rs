//! OTLP metrics export: the process's metrics registry ([`crate::metrics`]) pushed to an OTLP
//! collector over gRPC, the same figures the Prometheus endpoint serves.
//!
//! A small exporter of its own rather than the OpenTelemetry metrics SDK: the figures already
//! live in the registry (and partly in the tiers' own state, read at scrape time), so each export
//! converts one snapshot into `opentelemetry.proto.metrics.v1` messages (opentelemetry-proto's
//! generated types) and sends them with the collector's generated tonic client. Counters are
//! cumulative monotonic sums, gauges gauges, histograms cumulative explicit-bucket histograms.
//!
//! Configured by the standard variables: on when `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (or `OTEL_METRICS_EXPORTER=otlp`: the default endpoint
//! `http://localhost:4317`); off with `OTEL_METRICS_EXPORTER=none` or `OTEL_SDK_DISABLED=true`.
//! `OTEL_METRIC_EXPORT_INTERVAL` (ms, default 60000), `OTEL_METRIC_EXPORT_TIMEOUT` (ms, default
//! 30000), `OTEL_EXPORTER_OTLP_HEADERS` / `OTEL_EXPORTER_OTLP_METRICS_HEADERS` (`k=v,k=v`),
//! `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` as usual.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

use crate::metrics::{registry, Families, Kind, Series};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn millis(name: &str, default: u64) -> Duration {
    Duration::from_millis(
        env(name)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(default),
    )
}

/// The collector's address when the environment asks for metrics export.
pub fn endpoint() -> Option<String> {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    let exporter = env("OTEL_METRICS_EXPORTER");
    if exporter
        .as_deref()
        .is_some_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return None;
    }
    env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .or_else(|| {
            exporter
                .filter(|v| v.eq_ignore_ascii_case("otlp"))
                .map(|_| "http://localhost:4317".to_string())
        })
}

/// Starts exporting on the current runtime when the environment asks for it (see the module
/// docs); `service` is the default `service.name`. Returns whether it started.
pub fn start(service: &str) -> Result<bool, String> {
    let Some(endpoint) = endpoint() else {
        return Ok(false);
    };
    let protocol =
        env("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"));
    if let Some(protocol) = protocol.filter(|p| p != "grpc") {
        return Err(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: only `grpc` is supported"
        ));
    }
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| "metrics export must start inside the tier's Tokio runtime".to_string())?;
    let _context = runtime.enter();
    let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
        .map_err(|e| format!("OTLP metrics endpoint `{endpoint}`: {e}"))?
        .timeout(millis("OTEL_METRIC_EXPORT_TIMEOUT", 30_000))
        .connect_lazy();
    let headers = env("OTEL_EXPORTER_OTLP_METRICS_HEADERS")
        .or_else(|| env("OTEL_EXPORTER_OTLP_HEADERS"))
        .unwrap_or_default();
    let metadata = parse_headers(&headers);
    let interval = millis("OTEL_METRIC_EXPORT_INTERVAL", 60_000).max(Duration::from_millis(10));
    let resource = resource(service);
    let started = unix_nanos();
    runtime.spawn(async move {
        let mut client = MetricsServiceClient::new(channel);
        let mut ticks = tokio::time::interval(interval);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let families = registry().snapshot().await;
            let request = ExportMetricsServiceRequest {
                resource_metrics: vec![ResourceMetrics {
                    resource: Some(resource.clone()),
                    scope_metrics: vec![ScopeMetrics {
                        scope: Some(InstrumentationScope {
                            name: "blip2".into(),
                            version: env!("CARGO_PKG_VERSION").into(),
                            ..Default::default()
                        }),
                        metrics: convert(&families, started, unix_nanos()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            };
            let mut request = tonic::Request::new(request);
            *request.metadata_mut() = metadata.clone();
            if let Err(status) = client.export(request).await {
                tracing::debug!(%status, "OTLP metrics export failed");
            }
        }
    });
    Ok(true)
}

fn parse_headers(headers: &str) -> tonic::metadata::MetadataMap {
    let mut metadata = tonic::metadata::MetadataMap::new();
    for pair in headers.split(',') {
        let Some((key, value)) = pair.split_once('=') else {
            continue;
        };
        let key = tonic::metadata::MetadataKey::from_bytes(key.trim().to_lowercase().as_bytes());
        let value = tonic::metadata::MetadataValue::try_from(value.trim());
        if let (Ok(key), Ok(value)) = (key, value) {
            metadata.insert(key, value);
        }
    }
    metadata
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn string(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
        ..Default::default()
    }
}

/// `service.name` (OTEL_SERVICE_NAME or `service`) and OTEL_RESOURCE_ATTRIBUTES.
fn resource(service: &str) -> Resource {
    let detected = match env("OTEL_SERVICE_NAME") {
        Some(_) => opentelemetry_sdk::Resource::builder().build(),
        None => opentelemetry_sdk::Resource::builder()
            .with_service_name(service.to_string())
            .build(),
    };
    let attributes = detected
        .iter()
        .map(|(key, value)| string(key.as_str(), value.to_string()))
        .collect();
    Resource {
        attributes,
        ..Default::default()
    }
}

/// One snapshot of the registry as OTLP metrics.
fn convert(families: &Families, start: u64, now: u64) -> Vec<Metric> {
    let attributes = |labels: &crate::metrics::Labels| -> Vec<KeyValue> {
        labels.iter().map(|(k, v)| string(k, v.clone())).collect()
    };
    let number = |labels, value: f64| NumberDataPoint {
        attributes: attributes(labels),
        start_time_unix_nano: start,
        time_unix_nano: now,
        value: Some(number_data_point::Value::AsDouble(value)),
        ..Default::default()
    };
    families
        .iter()
        .map(|(name, family)| {
            let values = || {
                family
                    .series
                    .iter()
                    .filter_map(|(labels, series)| match series {
                        Series::Value(v) => Some(number(labels, *v)),
                        Series::Histogram { .. } => None,
                    })
                    .collect::<Vec<_>>()
            };
            let data = match family.kind {
                Kind::Counter => metric::Data::Sum(Sum {
                    data_points: values(),
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: true,
                }),
                Kind::Gauge => metric::Data::Gauge(Gauge {
                    data_points: values(),
                }),
                Kind::Histogram => metric::Data::Histogram(Histogram {
                    data_points: family
                        .series
                        .iter()
                        .filter_map(|(labels, series)| match series {
                            Series::Histogram {
                                buckets,
                                counts,
                                sum,
                                count,
                            } => Some(HistogramDataPoint {
                                attributes: attributes(labels),
                                start_time_unix_nano: start,
                                time_unix_nano: now,
                                count: *count,
                                sum: Some(*sum),
                                bucket_counts: counts.clone(),
                                explicit_bounds: buckets.to_vec(),
                                ..Default::default()
                            }),
                            Series::Value(_) => None,
                        })
                        .collect(),
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                }),
            };
            let unit = if name.ends_with("_seconds") { "s" } else { "" };
            Metric {
                name: name.to_string(),
                description: family.help.to_string(),
                unit: unit.to_string(),
                data: Some(data),
                ..Default::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Family;
    use std::collections::BTreeMap;

    #[test]
    fn counters_gauges_and_histograms_convert() {
        let mut families = Families::new();
        let labels = vec![("tier", "llm".to_string())];
        families.insert(
            "x_total",
            Family {
                help: "X.",
                kind: Kind::Counter,
                series: BTreeMap::from([(labels.clone(), Series::Value(3.0))]),
            },
        );
        families.insert(
            "y_seconds",
            Family {
                help: "Y.",
                kind: Kind::Histogram,
                series: BTreeMap::from([(
                    labels.clone(),
                    Series::Histogram {
                        buckets: &[0.1, 1.0],
                        counts: vec![1, 0, 2],
                        sum: 9.0,
                        count: 3,
                    },
                )]),
            },
        );
        let metrics = convert(&families, 1, 2);
        assert_eq!(metrics.len(), 2);
        let Some(metric::Data::Sum(sum)) = &metrics[0].data else {
            panic!("{:?}", metrics[0]);
        };
        assert!(sum.is_monotonic);
        assert_eq!(
            sum.data_points[0].value,
            Some(number_data_point::Value::AsDouble(3.0))
        );
        assert_eq!(sum.data_points[0].attributes[0].key, "tier");
        let Some(metric::Data::Histogram(histogram)) = &metrics[1].data else {
            panic!("{:?}", metrics[1]);
        };
        let point = &histogram.data_points[0];
        assert_eq!((point.count, point.sum), (3, Some(9.0)));
        assert_eq!(point.bucket_counts, vec![1, 0, 2]);
        assert_eq!(point.explicit_bounds, vec![0.1, 1.0]);
        assert_eq!(metrics[1].unit, "s");
    }

    #[test]
    fn headers_parse() {
        let metadata = parse_headers("api-key=abc, X-Team = blue,broken");
        assert_eq!(
            metadata.get("api-key").and_then(|v| v.to_str().ok()),
            Some("abc")
        );
        assert_eq!(
            metadata.get("x-team").and_then(|v| v.to_str().ok()),
            Some("blue")
        );
        assert_eq!(metadata.len(), 2);
    }
}
