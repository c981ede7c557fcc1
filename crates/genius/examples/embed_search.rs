//! Ranks a handful of sentences against a query by embedding similarity.
//!
//! ```text
//! cargo run --release --example embed_search -- "$(.ci/fetch-model.sh minilm)" "How do plants make food?"
//! ```

#![allow(clippy::print_stdout)] // printing is its job

use rusty_genius::core::{Embed, Embeddings};
use rusty_genius::Orchestrator;

#[async_std::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    // An embedding model: a .gguf path, or e.g. "bge-small-en-v1.5".
    let model = args.next().unwrap_or_else(|| "bge-small-en-v1.5".into());
    let query = args
        .next()
        .unwrap_or_else(|| "How do plants make food?".into());
    let documents = [
        "The Eiffel Tower was completed in Paris in 1889.",
        "Photosynthesis turns sunlight, water and CO2 into sugar.",
        "A marathon is a foot race of about 42 kilometres.",
        "Espresso forces hot water through finely ground coffee.",
        "Volcanoes erupt when molten rock rises to the surface.",
    ];

    let genius = Orchestrator::new().await?.start();
    genius.load(&model).await?;
    // One request embeds all documents together, one vector each, in order.
    let docs = genius.embeddings(Embed::new(documents)).await?;
    let asked = genius.embeddings(Embed::new([query.as_str()])).await?;

    let mut ranked: Vec<(f32, &str)> = docs
        .vectors
        .iter()
        .zip(documents)
        .map(|(vector, text)| (Embeddings::cosine(&asked.vectors[0], vector), text))
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("{query}");
    for (score, text) in ranked {
        println!("  {score:.3}  {text}");
    }
    Ok(())
}
