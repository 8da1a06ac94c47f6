//! The `blockfence` binary: parses the command line and hands over to
//! [`blockfence::cli`]. Errors reach the user as one line on stderr.

use std::process::ExitCode;

fn main() -> ExitCode {
    restore_sigpipe();
    blockfence::cli::main()
}

/// Rust ignores SIGPIPE, so `blockfence inspect | head` would panic on a closed
/// pipe; a command-line tool should just end quietly, as C tools do.
#[allow(unsafe_code)]
fn restore_sigpipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL
    // installs no Rust handler, so no async-signal-safety concern arises.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}
