//! The `pipeline` binary: everything lives in the library (`pipeline::cli`).

fn main() -> std::process::ExitCode {
    pipeline::cli::main()
}
