//! The `trainer` binary; everything is in [`trainer::cli::main`].

fn main() -> std::process::ExitCode {
    trainer::cli::main()
}
