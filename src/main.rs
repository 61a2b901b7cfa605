//! The `tollgate` binary: everything is in the library; see `tollgate::cli`.

fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}
