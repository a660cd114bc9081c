//! The `trainer` command line, built as a binary of the e2e package so that its tests can run it
//! as a child process (and interrupt it) via `CARGO_BIN_EXE_trainer-e2e`; identical to `trainer`.

fn main() -> std::process::ExitCode {
    trainer::cli::main()
}
