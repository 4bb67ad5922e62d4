"""Adan, an EMA of parameters, and their state as plain tensors (for checkpoints).

Both follow what Portrait3D's optimisation stages ran (``pipeline.md`` §5.7, §6c):

- **Adan** (Xie et al. 2022) as in the optimiser file of stable-dreamfusion-3DPortrait: one *global* gradient-norm
  clip over every group, applied to ``p.grad`` **in place**; at a group's first step ``neg_pre_grad`` starts at
  −(clipped grad), so ``exp_avg_diff`` is 0 after step 1; bias-corrected moments; proximal weight decay
  ``p ← (p − update) / (1 + lr·wd)``. Portrait3D: betas (0.98, 0.92, 0.99), eps 1e-8, wd 2e-5, clip 5.
- **EMA** with torch-ema 0.3's ``use_num_updates`` rule: update ``n`` uses decay ``min(decay, (1 + n) / (10 + n))``
  and ``shadow ← shadow − (1 − decay)·(shadow − param)``.

Written here rather than taken from a package: the registry's Adan implementations differ in exactly the details
above (clip scope, in-place clip, ``neg_pre_grad`` start, proximal decay) and we need the state as plain tensors.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from .errors import Portrait3DError


class NonFiniteGradientError(Portrait3DError, FloatingPointError):
    """The gradient norm is NaN or inf (the optimisation diverged); parameters were left untouched."""


class Adan(torch.optim.Optimizer):
    """Adan with Portrait3D's semantics (see the module docstring).

    ``max_grad_norm`` ≤ 0 disables clipping. With ``error_if_nonfinite`` a NaN/inf global gradient norm raises
    ``NonFiniteGradientError`` before anything is modified (the official optimiser would propagate the NaN).
    ``step()`` returns the global gradient norm before clipping (a 0-d float32 tensor).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.98, 0.92, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, max_grad_norm: float = 0.0, no_prox: bool = False,
                 error_if_nonfinite: bool = False):
        if not 0.0 <= max_grad_norm:
            raise ValueError(f"max_grad_norm must be >= 0, got {max_grad_norm}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 3:
            raise ValueError(f"Adan needs three betas in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                        no_prox=no_prox)
        super().__init__(params, defaults)
        self.error_if_nonfinite = error_if_nonfinite

    @torch.no_grad()
    def global_grad_norm(self) -> torch.Tensor:
        """‖g‖₂ over every parameter of every group, accumulated in float32 (as the official code)."""
        device = self.param_groups[0]["params"][0].device
        total = torch.zeros(1, device=device)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    total.add_(p.grad.pow(2).sum())
        return torch.sqrt(total)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        norm = self.global_grad_norm()
        if self.error_if_nonfinite and not bool(torch.isfinite(norm).all()):
            raise NonFiniteGradientError(f"the gradient norm is {float(norm):g}: the optimisation diverged")
        max_norm = self.defaults["max_grad_norm"]
        if max_norm > 0:
            # official: clamp(max_norm / (norm + eps_of_the_last_group), max=1), a 1-element float32 tensor
            eps = self.param_groups[-1]["eps"]
            clip = torch.clamp(torch.tensor(max_norm, device=norm.device) / (norm + eps), max=1.0)
        else:
            clip = torch.ones_like(norm)

        for group in self.param_groups:
            beta1, beta2, beta3 = group["betas"]
            group["step"] = group.get("step", 0) + 1
            step = group["step"]
            bias1 = 1.0 - beta1 ** step
            bias2 = 1.0 - beta2 ** step
            bias3_sqrt = math.sqrt(1.0 - beta3 ** step)
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["exp_avg_diff"] = torch.zeros_like(p)
                if "neg_pre_grad" not in state or step == 1:
                    state["neg_pre_grad"] = p.grad.clone().mul_(-clip)
                grad = p.grad
                m, n, d, diff = state["exp_avg"], state["exp_avg_sq"], state["exp_avg_diff"], state["neg_pre_grad"]
                grad.mul_(clip)                                   # in place: callers see the clipped gradient
                diff.add_(grad)                                   # g_k − g_{k−1}
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                d.mul_(beta2).add_(diff, alpha=1 - beta2)
                diff.mul_(beta2).add_(grad)                       # g_k + β2·(g_k − g_{k−1})
                n.mul_(beta3).addcmul_(diff, diff, value=1 - beta3)
                denom = (n.sqrt() / bias3_sqrt).add_(eps)
                if group["no_prox"]:
                    p.mul_(1 - lr * wd)
                    p.addcdiv_(m, denom, value=-lr / bias1)
                    p.addcdiv_(d, denom, value=-lr * beta2 / bias2)
                else:
                    p.addcdiv_(m, denom, value=-lr / bias1)
                    p.addcdiv_(d, denom, value=-lr * beta2 / bias2)
                    p.div_(1 + lr * wd)
                diff.zero_().add_(grad, alpha=-1.0)               # −g_k for the next step
        return norm.reshape(())


ADAN_STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad")


def adan_state_tensors(optimizer: Adan, names: Sequence[str]) -> dict:
    """Optimiser state as ``{"adan.<key>.<name>": tensor, "adan.step.<name>": int64 tensor}``.

    ``names`` name the parameters in ``param_groups`` order (one parameter per group, as in Portrait3D).
    """
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    if len(index) != len(names):
        raise ValueError(f"{len(names)} names for {len(index)} parameters")
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[index[id(p)]]
            out[f"adan.step.{name}"] = torch.tensor(group.get("step", 0), dtype=torch.int64)
            for key in ADAN_STATE_KEYS:
                if key in optimizer.state[p]:
                    out[f"adan.{key}.{name}"] = optimizer.state[p][key].detach().clone()
    return out


def load_adan_state_tensors(optimizer: Adan, names: Sequence[str], tensors: dict) -> None:
    """Inverse of ``adan_state_tensors`` (tensors are copied onto each parameter's device and dtype)."""
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[index[id(p)]]
            step = int(tensors[f"adan.step.{name}"])
            if step:
                group["step"] = step
            else:
                group.pop("step", None)
            state = optimizer.state[p]
            state.clear()
            for key in ADAN_STATE_KEYS:
                value = tensors.get(f"adan.{key}.{name}")
                if value is not None:
                    if value.shape != p.shape:
                        raise ValueError(f"optimiser state '{key}' of {name} has shape {tuple(value.shape)}, the "
                                         f"parameter {tuple(p.shape)}")
                    state[key] = value.to(device=p.device, dtype=p.dtype).clone()


class EMA:
    """Exponential moving average of parameters with torch-ema's ``use_num_updates`` rule.

    ``shadow`` starts as a copy of the parameters; ``update()`` blends the current values in.
    """

    def __init__(self, parameters: Iterable[torch.Tensor], decay: float = 0.95, use_num_updates: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.parameters = list(parameters)
        self.decay = decay
        self.num_updates = 0 if use_num_updates else None
        self.shadow = [p.detach().clone() for p in self.parameters]

    def current_decay(self) -> float:
        """Decay the next ``update()`` will use."""
        if self.num_updates is None:
            return self.decay
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        if self.num_updates is not None:
            self.num_updates += 1
        one_minus = 1.0 - decay
        for s, p in zip(self.shadow, self.parameters):
            s.sub_((s - p).mul_(one_minus))

    def state_tensors(self, names: Sequence[str]) -> dict:
        out = {f"ema.shadow.{n}": s.detach().clone() for n, s in zip(names, self.shadow)}
        out["ema.num_updates"] = torch.tensor(-1 if self.num_updates is None else self.num_updates, dtype=torch.int64)
        return out

    def load_state_tensors(self, names: Sequence[str], tensors: dict) -> None:
        for i, name in enumerate(names):
            value = tensors[f"ema.shadow.{name}"]
            if value.shape != self.shadow[i].shape:
                raise ValueError(f"EMA shadow of {name} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(self.shadow[i].shape)}")
            self.shadow[i] = value.to(device=self.shadow[i].device, dtype=self.shadow[i].dtype).clone()
        n = int(tensors["ema.num_updates"])
        self.num_updates = None if n < 0 else n


def generator_state(generator: torch.Generator) -> torch.Tensor:
    """A ``torch.Generator``'s state as a uint8 CPU tensor (CPU and CUDA generators alike)."""
    return generator.get_state().detach().cpu().clone()


def set_generator_state(generator: torch.Generator, state: torch.Tensor) -> None:
    generator.set_state(state.to(torch.uint8).cpu())
