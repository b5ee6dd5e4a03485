//! Process signals. The binary ([`crate::cli`]) waits for the first SIGTERM/SIGINT to start a
//! graceful shutdown of the [`crate::app::App`], and for a second one to exit at once (130),
//! for the operator whose graceful shutdown is taking too long. No task is spawned for it.

/// Resolves at the next SIGTERM or SIGINT and says which.
#[cfg(unix)]
pub async fn signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Cannot install handlers: fall back to Ctrl-C only.
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Resolves at the next Ctrl-C.
#[cfg(not(unix))]
pub async fn signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "Ctrl-C"
}
