//! Generates the blip2.v1 server and client code, and a file descriptor set for reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "blip2/v1/common.proto",
        "blip2/v1/vision.proto",
        "blip2/v1/llm.proto",
        "blip2/v1/session.proto",
        "blip2/v1/retrieval.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("blip2_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    Ok(())
}
