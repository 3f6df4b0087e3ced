//! [`RpcLayer`]: the tower layer every tier's server runs its calls through. Each call is
//!
//! - a server span (`blip2.v1.SessionService/Chat`, ...) whose parent is the caller's span when
//!   the request's metadata carries a W3C `traceparent`; the span lasts until the response
//!   stream ends, and records the call's gRPC status (`rpc.grpc.status_code`);
//! - counted in `blip2_rpc_requests_total{tier,method,code}` and timed in
//!   `blip2_rpc_duration_seconds{tier,method}` once its status is known: from the response
//!   headers (an immediate error), the trailers (the end of a stream), or the client leaving
//!   first (`Cancelled`).
//!
//! Health checks and reflection are counted but not traced (a probe every few seconds would
//! drown the traces).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::{registry, LATENCY_BUCKETS};

/// Wraps a tier's services: spans, trace context, RPC metrics (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct RpcLayer {
    tier: &'static str,
}

impl RpcLayer {
    /// `tier` labels the metrics (`vision`, `llm`, `session`).
    pub fn new(tier: &'static str) -> Self {
        RpcLayer { tier }
    }
}

impl<S> tower_layer::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService {
            inner,
            tier: self.tier,
        }
    }
}

/// The service [`RpcLayer`] makes.
#[derive(Clone, Debug)]
pub struct RpcService<S> {
    inner: S,
    tier: &'static str,
}

/// Services not worth a span.
fn plumbing(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for RpcService<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Unpin + Send + 'static,
{
    type Response = http::Response<RpcBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // The clone that was made ready serves this call; the fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path().to_string();
        let span = if plumbing(&path) {
            tracing::Span::none()
        } else {
            let name = path.trim_start_matches('/');
            let (service, method) = name.split_once('/').unwrap_or((name, ""));
            let span = tracing::info_span!(
                "rpc",
                otel.name = name,
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                rpc.system = "grpc",
                rpc.service = service,
                rpc.method = method,
                rpc.grpc.status_code = tracing::field::Empty,
                tier = self.tier,
            );
            let parent = crate::telemetry::extract(request.headers());
            let _ = span.set_parent(parent);
            span
        };
        let record = Record {
            tier: self.tier,
            path,
            start: Instant::now(),
            span: span.clone(),
        };
        let call = inner.call(request).instrument(span.clone());
        Box::pin(async move {
            let response = call.await?;
            let (parts, body) = response.into_parts();
            let immediate = status_of(&parts.headers);
            let body = RpcBody {
                inner: body,
                span,
                record: Some(record),
                status: immediate,
            };
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    let code: i32 = value.trim().parse().ok()?;
    Some(tonic::Code::from_i32(code))
}

/// What is recorded when the call's status is known.
struct Record {
    tier: &'static str,
    path: String,
    start: Instant,
    span: tracing::Span,
}

impl Record {
    fn finish(self, code: tonic::Code) {
        // Unknown paths would let any client mint label values.
        let method = if code == tonic::Code::Unimplemented {
            "unknown".to_string()
        } else {
            self.path.trim_start_matches('/').to_string()
        };
        let registry = registry();
        registry.add(
            "blip2_rpc_requests_total",
            "RPCs finished, by tier, method and gRPC status code.",
            vec![
                ("tier", self.tier.to_string()),
                ("method", method.clone()),
                ("code", format!("{code:?}")),
            ],
            1,
        );
        registry.observe(
            "blip2_rpc_duration_seconds",
            "RPC duration from the request to the end of the response stream.",
            vec![("tier", self.tier.to_string()), ("method", method)],
            LATENCY_BUCKETS,
            self.start.elapsed().as_secs_f64(),
        );
        self.span.record("rpc.grpc.status_code", code as i64);
        if code != tonic::Code::Ok {
            self.span.record("otel.status_code", "ERROR");
        }
    }
}

/// A response body that finishes the call's record at its end (or when dropped before it).
pub struct RpcBody<B> {
    inner: B,
    span: tracing::Span,
    record: Option<Record>,
    /// From the headers (trailers-only responses) or the trailers.
    status: Option<tonic::Code>,
}

impl<B> RpcBody<B> {
    fn finish(&mut self, code: tonic::Code) {
        if let Some(record) = self.record.take() {
            record.finish(code);
        }
    }
}

impl<B> Drop for RpcBody<B> {
    fn drop(&mut self) {
        // Dropped before its end: the client left (or the connection broke).
        let code = self.status.unwrap_or(tonic::Code::Cancelled);
        self.finish(code);
    }
}

impl<B: Body + Unpin> Body for RpcBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = {
            let _entered = this.span.enter();
            Pin::new(&mut this.inner).poll_frame(cx)
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(code) = status_of(trailers) {
                        this.status = Some(code);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(tonic::Code::Unknown),
            Poll::Ready(None) => {
                let code = this.status.unwrap_or(tonic::Code::Ok);
                this.finish(code);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
