fn main() -> std::process::ExitCode {
    moe_worker::cli::main()
}
