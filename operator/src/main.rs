use clap::Parser;

fn main() -> std::process::ExitCode {
    match moe_operator::cli::run(moe_operator::cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moe-operator: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
