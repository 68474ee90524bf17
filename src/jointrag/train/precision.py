"""Mixed precision with master weights: the model holds bf16 weights, the optimiser fp32 copies.

Under bf16 autocast the CPU casts every fp32 weight to bf16 at each use, forward and backward, and
keeps the residual stream and the norms in fp32. A model whose weights are held in bf16
(`runtime.weight_dtype`) skips those casts and keeps half the activation bytes. An optimiser that
stepped the bf16 weights themselves would lose every update smaller than half a bf16 step (2^-9 of the
weight: a learning rate of 5e-5 times Adam's unit-sized step is below it for any weight above 0.03),
so the optimiser owns fp32 master copies instead: each gradient moves to its master as fp32 the moment
backward has formed it (a post-accumulate-grad hook: the bf16 gradients never all exist at once, and
micro-batches accumulate in fp32), the optimiser steps the masters, and the model's weights are set
from them, rounded to bf16. Checkpoints hold the masters, so a resumed run continues from the fp32 values.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch


class MasterWeights:
    """fp32 masters of the low-precision parameters among `parameters`; an fp32 parameter is its own master."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter]):
        self.pairs = [(p, p if p.dtype == torch.float32 else p.detach().float().requires_grad_()) for p in parameters]
        self._masters = {id(p): m for p, m in self.pairs}
        for parameter, master in self.pairs:
            if master is not parameter:
                parameter.register_post_accumulate_grad_hook(self._move)

    def master(self, parameter: torch.nn.Parameter) -> torch.Tensor:
        # an fp32 parameter is its own master (FSDP may hand out new parameter objects for the same weights)
        return parameter if parameter.dtype == torch.float32 else self._masters[id(parameter)]

    @property
    def masters(self) -> list[torch.Tensor]:
        return [m for _, m in self.pairs]

    def _move(self, parameter: torch.nn.Parameter) -> None:
        """Add `parameter`'s gradient to its master's, as fp32, and free it."""
        master = self._masters[id(parameter)]
        master.grad = parameter.grad.float() if master.grad is None else master.grad.add_(parameter.grad)
        parameter.grad = None

    def gradients_to_masters(self) -> None:
        """Move the low-precision gradients that the hooks have not (set outside backward) to the masters."""
        for parameter, master in self.pairs:
            if master is not parameter and parameter.grad is not None:
                self._move(parameter)

    @torch.no_grad()
    def masters_to_model(self) -> None:
        """Set the model's low-precision weights from the stepped masters."""
        for parameter, master in self.pairs:
            if master is not parameter:
                parameter.copy_(master)

    @torch.no_grad()
    def load(self, named: Mapping[str, torch.nn.Parameter], weights: Mapping[str, torch.Tensor]) -> None:
        """Set the low-precision parameters' masters (and through them the model) from full-precision
        `weights` by parameter name; fp32 parameters are their own masters, loaded with the model."""
        for name, value in weights.items():
            if name in named and named[name].dtype != torch.float32:
                self.master(named[name]).copy_(value)
        self.masters_to_model()
