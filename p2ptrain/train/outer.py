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


def fragment_bounds(numel: int, fragments: int, round_: int) -> tuple[int, int]:
    """[start, end) of the values averaged in `round_` when a module's parameters, laid end
    to end, are cut into `fragments` slices of ⌈numel / fragments⌉ values (the last one
    shorter) that take turns: round r averages slice r mod fragments, the same on every
    holder, so a joiner falls in step at once."""
    size = -(-numel // fragments)
    start = min((round_ % fragments) * size, numel)
    return start, min(start + size, numel)


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

    def pseudo_gradient_flat(self, local: dict[str, torch.Tensor]) -> torch.Tensor:
        """Δ = global − local as one flat tensor (the parameters laid end to end)."""
        flat = torch.empty(sum(p.numel() for p in self.global_params))
        self.pseudo_gradient_into(local, [v.view_as(p) for v, p in
                                          zip(flat.split([p.numel() for p in self.global_params]),
                                              self.global_params)])
        return flat

    def apply(self, mean_delta: list[torch.Tensor], scale: float = 1.0) -> None:
        """One outer Nesterov step with the averaged pseudo-gradient (times scale)."""
        lr, mu = self.cfg.lr, self.cfg.momentum
        for p, m, d in zip(self.global_params, self.momentum, mean_delta):
            d = d * scale if scale != 1.0 else d
            m.mul_(mu).add_(d)
            step = d.add(m, alpha=mu) if self.cfg.nesterov else m
            p.sub_(step, alpha=lr)

    def apply_fragment(self, mean_flat: torch.Tensor, start: int, scale: float = 1.0) -> None:
        """The outer step on one fragment only: values [start, start + len(mean_flat)) of the
        module's parameters laid end to end (in `names` order). Nesterov momentum is
        elementwise, so stepping fragments in turn is Streaming DiLoCo's per-fragment outer
        optimizer; values outside the fragment, and their momentum, do not change."""
        end = start + mean_flat.numel()
        offset = 0
        for p, m in zip(self.global_params, self.momentum):
            lo, hi = max(start, offset), min(end, offset + p.numel())
            if lo < hi:
                d = mean_flat[lo - start:hi - start]
                d = d * scale if scale != 1.0 else d
                p_flat, m_flat = p.view(-1)[lo - offset:hi - offset], m.view(-1)[lo - offset:hi - offset]
                m_flat.mul_(self.cfg.momentum).add_(d)
                step = d.add(m_flat, alpha=self.cfg.momentum) if self.cfg.nesterov else m_flat
                p_flat.sub_(step, alpha=self.cfg.lr)
            offset += p.numel()

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
