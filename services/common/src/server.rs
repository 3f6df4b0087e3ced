//! Server plumbing every tier uses: grpc.health.v1, server reflection, shutdown on
//! SIGTERM/SIGINT, graceful shutdown ([`Drain`], [`serve_gracefully`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tonic::Status;
use tonic_health::server::HealthReporter;

/// grpc.health.v1 and server reflection (blip2.v1 and health), as routes a tier adds its own
/// service to; the reporter flips health statuses (SERVING only once weights are loaded).
pub fn standard_routes(
) -> Result<(HealthReporter, tonic::service::Routes), tonic_reflection::server::Error> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(blip2_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let routes = tonic::service::Routes::new(health).add_service(reflection);
    Ok((health_reporter, routes))
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    ctrl_c.await.ok();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        ctrl_c.await.ok();
    }
}

/// How long a tier lets its calls run on after SIGTERM by default (`--shutdown-grace`).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long the transport may take to close its connections once every call has ended.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Graceful shutdown of one server: counts the calls in flight (their response bodies, to the
/// end of the stream), refuses new ones with UNAVAILABLE once draining, and cuts the ones still
/// running when the grace period is over. grpc.health.v1 and reflection are never refused or
/// counted, so a prober sees NOT_SERVING while the server drains.
///
/// Install [`Drain::layer`] on the tonic server and run it through [`serve_gracefully`].
#[derive(Clone, Default)]
pub struct Drain {
    state: Arc<DrainState>,
}

#[derive(Default)]
struct DrainState {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
    /// Flipped to `true` when the calls still running are to be cut.
    cut: CutSignal,
}

struct CutSignal(watch::Sender<bool>);

impl Default for CutSignal {
    fn default() -> Self {
        Self(watch::channel(false).0)
    }
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// The tower layer that refuses, counts and cuts calls.
    pub fn layer(&self) -> DrainLayer {
        DrainLayer {
            state: self.state.clone(),
        }
    }

    /// Calls (other than health and reflection) whose response has not ended.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// Whether new calls are refused.
    pub fn is_draining(&self) -> bool {
        self.state.draining.load(Ordering::SeqCst)
    }

    /// From now on new calls are refused with UNAVAILABLE.
    pub fn start(&self) {
        self.state.draining.store(true, Ordering::SeqCst);
    }

    /// Ends every call still running with UNAVAILABLE (their handlers see the client leave).
    pub fn cut(&self) {
        self.start();
        self.state.cut.0.send_replace(true);
    }

    /// Resolves once no call is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.state.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// See [`Drain`].
#[derive(Clone)]
pub struct DrainLayer {
    state: Arc<DrainState>,
}

impl<S> tower_layer::Layer<S> for DrainLayer {
    type Service = DrainService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DrainService {
            inner,
            state: self.state.clone(),
        }
    }
}

/// See [`Drain`].
#[derive(Clone)]
pub struct DrainService<S> {
    inner: S,
    state: Arc<DrainState>,
}

/// Paths that keep answering while the server drains.
fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.")
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for DrainService<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: http_body::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        if exempt(request.uri().path()) {
            let call = self.inner.call(request);
            return Box::pin(async move { Ok(call.await?.map(tonic::body::Body::new)) });
        }
        if self.state.draining.load(Ordering::SeqCst) {
            let status = Status::unavailable(
                "the server is shutting down and takes no new calls; retry on another replica",
            );
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        let guard = InFlight::enter(self.state.clone());
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            Ok(response.map(|body| {
                tonic::body::Body::new(Tracked {
                    cut: Box::pin(cut_signal(guard.state.cut.0.subscribe())),
                    inner: Some(tonic::body::Body::new(body)),
                    _guard: guard,
                })
            }))
        })
    }
}

async fn cut_signal(mut cut: watch::Receiver<bool>) {
    // An error means the drain state is gone: then nothing will ever cut.
    if cut.wait_for(|&cut| cut).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One call in flight, counted until dropped.
struct InFlight {
    state: Arc<DrainState>,
}

impl InFlight {
    fn enter(state: Arc<DrainState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        Self { state }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.state.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.state.idle.notify_waiters();
        }
    }
}

/// A response body that counts as in flight until it ends or is dropped, and that ends with
/// UNAVAILABLE when the drain cuts it (dropping the handler's stream, which then sees its
/// client leave).
struct Tracked {
    inner: Option<tonic::body::Body>,
    cut: BoxFuture<()>,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = tonic::codegen::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if self.inner.is_none() {
            return Poll::Ready(None);
        }
        if self.cut.as_mut().poll(cx).is_ready() {
            self.inner = None;
            let status = Status::unavailable(
                "the server shut down before this call finished (its shutdown grace period ran out)",
            );
            let mut trailers = http::HeaderMap::new();
            return match status.add_header(&mut trailers) {
                Ok(()) => Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers)))),
                Err(status) => Poll::Ready(Some(Err(status))),
            };
        }
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(Pin::new(inner).poll_frame(cx));
        if frame.is_none() {
            self.inner = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.as_ref().map_or_else(
            || http_body::SizeHint::with_exact(0),
            http_body::Body::size_hint,
        )
    }
}

/// Runs a tonic server from first call to exit, shutting it down in order when `signal`
/// resolves:
/// 1. `not_serving` runs (health NOT_SERVING for every service) and the drain refuses new
///    calls with UNAVAILABLE; health and reflection still answer;
/// 2. calls in flight may finish, for up to `grace`;
/// 3. those still running are cut (they end with UNAVAILABLE, their work is cancelled);
/// 4. the listener closes and connections are closed (at most a further 2 s).
///
/// `server` builds the server future from the future that tells the transport to stop.
pub async fn serve_gracefully<Server, Served, NotServing>(
    server: Server,
    drain: Drain,
    signal: impl Future<Output = ()>,
    not_serving: NotServing,
    grace: Duration,
) -> Result<(), tonic::transport::Error>
where
    Server: FnOnce(BoxFuture<()>) -> Served,
    Served: Future<Output = Result<(), tonic::transport::Error>>,
    NotServing: Future<Output = ()>,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = server(Box::pin(async move {
        stopped.await.ok();
    }));
    tokio::pin!(served);
    tokio::select! {
        result = &mut served => return result,
        () = signal => {}
    }
    not_serving.await;
    drain.start();
    tracing::info!(
        in_flight = drain.in_flight(),
        grace_s = grace.as_secs_f64(),
        "shutting down: NOT_SERVING, new calls refused, calls in flight may finish"
    );
    let drained = tokio::select! {
        result = &mut served => return result,
        drained = tokio::time::timeout(grace, drain.idle()) => drained.is_ok(),
    };
    if !drained {
        tracing::warn!(
            in_flight = drain.in_flight(),
            "shutdown grace period over; cutting the calls still running"
        );
        drain.cut();
    }
    stop.send(()).ok();
    match tokio::time::timeout(CLOSE_TIMEOUT, served).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!("connections still open after shutdown; leaving them");
            Ok(())
        }
    }
}

/// Serves one tier on `listener` until `shutdown` resolves, the same way for every tier:
/// grpc.health.v1 and reflection beside the tier's service (added by `add_service`), health
/// SERVING for `service_name` and for the server (""), TCP_NODELAY on every connection (tokens
/// are small writes that Nagle's algorithm would hold back), the RPC layer (spans and metrics,
/// labelled `tier`; calls refused while draining are counted too) outside the drain, and
/// [`serve_gracefully`] with `grace`.
pub async fn serve_tier(
    tier: &'static str,
    service_name: &'static str,
    add_service: impl FnOnce(tonic::service::Routes) -> tonic::service::Routes,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    grace: Duration,
) -> Result<(), tonic::transport::Error> {
    use tokio_stream::StreamExt;
    use tonic_health::ServingStatus;

    let (health, routes) = match standard_routes() {
        Ok(standard) => standard,
        Err(error) => {
            // Only a broken descriptor set gets here: serve without reflection rather than not.
            tracing::error!(%error, tier, "cannot build server reflection; serving without it");
            let (health, service) = tonic_health::server::health_reporter();
            (health, tonic::service::Routes::new(service))
        }
    };
    for name in [service_name, ""] {
        health
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    let routes = add_service(routes);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|stream| {
        let stream = stream?;
        stream.set_nodelay(true)?;
        Ok::<_, std::io::Error>(stream)
    });
    let not_serving = async move {
        tracing::info!(tier, "shutting down");
        for name in [service_name, ""] {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
    };
    let drain = Drain::new();
    let builder = crate::tls::server_builder(tls)?
        .layer(crate::rpc::RpcLayer::new(tier))
        .layer(drain.layer());
    let server = move |stop| {
        let mut builder = builder;
        builder
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, stop)
    };
    serve_gracefully(server, drain, shutdown, not_serving, grace).await
}
