//! The `pipeline` command line, built as a binary of the e2e package so that its tests can run it
//! as a child process (and crash it) via `CARGO_BIN_EXE_pipeline-e2e`; identical to `pipeline`.

fn main() -> std::process::ExitCode {
    pipeline::cli::main()
}
