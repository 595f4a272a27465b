// Activations are megabyte buffers allocated and freed on every call. glibc's malloc hands such
// buffers back to the OS when freed, so each new one is paged in again: about 30% of the
// transport's CPU went to page faults. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    moe_worker::cli::main()
}
