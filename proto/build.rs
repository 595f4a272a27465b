//! Compiles `proto/` with protox (pure Rust), so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["moe/v1/moe.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".moe.v1.Tensor.data")
        .compile_fds(fds)?;
    Ok(())
}
