"""``max_grad_norm``: the step's gradients scaled down so that their global L2 norm is at most
the limit, as ``torch.nn.utils.clip_grad_norm_`` (what sd-scripts calls through accelerate).

A LoRA has hundreds of small gradients (SD1.5's rank-4 LoRA: 528, two thirds of them under
4096 elements). On a GPU torch's multi-tensor kernels handle them at once, and clipping is
torch's own call. On a CPU each tensor is its own kernel whose dispatch costs more than its
arithmetic, so the small gradients are gathered into one buffer and take one norm; large ones
keep their own.
"""

from __future__ import annotations

import torch
from torch._utils import _flatten_dense_tensors

# Gradients up to this many elements share one norm on a CPU: below it, a separate kernel's
# dispatch costs more than copying the elements; above it, the copy costs more.
GATHERED_MAX_ELEMENTS = 4096


class GradientClipper:
    """Clips the gradients of ``params`` (a run's trainable parameters) to ``max_norm``.

    What the parameters are (devices, dtypes, sizes) is read once: it does not change during a
    run, and reading it every step cost as much as the norms. Parameters without a gradient
    in a step are left out, as torch leaves them out.
    """

    def __init__(self, params: list[torch.nn.Parameter], max_norm: float) -> None:
        self.params, self.max_norm = params, max_norm
        kinds = {(param.device, param.dtype) for param in params}
        self._on_one_cpu_dtype = len(kinds) == 1 and next(iter(kinds))[0].type == "cpu"
        self._gathered = [param for param in params if param.numel() <= GATHERED_MAX_ELEMENTS]
        self._separate = [param for param in params if param.numel() > GATHERED_MAX_ELEMENTS]

    def __call__(self) -> None:
        if not self._on_one_cpu_dtype:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
            return
        gathered = [grad for param in self._gathered if (grad := param.grad) is not None]
        separate = [grad for param in self._separate if (grad := param.grad) is not None]
        norms = list(torch._foreach_norm(separate)) if separate else []
        if gathered:
            norms.append(torch.linalg.vector_norm(_flatten_dense_tensors(gathered)))
        if not norms:
            return
        total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
        # torch's factor, max_norm / (total + 1e-6) capped at 1, worked out in Python: on a CPU
        # reading the total costs nothing, and three tensor operations cost more than the norms.
        coefficient = self.max_norm / (total.item() + 1e-6)
        if coefficient >= 1.0:
            return
        torch._foreach_mul_(gathered + separate, coefficient)
