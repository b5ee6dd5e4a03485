//! Process signals. The binary ([`crate::cli`]) waits for the first SIGTERM/SIGINT to start a
//! graceful shutdown of the [`crate::app::App`], and for a second one to exit at once (130),
//! for the operator whose graceful shutdown is taking too long. No task is spawned for it.

/// SIGTERM and SIGINT, caught from the moment this exists: one that arrives while the
/// service is still starting (migrations, loading users) is not lost and does not kill the
/// process; [`Signals::next`] returns it as soon as it is asked.
#[cfg(unix)]
#[derive(Debug)]
pub struct Signals(Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

#[cfg(unix)]
impl Signals {
    /// Installs the handlers.
    pub fn new() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => Signals(Some((t, i))),
            // Cannot install handlers: fall back to Ctrl-C only.
            _ => Signals(None),
        }
    }

    /// The next SIGTERM or SIGINT (or one caught already), and which.
    pub async fn next(&mut self) -> &'static str {
        match &mut self.0 {
            Some((term, int)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            None => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
}

#[cfg(unix)]
impl Default for Signals {
    fn default() -> Self {
        Self::new()
    }
}

/// Ctrl-C (other platforms).
#[cfg(not(unix))]
#[derive(Debug, Default)]
pub struct Signals;

#[cfg(not(unix))]
impl Signals {
    /// Nothing to install.
    pub fn new() -> Signals {
        Signals
    }

    /// The next Ctrl-C.
    pub async fn next(&mut self) -> &'static str {
        signal().await
    }
}

/// Resolves at the next Ctrl-C.
#[cfg(not(unix))]
pub async fn signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "Ctrl-C"
}
