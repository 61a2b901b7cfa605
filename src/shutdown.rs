//! The shutdown signal: SIGTERM or SIGINT (Ctrl-C).

use std::future::Future;

/// Installs the handlers for SIGTERM and SIGINT now, and gives back what resolves on the first
/// of them. Called before the listeners start, so that a signal sent as soon as the gateway says
/// it is serving stops it gracefully instead of killing it with the default action. Must be
/// called within the runtime.
pub fn signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
