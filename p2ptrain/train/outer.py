"""The DiLoCo outer step for one module: pseudo-gradient and Nesterov SGD.

Each module keeps a *global* copy of its parameters (CPU, fp32) — the state the swarm
agreed on at the end of the last round — and an outer momentum buffer. After H inner
steps the pseudo-gradient is Δ = θ_global − θ_local; the swarm averages Δ among the
module's peers; then, exactly like torch.optim.SGD(nesterov=True):

    m ← μ·m + Δ̄          θ_global ← θ_global − η·(Δ̄ + μ·m)
"""

from __future__ import annotations

import torch

from p2ptrain.config import OuterConfig


class ModuleOuterState:
    """Global parameters and outer momentum of one module, as contiguous CPU fp32 tensors."""

    def __init__(self, module_id: str, params: dict[str, torch.Tensor], cfg: OuterConfig):
        self.module_id = module_id
        self.cfg = cfg
        self.names = list(params)
        self.global_params = [params[n].detach().to("cpu", torch.float32).contiguous().clone() for n in self.names]
        self.momentum = [torch.zeros_like(p) for p in self.global_params]

    def pseudo_gradient_into(self, local: dict[str, torch.Tensor], out: list[torch.Tensor]) -> None:
        """Write Δ = global − local into the (shared-memory) buffers `out`."""
        for buf, g, name in zip(out, self.global_params, self.names):
            buf.copy_(g)
            buf.sub_(local[name].detach().to("cpu", torch.float32))

    def apply(self, mean_delta: list[torch.Tensor], scale: float = 1.0) -> None:
        """One outer Nesterov step with the averaged pseudo-gradient (times scale)."""
        lr, mu = self.cfg.lr, self.cfg.momentum
        for p, m, d in zip(self.global_params, self.momentum, mean_delta):
            d = d * scale if scale != 1.0 else d
            m.mul_(mu).add_(d)
            step = d.add(m, alpha=mu) if self.cfg.nesterov else m
            p.sub_(step, alpha=lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Global params and momentum, for checkpoints and for peers downloading state."""
        out = {f"global.{n}": p for n, p in zip(self.names, self.global_params)}
        out.update({f"momentum.{n}": m for n, m in zip(self.names, self.momentum)})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, n in enumerate(self.names):
            self.global_params[i].copy_(state[f"global.{n}"])
            self.momentum[i].copy_(state[f"momentum.{n}"])

    def global_state(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.global_params))
