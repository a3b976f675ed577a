//! Generates the protocol's Rust types from `proto/vim.proto`, with protox (a protobuf compiler
//! in Rust, so no `protoc` has to be installed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/vim.proto");
    let files = protox::compile(["proto/vim.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(files)?;
    Ok(())
}
