//! Server plumbing every tier uses: grpc.health.v1, server reflection, shutdown on
//! SIGTERM/SIGINT.

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
