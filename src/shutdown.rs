//! The process signals: SIGTERM or SIGINT (Ctrl-C) to shut down, SIGHUP to reload.

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

/// Installs the handler for SIGHUP now (its default action would kill the process) and gives
/// back a channel that yields once per signal. Must be called within the runtime; where there
/// is no SIGHUP the channel never yields.
pub fn reloads() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hangups) => {
                tokio::spawn(async move {
                    while hangups.recv().await.is_some() {
                        // Signals that arrive while a reload waits are one reload.
                        let _ = tx.try_send(());
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by restarting"),
        }
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
}
