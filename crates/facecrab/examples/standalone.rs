//! facecrab on its own, as in the README and the web page; compiled by `cargo test`.

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

use facecrab::AssetAuthority;

#[async_std::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let authority = AssetAuthority::new()?;
    // A registry name, a HuggingFace id or a path; downloaded if not cached.
    let model_path = authority.ensure_model("qwen-2.5-3b-instruct").await?;
    println!("Model ready at: {:?}", model_path);
    Ok(())
}
