//! The metrics endpoint: `/metrics` (Prometheus text format), `/healthz` (the process is up) and
//! `/readyz` (recovered and accepting requests). It is served from before recovery until after the
//! drain, so an orchestrator can tell a starting or draining giftd from a dead one.

use crate::metrics::Metrics;
use crate::server::Shared;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::{Arc, OnceLock};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Scrapes are few and small: a handful of connections is plenty.
const METRICS_CONNECTIONS_MAX: usize = 16;

/// The server's shared state, set once recovery is done; until then a scrape shows what is known
/// (recovery figures, `giftd_ready 0`).
pub type Sources = Arc<OnceLock<Arc<Shared>>>;

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, sources: Sources, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS_MAX));
    loop {
        let (sock, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
        let (metrics, sources) = (metrics.clone(), sources.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (metrics, sources) = (metrics.clone(), sources.clone());
                async move { Ok::<_, std::convert::Infallible>(respond(&req, metrics, sources).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(sock), service).await;
            drop(permit);
        });
    }
}

async fn respond(
    req: &Request<hyper::body::Incoming>,
    metrics: Arc<Metrics>,
    sources: Sources,
) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => {
            if let Some(shared) = sources.get().cloned() {
                // A census walks every card: not on an async worker.
                let _ = tokio::task::spawn_blocking(move || crate::server::refresh_metrics(&shared)).await;
            }
            (StatusCode::OK, "text/plain; version=0.0.4", metrics.render())
        }
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" if metrics.ready.get() == 1 => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n".to_string()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_string()),
    };
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}
