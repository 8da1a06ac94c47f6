//! `blockfence daemon`: run the node daemon until SIGTERM or SIGINT.

use crate::daemon::{self, DaemonArgs};

/// Runs the daemon on a multi-threaded tokio runtime.
pub fn run(args: DaemonArgs) -> anyhow::Result<u8> {
    let cfg = args.resolve()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blockfence")
        .build()?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        daemon::run(cfg, stop).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(crate::cli::exit::OK)
}
