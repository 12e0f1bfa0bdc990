"""Run configuration shared by the whole swarm, loaded from TOML and validated.

A `RunConfig` is composed of one small dataclass per component (model, grid, router,
inner and outer optimizer, averaging). Every field documents itself through
`field(metadata=...)`: a help text, its unit, and the allowed range or choices, so a
bad file gets one line that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from p2ptrain.errors import ConfigError

PRESETS = ("default", "gpu")


def _f(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
       choices: tuple | None = None, unit: str = "") -> Any:
    """A documented config field with its allowed range."""
    meta = dict(help=help, lo=lo, hi=hi, choices=choices, unit=unit)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunSection:
    id: str = _f("p2ptrain-default", "Run id: names the swarm's DHT keys; peers with another id never meet")
    seed: int = _f(0, "Seed for initialisation, router fitting and data order", lo=0)


@dataclass
class ModelConfig:
    d_model: int = _f(128, "Width of the residual stream", lo=16, hi=16384)
    n_heads: int = _f(4, "Attention heads per block (must divide d_model)", lo=1, hi=256)
    context: int = _f(128, "Tokens per training sequence", unit="tokens", lo=8, hi=65536)
    mlp_ratio: int = _f(4, "Hidden width of the MLP as a multiple of d_model", lo=1, hi=16)
    dropout: float = _f(0.0, "Dropout probability inside blocks", lo=0.0, hi=0.9)
    tie_embeddings: bool = _f(True, "Share the token embedding with the output head")


@dataclass
class GridConfig:
    levels: list = _f([2, 2], "Modules per level; a path picks one per level, so paths = product(levels)")
    blocks_per_level: int = _f(2, "Transformer blocks inside each module", lo=1, hi=128)
    stem: str = _f("shared", "The stem (embeddings, final norm, head): shared by all paths, or one per path",
                   choices=("shared", "per_path"))


@dataclass
class DataConfig:
    tokenizer: str = _f("bytes", "'bytes' (byte-level, 257 tokens) or the path of a Hugging Face tokenizer.json")
    heldout_percent: float = _f(5.0, "Share of documents held out for evaluation", unit="%", lo=0.0, hi=50.0)
    max_doc_chars: int = _f(4096, "Documents longer than this are split at line boundaries", unit="chars",
                            lo=256, hi=10_000_000)


@dataclass
class RouterConfig:
    prefix_chars: int = _f(512, "Characters from the start of a document used for routing", unit="chars",
                           lo=16, hi=100_000)
    ngram: int = _f(3, "Character n-gram length of the hashed features", lo=1, hi=8)
    features: int = _f(512, "Hashed feature buckets", lo=16, hi=65536)
    kmeans_iters: int = _f(25, "Lloyd iterations when fitting the router", lo=1, hi=1000)
    sample_docs: int = _f(4000, "Documents sampled to fit the router", lo=8, hi=10_000_000)


@dataclass
class InnerConfig:
    optimizer: str = _f("adamw8bit", "Inner optimizer: bitsandbytes 8-bit AdamW, or 32-bit AdamW",
                        choices=("adamw8bit", "adamw"))
    lr: float = _f(3e-3, "Peak inner learning rate", lo=0.0, hi=10.0)
    warmup_steps: int = _f(20, "Linear warm-up steps", unit="steps", lo=0)
    min_lr_ratio: float = _f(0.1, "Cosine schedule floor as a fraction of lr", lo=0.0, hi=1.0)
    weight_decay: float = _f(0.1, "AdamW weight decay", lo=0.0, hi=10.0)
    betas: list = _f([0.9, 0.95], "AdamW betas")
    grad_clip: float = _f(1.0, "Global gradient-norm clip (0 disables)", lo=0.0)
    batch_size: int = _f(16, "Sequences per inner step", unit="sequences", lo=1, hi=65536)
    steps_per_round: int = _f(50, "Inner steps H between outer steps", unit="steps", lo=1, hi=1_000_000)
    total_rounds: int = _f(40, "Rounds the cosine schedule spans", unit="rounds", lo=1, hi=10_000_000)


@dataclass
class OuterConfig:
    lr: float = _f(0.7, "Outer SGD learning rate (DiLoCo: 0.7)", lo=0.0, hi=10.0)
    momentum: float = _f(0.9, "Outer Nesterov momentum (DiLoCo: 0.9)", lo=0.0, hi=0.999)
    nesterov: bool = _f(True, "Use Nesterov momentum in the outer step")
    rescale_by_sharing: bool = _f(False, "DiPaCo: divide a module's outer gradient by the number of paths sharing it")


@dataclass
class AveragingConfig:
    compression: str = _f("fp16", "Wire codec for pseudo-gradients", choices=("none", "fp16", "8bit", "4bit"))
    matchmaking_time: float = _f(5.0, "Seconds a node waits to gather peers for a module's all-reduce",
                                 unit="s", lo=0.5, hi=600.0)
    averaging_timeout: float = _f(60.0, "Seconds before a round's all-reduce is abandoned", unit="s",
                                  lo=1.0, hi=3600.0)
    target_group_size: int = _f(64, "Most peers in one all-reduce group", lo=2, hi=4096)
    staged: bool = _f(True, "A module with more live holders than target_group_size averages in two stages "
                            "(Moshpit SGD): ⌈√n⌉ groups, then one member of each group per "
                            "second-stage group, weighted by its group's tokens, so every holder ends with the "
                            "same mean; false: holders beyond target_group_size average in separate groups "
                            "that drift apart (each stage-2 weight is a group's total, which only its group "
                            "could check)")
    stage_wait: float = _f(0.2, "With overlap: how long a staged module's second stage waits for the holders "
                                "still busy with their first stage, as a fraction of round_seconds (at least "
                                "one matchmaking_time): a first-stage group slowed by a slow link or a member "
                                "that vanished still meets the others instead of averaging alone and "
                                "re-syncing; a full group never waits. Plain averaging waits one "
                                "matchmaking_time (the wait would stall training)", lo=0.0, hi=1.0)
    peer_buckets: int = _f(1, "Split the peer table into this many buckets: each round a node reads one bucket, "
                              "a random sample of about peers / peer_buckets records, instead of every live "
                              "peer's record; about peers / 64 for swarms past a few hundred peers (1: one "
                              "table, read whole)", lo=1, hi=256)
    round_seconds: float = _f(30.0, "Wall-clock length of a round on the swarm's shared schedule (DHT time): "
                                    "every node ends its inner steps at the same moments, so peers that join at "
                                    "any time average together", unit="s", lo=1.0, hi=86400.0)
    fill_round: bool = _f(True, "Train until the round's end, up to 4 × inner.steps_per_round steps (the "
                                "average weighs tokens, and the lr schedule follows rounds of "
                                "inner.steps_per_round nominal steps); false: stop after inner.steps_per_round "
                                "steps and wait for the round's end, so a fast machine idles")
    overlap: bool = _f(False, "Average in the background during the next inner steps; apply one round late")
    fragments: int = _f(1, "Average one of this many equal slices of each module per round, the slices in "
                           "turn (Streaming DiLoCo): a round moves 1/fragments of the bytes, and each value "
                           "is averaged every `fragments` rounds from the progress made since its last "
                           "average (1: the whole module every round)", lo=1, hi=16)
    sync_tolerance: float = _f(0.0, "Relative fingerprint difference above which peers re-sync a module "
                                    "(0: the wire codec's own bound)", lo=0.0, hi=1.0)
    aggregation: str = _f("centered_clip", "How each reducer combines its slice of the group's pseudo-gradients: "
                                           "hivemind's token-weighted mean, or a Byzantine-robust rule that bounds "
                                           "what one sender can do (CenteredClip from the median, or a "
                                           "coordinate-wise trimmed mean); weights (tokens) count in all three",
                          choices=("mean", "centered_clip", "trimmed_mean"))
    clip_radius: float = _f(0.0, "CenteredClip's τ: the most one sender can pull a slice, in L2 norm of the "
                                 "pseudo-gradient (0: auto, twice the median distance of the slice's parts to "
                                 "their coordinate-wise median)", lo=0.0, hi=1e6)
    reducer_check: float = _f(4.0, "A robust rule's reducer must return a slice within this many times the "
                                   "norm of a peer's own part of it (the peer's whole-vector RMS as a floor): "
                                   "further, the peer keeps its own values and reports the reducer, banning it if the "
                                   "slice was more than 4× past the bound or at the third refusal "
                                   "(0: no check; the mean rule is never checked)", lo=0.0, hi=1e6)
    ban_seconds: float = _f(600.0, "How long a peer whose parts were refused, or whose reduced slice was "
                                   "rejected, is refused in this node's matchmaking", unit="s", lo=0.0, hi=1e7)


@dataclass
class RunConfig:
    """Everything every peer of one swarm must agree on."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    data: DataConfig = field(default_factory=DataConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    averaging: AveragingConfig = field(default_factory=AveragingConfig)

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "<config>") -> "RunConfig":
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: expected a table of sections")
        sections = {}
        known = {f.name: f for f in dataclasses.fields(cls)}
        for name, value in raw.items():
            if name not in known:
                raise ConfigError(f"{source}: unknown section [{name}]; allowed: {', '.join(known)}")
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: [{name}] must be a table")
            sections[name] = _build_section(known[name].default_factory, value, f"{source}: {name}")
        config = cls(**sections)
        config.validate(source)
        return config

    @classmethod
    def from_toml_text(cls, text: str, source: str = "<config>") -> "RunConfig":
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: not valid TOML ({e})") from None
        return cls.from_dict(raw, source)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "RunConfig":
        """Load a TOML file, or a packaged preset by name ('default', 'gpu'); None means 'default'."""
        if path is None or str(path) in PRESETS:
            name = str(path or "default")
            text = resources.files("p2ptrain.presets").joinpath(f"{name}.toml").read_text()
            return cls.from_toml_text(text, f"preset '{name}'")
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read run config {path}: {e.strerror}") from None
        return cls.from_toml_text(text, str(path))

    def validate(self, source: str = "<config>") -> None:
        """Cross-field checks that a single range cannot express."""
        levels = self.grid.levels
        if not levels or not all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 64 for k in levels):
            raise ConfigError(f"{source}: grid.levels must be a non-empty list of integers in [1, 64], got {levels}")
        if self.model.d_model % self.model.n_heads:
            raise ConfigError(f"{source}: model.d_model ({self.model.d_model}) must be divisible by "
                              f"model.n_heads ({self.model.n_heads})")
        if (self.model.d_model // self.model.n_heads) % 2:
            raise ConfigError(f"{source}: model.d_model / model.n_heads must be even (rotary embeddings)")
        betas = self.inner.betas
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"{source}: inner.betas must be two numbers in [0, 1), got {betas}")
        if (any(c in self.run.id for c in ".@") or not self.run.id or len(self.run.id) > 64
                or not self.run.id.isprintable()):
            raise ConfigError(f"{source}: run.id must be 1-64 printable characters without '.' or '@', "
                              f"got {self.run.id!r}")

    # ---------------------------------------------------------------- output

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON form: peers compare it before training together."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _build_section(factory, values: Mapping[str, Any], where: str):
    template = factory()
    fields = {f.name: f for f in dataclasses.fields(template)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{where}.{key}: unknown key; allowed: {', '.join(fields)}")
        kwargs[key] = _check_value(f"{where}.{key}", fields[key], value, getattr(template, key))
    return type(template)(**kwargs)


def _check_value(where: str, f: dataclasses.Field, value: Any, default: Any) -> Any:
    meta = f.metadata
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not expected:
        raise ConfigError(f"{where}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, meta['choices']))}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            allowed = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ConfigError(f"{where}: {value} is out of range; allowed {allowed}")
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def describe_fields() -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, used by `p2ptrain config --explain`."""
    rows = []
    for section in dataclasses.fields(RunConfig):
        template = section.default_factory()
        for f in dataclasses.fields(template):
            meta = f.metadata
            bounds = ""
            if meta.get("choices"):
                bounds = " (one of " + ", ".join(map(str, meta["choices"])) + ")"
            elif meta.get("lo") is not None or meta.get("hi") is not None:
                bounds = f" [{meta.get('lo', '')}, {meta.get('hi') if meta.get('hi') is not None else ''}]"
            unit = f" {meta['unit']}" if meta.get("unit") else ""
            rows.append((f"{section.name}.{f.name}", _toml_value(getattr(template, f.name)),
                         f"{meta['help']}{unit}{bounds}"))
    return rows
