//! The `presence-bridge` binary: see [`presence_bridge::cli`].

fn main() -> std::process::ExitCode {
    presence_bridge::cli::main()
}
