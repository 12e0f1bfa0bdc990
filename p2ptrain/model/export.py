"""Export one path as a standalone Hugging Face model: GPT-NeoX weights, config and tokenizer.

A path (stem + one module per level) is a plain pre-norm decoder, and GPT-NeoX with
``use_parallel_residual = false`` is exactly that architecture, so any `transformers`
user loads the export with ``AutoModelForCausalLM.from_pretrained(DIR)`` and no custom
code. The mapping, checked against transformers' `modeling_gpt_neox.py`:

==========================  =================================================================
p2ptrain                    GPT-NeoX
==========================  =================================================================
stem.embed                  gpt_neox.embed_in (and the output head when tied)
LayerNorm (eps 1e-5, bias)  input_layernorm / post_attention_layernorm / final_layer_norm
qkv (no bias), rows q|k|v   attention.query_key_value, rows per head [q_h|k_h|v_h],
                            ``attention_bias = false``
RoPE on (2i, 2i+1) pairs    RoPE on (i, i + d/2) pairs ("rotate_half"), base 10000, all dims
                            (``rotary_pct = 1``): q and k rows are permuted within each head,
                            which leaves q·k unchanged
proj                        attention.dense
fc -> exact GELU -> fc_out  mlp.dense_h_to_4h -> "gelu" -> mlp.dense_4h_to_h (biases: zero;
                            GPT-NeoX's MLP always has them)
head (untied)               embed_out
==========================  =================================================================

Levels are stacked in path order: level l, block b becomes layer ``l * blocks_per_level + b``.
The byte tokenizer becomes a `tokenizers` BPE without merges over GPT-2's byte-to-unicode
alphabet (id = byte value) with ``<|endoftext|>`` as id 256, so ids are identical to
p2ptrain's ByteTokenizer for every text.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from p2ptrain.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from p2ptrain.errors import ConfigError, UserError
from p2ptrain.model.grid import PathIndex, path_name
from p2ptrain.model.transformer import PathModel

EOS_TOKEN = "<|endoftext|>"


@dataclass
class ExportInfo:
    out: Path
    path: str
    round: int
    modules: list[str]
    tokens: int
    heldout_loss: float | None
    heldout_tokens: int


def _rope_permutation(head_dim: int) -> torch.Tensor:
    """New row j takes old row perm[j]: interleaved pairs (2i, 2i+1) -> halves (i, i + d/2)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def neox_state_dict(model: PathModel, n_heads: int) -> dict[str, torch.Tensor]:
    """The path's weights under GPT-NeoX's parameter names (fp32, contiguous, CPU)."""
    d = model.stem.embed.weight.shape[1]
    hd = d // n_heads
    perm = _rope_permutation(hd)
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        out[name] = t.detach().to("cpu", torch.float32).contiguous().clone()

    put("gpt_neox.embed_in.weight", model.stem.embed.weight)
    put("gpt_neox.final_layer_norm.weight", model.stem.norm.weight)
    put("gpt_neox.final_layer_norm.bias", model.stem.norm.bias)
    if model.stem.head is not None:
        put("embed_out.weight", model.stem.head.weight)
    layer = 0
    for level in model.levels:
        for block in level.blocks:
            p = f"gpt_neox.layers.{layer}."
            put(p + "input_layernorm.weight", block.norm1.weight)
            put(p + "input_layernorm.bias", block.norm1.bias)
            put(p + "post_attention_layernorm.weight", block.norm2.weight)
            put(p + "post_attention_layernorm.bias", block.norm2.bias)
            q, k, v = block.qkv.weight.detach().split(d, dim=0)
            q = q.view(n_heads, hd, d)[:, perm]
            k = k.view(n_heads, hd, d)[:, perm]
            v = v.view(n_heads, hd, d)
            put(p + "attention.query_key_value.weight", torch.cat([q, k, v], dim=1).reshape(3 * d, d))
            put(p + "attention.dense.weight", block.proj.weight)
            put(p + "mlp.dense_h_to_4h.weight", block.fc.weight)
            put(p + "mlp.dense_h_to_4h.bias", torch.zeros(block.fc.weight.shape[0]))
            put(p + "mlp.dense_4h_to_h.weight", block.fc_out.weight)
            put(p + "mlp.dense_4h_to_h.bias", torch.zeros(block.fc_out.weight.shape[0]))
            layer += 1
    return out


def neox_config(model_cfg, num_layers: int, vocab_size: int, eos_id: int) -> dict:
    """config.json for GPT-NeoX; carries both the older (rotary_pct, rotary_emb_base) and the
    newer (rope_parameters) spelling of the rotary settings so either transformers line reads it."""
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": vocab_size,
        "hidden_size": model_cfg.d_model,
        "num_hidden_layers": num_layers,
        "num_attention_heads": model_cfg.n_heads,
        "intermediate_size": model_cfg.mlp_ratio * model_cfg.d_model,
        "hidden_act": "gelu",
        "rotary_pct": 1.0,
        "rotary_emb_base": 10000,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
        "max_position_embeddings": model_cfg.context,
        "layer_norm_eps": 1e-5,
        "use_parallel_residual": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "classifier_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": bool(model_cfg.tie_embeddings),
        "use_cache": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _tokenizers():
    try:
        import tokenizers
        return tokenizers
    except ImportError:
        raise ConfigError("export needs the 'tokenizers' package: pip install 'p2ptrain[export]'") from None


def byte_tokenizer_json() -> str:
    """p2ptrain's ByteTokenizer as a `tokenizers` tokenizer.json (ids 0-255 = bytes, 256 = EOS)."""
    tk = _tokenizers()
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tk.decoders.ByteLevel()
    tok.add_special_tokens([tk.AddedToken(EOS_TOKEN, special=True, normalized=False)])
    if tok.token_to_id(EOS_TOKEN) != ByteTokenizer.eos_id:
        raise AssertionError("the end-of-document token must be id 256")
    return tok.to_str()


def hf_tokenizer_json(path: Path, eos_id: int) -> tuple[str, str]:
    """A run's own tokenizer.json, with an end-of-document token added where it has none."""
    tk = _tokenizers()
    tok = tk.Tokenizer.from_file(str(path))
    vocab = tok.get_vocab()
    eos = next((t for t in (EOS_TOKEN, "</s>", "<eos>") if t in vocab), None)
    if eos is None:
        eos = EOS_TOKEN
        tok.add_special_tokens([tk.AddedToken(EOS_TOKEN, special=True, normalized=False)])
    if tok.token_to_id(eos) != eos_id:
        raise ConfigError(f"{path}: its end-of-document token has id {tok.token_to_id(eos)}, the run uses {eos_id}")
    return tok.to_str(), eos


def write_tokenizer(out: Path, tokenizer_spec: str, eos_id: int, context: int) -> None:
    tokenizer = load_tokenizer(tokenizer_spec)
    if isinstance(tokenizer, ByteTokenizer):
        text, eos = byte_tokenizer_json(), EOS_TOKEN
    elif isinstance(tokenizer, HFTokenizer):
        text, eos = hf_tokenizer_json(Path(tokenizer_spec).expanduser(), eos_id)
    else:  # pragma: no cover
        raise ConfigError(f"cannot export tokenizer {tokenizer_spec!r}")
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos, "unk_token": None,
        "pad_token": None, "model_max_length": context, "clean_up_tokenization_spaces": False,
        "add_prefix_space": False}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos, "bos_token": eos}, indent=2))


def export_model(model: PathModel, run_state, out: Path, *, round: int, tokens: int,
                 heldout_loss: float | None = None, heldout_tokens: int = 0, checkpoint: str = "",
                 overwrite: bool = False) -> ExportInfo:
    """Write `model` (one path of the run) to `out` as a Hugging Face GPT-NeoX model."""
    cfg = run_state.config
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
        if not (out / "config.json").exists():
            raise UserError(f"--out {out} is not an earlier export (no config.json): refusing to overwrite it")
    tmp = out.with_name(f".{out.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    num_layers = cfg.grid.blocks_per_level * len(model.path)
    save_file(neox_state_dict(model, cfg.model.n_heads), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(neox_config(cfg.model, num_layers, tokenizer.vocab_size,
                                                            tokenizer.eos_id), indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({
        "bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id, "do_sample": False,
        "max_length": cfg.model.context}, indent=2))
    write_tokenizer(tmp, cfg.data.tokenizer, tokenizer.eos_id, cfg.model.context)
    info = ExportInfo(out, path_name(model.path), round, list(model.module_ids), tokens, heldout_loss, heldout_tokens)
    provenance = {"run_id": cfg.run.id, "run_fingerprint": run_state.fingerprint(), "path": list(model.path),
                  "modules": list(model.module_ids), "round": round, "tokens": tokens, "checkpoint": checkpoint,
                  "heldout_loss": heldout_loss, "heldout_tokens": heldout_tokens, "exported_at": time.time(),
                  "run_config": cfg.to_dict()}
    (tmp / "p2ptrain.json").write_text(json.dumps(provenance, indent=2))
    (tmp / "README.md").write_text(model_card(info, run_state, num_layers))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return info


def model_card(info: ExportInfo, run_state, num_layers: int) -> str:
    cfg = run_state.config
    loss = (f"{info.heldout_loss:.4f} nats/token ({info.heldout_loss / math.log(2):.3f} bits/token) on "
            f"{info.heldout_tokens:,} held-out tokens routed to this path"
            if info.heldout_loss is not None else "not measured (export ran with --no-eval or found no "
                                                   "held-out documents for this path)")
    router = run_state.router
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- p2ptrain
- dipaco
- gpt_neox
---

# p2ptrain run `{cfg.run.id}`, path {info.path}

One path of a DiPaCo grid trained peer to peer with p2ptrain: the shared stem plus one
module per level, exported as a plain GPT-NeoX model (no custom code).

| | |
|---|---|
| run id | `{cfg.run.id}` (fingerprint `{run_state.fingerprint()[:16]}`) |
| round | {info.round} |
| path | {info.path} of grid {list(cfg.grid.levels)} |
| modules | {", ".join(f"`{m}`" for m in info.modules)} |
| tokens trained (this node's checkpoint of the path) | {info.tokens:,} |
| held-out loss | {loss} |
| architecture | GPT-NeoX, {num_layers} layers, d_model {cfg.model.d_model}, {cfg.model.n_heads} heads, MLP x{cfg.model.mlp_ratio}, context {cfg.model.context} tokens, {"tied" if cfg.model.tie_embeddings else "untied"} embeddings |
| tokenizer | {"bytes: UTF-8 bytes are ids 0-255, `<|endoftext|>` is 256" if cfg.data.tokenizer == "bytes" else f"`{cfg.data.tokenizer}`"} |

## Router

The swarm trains each path on the documents its router sends to it. Documents are routed
by the first {router.prefix_chars} characters: hashed character {router.ngram}-grams
({router.centroids.shape[1]} buckets, log counts, L2-normalised) go to the nearest of
{router.num_paths} k-means centroids (with per-path offsets that balance tokens across
paths). This model is the expert for the documents routed to path {info.path}; for other
text, export the path `p2ptrain generate` picks for it.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{info.out.name}")
model = AutoModelForCausalLM.from_pretrained("{info.out.name}")
ids = tok("def fib(", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=64, do_sample=False)[0]))
```

Text beyond {cfg.model.context} tokens was never seen in training.
Provenance (full run config, checkpoint) is in `p2ptrain.json`.
"""
