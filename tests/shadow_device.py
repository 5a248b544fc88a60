"""A second device on a CPU-only machine, for tests: "every model and input sits on the accelerator".

On a CPU, `tensor.to(accelerator.device)` cannot be told from a tensor that was never moved, so a
stage that forgets to move a model or an input passes every CPU test and crashes on a GPU with
"Expected all tensors to be on the same device". `ShadowAccelerator` makes the difference visible:
the process's device becomes `cpu:0` (accelerate's, the Trainer's), a torch-function mode marks
every tensor placed there (by `.to(cpu:0)`, a factory call with `device=cpu:0`, or an op on marked
tensors) and reports `cpu:0` as its `.device`, and every op that mixes marked and unmarked tensors
is recorded, as CUDA would refuse it; so is every model op (linear, embedding, attention, ...) that
runs entirely on the host, which on a GPU machine is a model left behind on the CPU.
0-dim tensors and index tensors are exempt, as they are on CUDA.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

ACCELERATOR = torch.device("cpu", 0)
_DEVICE_GET, _GRAD_GET, _DATA_SET = torch.Tensor.device.__get__, torch.Tensor.grad.__get__, torch.Tensor.data.__set__
# copies between devices are legitimate; the others are torch's own bookkeeping inside Module.to
_TRANSFERS = {
    "to",
    "copy_",
    "cpu",
    "_has_compatible_shallow_copy_type",
    "__set__",
    "__get__",
    "tolist",
    "item",
    "numpy",
    "is_floating_point",
    "is_complex",
    "dim",
    "size",
    "numel",
    "__len__",
    "__repr__",
    "__format__",
}


# a model's forward: on the host when the process has an accelerator, it is a model left behind
# (weight arithmetic such as a LoRA merge, done on the host on purpose, is not among them)
_MODEL_OPS = {"linear", "embedding", "scaled_dot_product_attention", "conv1d", "conv2d"}


def _placed(t: torch.Tensor) -> bool:
    return getattr(t, "_on_accelerator", False)


def _target(flat) -> bool | None:
    """Where a call puts its result when it names a device: True (accelerator), False (host)."""
    for x in flat:
        if isinstance(x, (torch.device, str)):
            try:
                d = torch.device(x)
            except (RuntimeError, TypeError):
                continue
            if d.type == "cpu":
                return d.index == 0
    return None


class ShadowAccelerator(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.mixed = Counter()  # ops that mix accelerator and host tensors
        self.on_host = Counter()  # model ops that ran entirely on the host
        self.where: dict[str, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == _DEVICE_GET:
            real = func(*args)  # meta tensors (model initialisation) stay meta
            return ACCELERATOR if real.type == "cpu" and _placed(args[0]) else real
        flat = tree_flatten((args, kwargs))[0]
        tensors = all_tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        name = getattr(func, "__name__", str(func))
        if name == "__getitem__":  # CUDA accepts host index tensors: only the value matters
            tensors = tensors[:1]
        elif name == "__setitem__":
            tensors = [t for t in (args[0], args[2]) if isinstance(t, torch.Tensor)]
        sized = [_placed(t) for t in tensors if t.dim() > 0]
        if any(sized) and not all(sized) and name not in _TRANSFERS:
            self._record(self.mixed, name)
        elif sized and not any(sized) and name in _MODEL_OPS:
            self._record(self.on_host, name)
        out = func(*args, **kwargs)
        if name == "cpu" and out is args[0]:  # on a CPU, .cpu() returns the tensor itself; on CUDA a
            out = out.view_as(out)  # host copy: marking it must leave the original placed
        if func == _DATA_SET:  # Module.to replaces parameters' data
            args[0]._on_accelerator = _placed(args[1])
            return out
        if func == _GRAD_GET:  # autograd makes gradients on the parameter's device
            placed = _placed(args[0])
        elif name == "cpu":
            placed = False
        else:
            target = _target(flat)
            placed = target if target is not None else any(_placed(t) for t in all_tensors)
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor):
                try:
                    o._on_accelerator = placed
                except (AttributeError, RuntimeError):
                    pass
        return out

    def _record(self, counter: Counter, name: str) -> None:
        counter[name] += 1
        if name not in self.where:  # the project's own frames: which stage line did it
            ours = [
                f
                for f in traceback.extract_stack()
                if f"{os.sep}pipeline{os.sep}" in f.filename or f"{os.sep}stages{os.sep}" in f.filename
            ]
            self.where[name] = "".join(traceback.format_list(ours[-3:]))

    def report(self) -> str:
        return "\n".join(
            f"{kind} {name} x{n}, first at:\n{self.where[name]}"
            for kind, counter in (("mixed devices:", self.mixed), ("on the host:", self.on_host))
            for name, n in counter.most_common()
        )
