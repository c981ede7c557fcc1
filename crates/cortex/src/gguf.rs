//! What a GGUF file's header says about the model, read without loading
//! it, and the memory a model will take, estimated from that.
//!
//! A GGUF file starts with a key-value table (architecture, layer count,
//! attention shape, the tokenizer's vocabulary) before the tensors. Only
//! the table is read, through a buffer, skipping the values it does not
//! need; every length is checked against the file's size, so a damaged or
//! hostile file is an error, never a huge allocation.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::sync::Arc;

/// What the header of a GGUF file says, as far as memory and purpose go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GgufFacts {
    /// `general.architecture`, e.g. `qwen2`, `gemma3`, `bert`.
    pub architecture: String,
    /// Context length the model was trained for.
    pub context_length: u64,
    /// Transformer layers.
    pub block_count: u64,
    /// Width of the hidden state.
    pub embedding_length: u64,
    /// Attention heads.
    pub head_count: u64,
    /// Key-value heads (grouped-query attention), `head_count` if absent.
    pub head_count_kv: u64,
    /// Width of one key head, `embedding_length / head_count` if absent.
    pub key_length: u64,
    /// Width of one value head, as the key's if absent.
    pub value_length: u64,
    /// Tokens in the vocabulary.
    pub vocab_size: u64,
    /// Whether the model declares how its token vectors are pooled (an
    /// embedding model).
    pub declares_pooling: bool,
}

impl GgufFacts {
    /// Reads the header of the GGUF file at `path`.
    pub fn read(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        let mut reader = Reader {
            inner: BufReader::with_capacity(64 << 10, file),
            size,
        };
        reader.facts()
    }

    /// About how many weights the model has: its blocks' attention and
    /// feed-forward matrices (a feed-forward width of 4× the hidden state
    /// is assumed) and the token embeddings.
    pub fn parameters(&self) -> u64 {
        let width = self.embedding_length;
        let kv_width = self.head_count_kv * self.key_length.max(1);
        let attention = width * width * 2 + width * kv_width * 2;
        let feed_forward = width * width * 4 * 3;
        self.block_count * (attention + feed_forward) + self.vocab_size * width
    }

    /// Bytes of KV cache one token of context takes (f16 keys and values).
    pub fn kv_bytes_per_token(&self) -> u64 {
        let per_layer = self.head_count_kv * (self.key_length + self.value_length) * 2;
        self.block_count * per_layer
    }
}

/// The model's estimated size in memory, and whether it embeds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Bytes of host memory: the weights and KV cache of the layers left on
    /// the CPU, the logits, and the CPU's working buffers.
    pub bytes: u64,
    /// Bytes of GPU memory: the weights and KV cache of the offloaded
    /// layers and the device's working buffers; 0 when nothing is
    /// offloaded.
    pub device_bytes: u64,
    /// Whether it is an embedding model.
    pub embeds: bool,
}

/// Estimates the memory a model file will take once loaded. It runs off
/// the async executor (it reads the file's header).
pub type FootprintFn = Arc<dyn Fn(&Path) -> Footprint + Send + Sync>;

/// The estimate for an engine that keeps `context` tokens for each of
/// `parallel` requests and decodes `batch` tokens at a time, all on the
/// CPU: see [`footprint_offloaded`].
pub fn footprint(path: &Path, context: u64, parallel: u64, batch: u64) -> Footprint {
    footprint_offloaded(path, context, parallel, batch, 0)
}

/// The estimate for an engine that keeps `context` tokens for each of
/// `parallel` requests, decodes `batch` tokens at a time, and offloads
/// `gpu_layers` layers (`u32::MAX` for all) to a GPU: the files' size
/// (weights), the KV cache of `min(context, trained) × parallel` tokens,
/// and the output and compute buffers, each counted where it lives. A file
/// whose header cannot be read (or names no layers) counts as its size
/// alone, on the host.
///
/// llama.cpp offloads up to `gpu_layers` of the `blocks + 1` layers (the
/// output layer counts as one): the blocks' share of the weights and their
/// KV cache go to the device, with the compute graph's scratch. The token
/// embeddings stay on the host, and so do the logits.
pub fn footprint_offloaded(
    path: &Path,
    context: u64,
    parallel: u64,
    batch: u64,
    gpu_layers: u32,
) -> Footprint {
    let weights = files_size(path);
    let facts = match GgufFacts::read(path) {
        Ok(facts) if facts.block_count > 0 => facts,
        _ => {
            return Footprint {
                bytes: weights,
                device_bytes: 0,
                embeds: false,
            }
        }
    };
    let context = context.min(facts.context_length.max(1));
    let kv = facts.kv_bytes_per_token() * context * parallel.max(1);
    // The logits of one output per request (a generative model), and
    // the compute graph's scratch for a batch: a few hidden-state-wide
    // activations per token and one layer's attention scores against a
    // request's context. (llama.cpp reserves logits for a whole batch,
    // but only the rows asked for are ever written, so only those pages
    // are resident.) Measured against RSS: Qwen2.5-0.5B Q4_K_M with 4 ×
    // 2048 tokens, 668 MB estimated, 672 MB resident (with the process);
    // MiniLM-L6 f32, 129 MB estimated, 108 MB resident.
    let outputs = if facts.declares_pooling {
        0
    } else {
        facts.vocab_size * 4 * parallel.max(1)
    };
    let scratch =
        batch * facts.embedding_length * 4 * 8 + batch * context * facts.head_count.max(1) * 4;
    let layers = facts.block_count + 1;
    let offloaded = u64::from(gpu_layers).min(layers);
    if offloaded == 0 {
        return Footprint {
            bytes: weights + kv + outputs + scratch,
            device_bytes: 0,
            embeds: facts.declares_pooling,
        };
    }
    // The token embeddings (vocabulary × width, at about the file's
    // average bits per weight) never leave the host; the blocks offloaded
    // take their share of the rest, with their KV cache. Measured on
    // lavapipe with 4 × 4096 tokens (llama.cpp's buffer sizes): gemma-3-270m
    // puts 68 MB of weights and 302 MB of KV cache on the device, Qwen2.5-0.5B
    // 247 MB and 201 MB.
    let per_weight = weights as f64 / facts.parameters().max(1) as f64;
    let embeddings = ((facts.vocab_size * facts.embedding_length) as f64 * per_weight)
        .min(weights as f64) as u64;
    let blocks = offloaded.min(facts.block_count);
    let device_weights = (weights - embeddings) * blocks / facts.block_count;
    let device_kv = kv * blocks / facts.block_count;
    // The host keeps a batch's inputs, and the logits of a whole batch in
    // pinned memory the GPU writes to (gemma: 512 × 262,144 × 4 bytes).
    let host_scratch = batch * facts.embedding_length * 4 * 2
        + if facts.declares_pooling {
            0
        } else {
            batch * facts.vocab_size * 4
        };
    Footprint {
        bytes: weights - device_weights + (kv - device_kv) + outputs + host_scratch,
        device_bytes: device_weights + device_kv + scratch,
        embeds: facts.declares_pooling,
    }
}

/// The size of a model's file, and of the other parts when it is split
/// (`name-00001-of-00003.gguf`).
fn files_size(path: &Path) -> u64 {
    let single = std::fs::metadata(path).map_or(0, |m| m.len());
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return single;
    };
    let Some((stem, parts)) = split_name(name) else {
        return single;
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    (1..=parts)
        .map(|part| {
            let name = format!("{stem}-{part:05}-of-{parts:05}.gguf");
            std::fs::metadata(dir.join(name)).map_or(0, |m| m.len())
        })
        .sum()
}

/// `("name", 3)` for `name-00001-of-00003.gguf`.
fn split_name(name: &str) -> Option<(&str, u32)> {
    let rest = name.strip_suffix(".gguf")?;
    let (before, parts) = rest.rsplit_once("-of-")?;
    let (stem, part) = before.rsplit_once('-')?;
    if part.len() != 5 || parts.len() != 5 {
        return None;
    }
    part.parse::<u32>().ok()?;
    Some((stem, parts.parse().ok()?))
}

/// The most key-value pairs a header may declare.
const MAX_KEYS: u64 = 1 << 20;

/// The longest key or string value read into memory; longer ones (a chat
/// template can be long) are skipped when not needed.
const MAX_KEPT_STRING: u64 = 4096;

const GGUF_STRING: u32 = 8;
const GGUF_ARRAY: u32 = 9;

struct Reader {
    inner: BufReader<File>,
    size: u64,
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("GGUF header: {what}"),
    )
}

impl Reader {
    fn facts(&mut self) -> std::io::Result<GgufFacts> {
        let mut magic = [0u8; 4];
        self.inner.read_exact(&mut magic)?;
        if &magic != b"GGUF" {
            return Err(invalid("no GGUF magic"));
        }
        let version = self.u32()?;
        if version < 2 {
            return Err(invalid("version 1 is not supported"));
        }
        let _tensors = self.u64()?;
        let keys = self.u64()?;
        if keys > MAX_KEYS {
            return Err(invalid("too many keys"));
        }
        let mut facts = GgufFacts::default();
        let mut vocab = 0;
        for _ in 0..keys {
            let key = self.string(MAX_KEPT_STRING)?;
            let kind = self.u32()?;
            let Some(key) = key else {
                self.skip_value(kind)?;
                continue;
            };
            if key == "general.architecture" && kind == GGUF_STRING {
                facts.architecture = self.string(MAX_KEPT_STRING)?.unwrap_or_default();
                continue;
            }
            if key == "tokenizer.ggml.tokens" && kind == GGUF_ARRAY {
                let (_, len) = self.skip_array()?;
                vocab = len;
                continue;
            }
            // Keys of the architecture's own section: `<arch>.<field>`.
            let field = key.split_once('.').map_or("", |(_, field)| field);
            if field == "pooling_type" {
                facts.declares_pooling = self.integer(kind)?.is_some_and(|n| n > 0);
                continue;
            }
            let slot = match field {
                "context_length" => &mut facts.context_length,
                "block_count" => &mut facts.block_count,
                "embedding_length" => &mut facts.embedding_length,
                "attention.head_count" => &mut facts.head_count,
                "attention.head_count_kv" => &mut facts.head_count_kv,
                "attention.key_length" => &mut facts.key_length,
                "attention.value_length" => &mut facts.value_length,
                "vocab_size" => &mut vocab,
                _ => {
                    self.skip_value(kind)?;
                    continue;
                }
            };
            if let Some(value) = self.integer(kind)? {
                *slot = value;
            }
        }
        facts.vocab_size = vocab;
        if facts.head_count_kv == 0 {
            facts.head_count_kv = facts.head_count;
        }
        if facts.key_length == 0 && facts.head_count > 0 {
            facts.key_length = facts.embedding_length / facts.head_count;
        }
        if facts.value_length == 0 {
            facts.value_length = facts.key_length;
        }
        Ok(facts)
    }

    fn bytes<const N: usize>(&mut self) -> std::io::Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf)?;
        Ok(buf)
    }

    fn u32(&mut self) -> std::io::Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> std::io::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    /// A length that must fit in what is left of the file.
    fn length(&mut self, unit: u64) -> std::io::Result<u64> {
        let len = self.u64()?;
        if len.saturating_mul(unit.max(1)) > self.size {
            return Err(invalid("a length runs past the end of the file"));
        }
        Ok(len)
    }

    /// A string, kept if at most `keep` bytes long, else skipped.
    fn string(&mut self, keep: u64) -> std::io::Result<Option<String>> {
        let len = self.length(1)?;
        if len > keep {
            self.skip(len)?;
            return Ok(None);
        }
        let mut buf = vec![0u8; len as usize];
        self.inner.read_exact(&mut buf)?;
        Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
    }

    fn skip(&mut self, n: u64) -> std::io::Result<()> {
        let n = i64::try_from(n).map_err(|_| invalid("a length is too large"))?;
        self.inner.seek_relative(n)
    }

    /// An unsigned integer value of any width (`None` for other types).
    fn integer(&mut self, kind: u32) -> std::io::Result<Option<u64>> {
        Ok(Some(match kind {
            0 => u64::from(self.bytes::<1>()?[0]),
            1 => self.bytes::<1>()?[0] as i8 as u64,
            2 => u64::from(u16::from_le_bytes(self.bytes()?)),
            3 => i16::from_le_bytes(self.bytes()?) as u64,
            4 => u64::from(self.u32()?),
            5 => i32::from_le_bytes(self.bytes()?) as u64,
            10 | 11 => self.u64()?,
            _ => {
                self.skip_value(kind)?;
                return Ok(None);
            }
        }))
    }

    fn skip_value(&mut self, kind: u32) -> std::io::Result<()> {
        match kind {
            GGUF_STRING => self.string(0).map(drop),
            GGUF_ARRAY => self.skip_array().map(drop),
            kind => self.skip(scalar_width(kind)?),
        }
    }

    /// Skips an array; its element type and length.
    fn skip_array(&mut self) -> std::io::Result<(u32, u64)> {
        let kind = self.u32()?;
        if kind == GGUF_ARRAY {
            return Err(invalid("nested arrays"));
        }
        if kind == GGUF_STRING {
            let len = self.length(8)?;
            for _ in 0..len {
                self.string(0)?;
            }
            return Ok((kind, len));
        }
        let width = scalar_width(kind)?;
        let len = self.length(width)?;
        self.skip(len * width)?;
        Ok((kind, len))
    }
}

fn scalar_width(kind: u32) -> std::io::Result<u64> {
    Ok(match kind {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        _ => return Err(invalid("unknown value type")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn header(keys: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        out.extend((keys.len() as u64).to_le_bytes());
        for (key, kind, value) in keys {
            string(&mut out, key);
            out.extend(kind.to_le_bytes());
            out.extend(value);
        }
        out
    }

    fn write(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("gguf-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.gguf");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Qwen2.5-0.5B's attention shape, as its header gives it.
    fn qwen_shape() -> Vec<(&'static str, u32, Vec<u8>)> {
        vec![
            ("qwen2.block_count", 4, 24u32.to_le_bytes().to_vec()),
            ("qwen2.embedding_length", 4, 896u32.to_le_bytes().to_vec()),
            (
                "qwen2.attention.head_count",
                4,
                14u32.to_le_bytes().to_vec(),
            ),
            (
                "qwen2.attention.head_count_kv",
                4,
                2u32.to_le_bytes().to_vec(),
            ),
            ("qwen2.context_length", 4, 32768u32.to_le_bytes().to_vec()),
        ]
    }

    #[test]
    fn reads_the_attention_shape_and_skips_the_rest() {
        let mut arch = Vec::new();
        string(&mut arch, "qwen2");
        let mut tokens = 8u32.to_le_bytes().to_vec();
        tokens.extend(3u64.to_le_bytes());
        for t in ["a", "bb", "ccc"] {
            string(&mut tokens, t);
        }
        let mut template = Vec::new();
        string(&mut template, &"x".repeat(10_000));
        let mut keys = vec![
            ("general.architecture", 8, arch),
            ("tokenizer.chat_template", 8, template),
        ];
        keys.extend(qwen_shape());
        keys.push(("tokenizer.ggml.tokens", 9, tokens));
        let bytes = header(&keys);
        let facts = GgufFacts::read(&write("qwen", &bytes)).unwrap();
        assert_eq!(facts.architecture, "qwen2");
        assert_eq!(facts.block_count, 24);
        assert_eq!(facts.key_length, 64);
        assert_eq!(facts.head_count_kv, 2);
        assert_eq!(facts.vocab_size, 3);
        assert!(!facts.declares_pooling);
        // 24 layers x 2 heads x (64 + 64) x 2 bytes.
        assert_eq!(facts.kv_bytes_per_token(), 24 * 2 * 128 * 2);
    }

    #[test]
    fn offloaded_layers_move_their_weights_and_kv_cache_to_the_device() {
        let mut arch = Vec::new();
        string(&mut arch, "qwen2");
        let mut keys = vec![("general.architecture", 8, arch)];
        keys.extend(qwen_shape());
        let mut bytes = header(&keys);
        // Stand-in weights: the header plus 4 MB.
        bytes.resize(bytes.len() + 4_000_000, 0);
        let path = write("offload", &bytes);
        let cpu = footprint(&path, 4096, 4, 512);
        assert_eq!(cpu.device_bytes, 0);
        let all = footprint_offloaded(&path, 4096, 4, 512, u32::MAX);
        let half = footprint_offloaded(&path, 4096, 4, 512, 12);
        let kv = 24 * 2 * 128 * 2 * 4096 * 4;
        // Every block's KV cache on the device, none on the host.
        assert!(all.device_bytes > kv, "{all:?}");
        assert!(all.bytes < cpu.bytes - kv, "{all:?} vs {cpu:?}");
        // Half the blocks: between none and all, on both sides.
        assert!(half.device_bytes > kv / 2 && half.device_bytes < all.device_bytes);
        assert!(half.bytes > all.bytes && half.bytes < cpu.bytes + 512 * 4);
        // Nothing offloaded is the CPU's estimate.
        assert_eq!(footprint_offloaded(&path, 4096, 4, 512, 0), cpu);
    }

    #[test]
    fn a_length_past_the_end_is_an_error_not_an_allocation() {
        let mut bytes = header(&[]);
        bytes[16..24].copy_from_slice(&1u64.to_le_bytes());
        bytes.extend(u64::MAX.to_le_bytes());
        assert!(GgufFacts::read(&write("hostile", &bytes)).is_err());
        let path = write("text", b"just text");
        assert!(GgufFacts::read(&path).is_err());
        // The estimate of an unreadable file is its size.
        assert_eq!(footprint(&path, 4096, 4, 512).bytes, 9);
    }

    #[test]
    fn split_names_are_recognised() {
        assert_eq!(split_name("m-00001-of-00003.gguf"), Some(("m", 3)));
        assert_eq!(split_name("m.gguf"), None);
    }
}
