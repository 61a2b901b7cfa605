//! The `tollgate` binary: everything is in the library; see `tollgate::cli`.

/// mimalloc: the request path allocates and frees a few dozen small blocks per request (hyper's
/// header maps and buffers); glibc malloc spent ~9 % of the proxy's CPU on them
/// (docs/PERFORMANCE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}
