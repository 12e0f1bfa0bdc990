"""Sample text from one path: route the prompt like a document (or take a given path), then
draw tokens with temperature, top-k and top-p until the end-of-document token or the
token budget.

A prompt is conditioned as the start of a document: training saw every document right
after the previous one's end-of-document token, so that token goes first. The model sees
at most `context` tokens (older ones slide out of the window), as in training.
Temperature 0 is greedy decoding. The same sampler drives p2ptrain's own path model and an
exported Hugging Face model, so one seed gives one text from either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from p2ptrain.errors import CheckpointError, UserError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (1, t) token ids -> (1, t, vocab) logits


@dataclass
class Sampling:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None

    def check(self) -> None:
        if self.temperature < 0:
            raise UserError(f"--temperature {self.temperature}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k}: must be >= 0 (0 is off)")
        if self.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be at least 1")


def next_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    """One token from a (vocab,) row of logits."""
    logits = logits.float()
    if s.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.numel():
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs >= s.top_p  # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def sample(logits_fn: LogitsFn, prompt_ids: Sequence[int], eos_id: int, context: int, s: Sampling) -> tuple[list[int], bool]:
    """(new token ids, whether the end-of-document token stopped it). prompt_ids should start
    with the end-of-document token (see document_prompt)."""
    s.check()
    generator = torch.Generator().manual_seed(s.seed if s.seed is not None else torch.seed() & 0xFFFF_FFFF)
    ids = list(prompt_ids)
    new: list[int] = []
    for _ in range(s.max_new_tokens):
        window = torch.tensor(ids[-context:], dtype=torch.long)[None]
        token = next_token(logits_fn(window)[0, -1], s, generator)
        if token == eos_id:
            return new, True
        ids.append(token)
        new.append(token)
    return new, False


def document_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt as the start of a document: end-of-document token, then its tokens."""
    return [tokenizer.eos_id, *(int(t) for t in tokenizer.encode(prompt))]


def route_prompt(run_state, prompt: str) -> tuple[int, ...]:
    """The path the run's router sends the prompt to, as it would a document."""
    return run_state.grid.paths()[int(run_state.router.route([prompt])[0])]


def path_model_from_checkpoint(run_state, homes: Sequence[Path], path, device: torch.device):
    """(model, checkpoint) of the newest verified checkpoint of `path` in any of `homes`."""
    from p2ptrain.model.grid import path_name
    from p2ptrain.train.evaluate import find_path_state
    from p2ptrain.train.session import build_model
    ckpt = find_path_state(run_state, homes, path)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint of path {path_name(path)} of run {run_state.config.run.id} in "
                              f"{', '.join(map(str, homes))}: train it first (p2ptrain train --path "
                              f"{path_name(path)}, or join a swarm), pass --checkpoints-from HOME, or pick a "
                              "trained --path")
    model = build_model(run_state, path)
    for module_id in model.module_ids:
        model.load_module_state(module_id, ckpt.groups[module_id])
    return model.to(device).eval(), ckpt


def path_model_logits(model) -> LogitsFn:
    device = next(model.parameters()).device
    return lambda ids: model(ids.to(device))[0].float().cpu()


def hf_model_logits(directory: Path) -> tuple[LogitsFn, object, dict]:
    """(logits function, tokenizer, provenance) of an exported model directory."""
    import json
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise UserError("--model needs the 'transformers' package: pip install 'p2ptrain[export]'") from None
    directory = Path(directory).expanduser()
    if not (directory / "config.json").is_file():
        raise UserError(f"--model {directory}: not an exported model (no config.json); see p2ptrain export")
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    provenance = json.loads((directory / "p2ptrain.json").read_text()) if (directory / "p2ptrain.json").exists() else {}
    return (lambda ids: model(ids).logits.float()), tokenizer, provenance
