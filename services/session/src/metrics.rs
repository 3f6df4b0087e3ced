//! The session tier's figures read at scrape time: sessions held (from the store, which may be
//! remote, hence async).

use std::future::Future;
use std::pin::Pin;

use blip2_common::metrics::{CollectAsync, Samples};

impl CollectAsync for crate::Inner {
    fn collect<'a>(
        &'a self,
        out: &'a mut Samples,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let tier = || vec![("tier", "session".to_string())];
            match self.store.count().await {
                Ok(count) => out.gauge(
                    "blip2_session_active_sessions",
                    "Sessions held by the session store (not expired, not deleted).",
                    tier(),
                    count as f64,
                ),
                Err(error) => tracing::warn!(%error, "counting sessions for metrics failed"),
            }
            out.gauge(
                "blip2_session_uploads",
                "Uploaded images waiting to be used by a turn.",
                tier(),
                self.uploads.len() as f64,
            );
        })
    }
}
