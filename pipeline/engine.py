"""Everything that depends on the distributed engine, in one place, for every stage.

The engine comes from the accelerate config the run was launched with (`make X ACCELERATE_CONFIG=
accelerate_configs/zero3.yaml`): one process, data parallel (DDP), DeepSpeed ZeRO-2 / ZeRO-3, or
FSDP2. The stages never ask which; they call these functions, which do the right thing for each:

    accelerator(...)            the process group with an explicit timeout, the recipe's precision
    configure(...)              DeepSpeed's own batch sizes and gradient clipping (no dataloader tells it)
    prepare_frozen(model, ...)  a frozen reference / reward model placed or sharded like the policy
    for_generation(model, ...)  the policy alone gathered, once per rollout, not once per token
    single_process_loading()    loading on rank 0 alone (adapter merges), also under ZeRO-3
    full_state_dict(...)        the trained model in full for the artifact, float32 also under DeepSpeed
    save_trainer_model(...)     the same for a Trainer (its checkpoints stay sharded)

SFT and RM run inside their Trainers, which do the same through accelerate.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from pipeline.errors import ConfigError

# How long a rank waits in a collective (a barrier while rank 0 merges an adapter or writes the
# artifact, a gather) before the run fails instead of hanging. torch's default is 10 min for NCCL;
# rank-0-only work on a 7B model (loading it in float32 on the host, merging, saving 15 GB) stays
# well under this. PROCESS_GROUP_TIMEOUT_MIN overrides it.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=float(os.environ.get("PROCESS_GROUP_TIMEOUT_MIN", 30)))


def accelerator(mixed_precision: str, gradient_accumulation_steps: int = 1, **kwargs) -> Accelerator:
    """The run's Accelerator: gloo on CPUs, the recipe's precision (the launcher's `--mixed_precision`
    is not used). The process group, with its timeout, already exists (pipeline.dist.process_state)."""
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        **kwargs,
    )


def name(acc: Accelerator) -> str:
    """'single', 'ddp', 'deepspeed-zero2', 'deepspeed-zero3', 'fsdp2' (for logs and manifests)."""
    kind = acc.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return f"deepspeed-zero{acc.state.deepspeed_plugin.zero_stage}"
    if kind == DistributedType.FSDP:
        return f"fsdp{acc.state.fsdp_plugin.fsdp_version}"
    return "single" if acc.num_processes == 1 else "ddp"


def is_sharded(acc: Accelerator) -> bool:
    """Parameters split over ranks: every forward is a collective, so every rank must run it."""
    return name(acc) in ("deepspeed-zero3", "fsdp2")


def bare(model: torch.nn.Module) -> torch.nn.Module:
    """The model under an engine's wrapper (a DeepSpeed engine, DDP), found without importing deepspeed."""
    deepspeed = sys.modules.get("deepspeed")
    wrapped = (torch.nn.parallel.DistributedDataParallel, *([deepspeed.DeepSpeedEngine] if deepspeed else []))
    return model.module if isinstance(model, wrapped) else model


def sharded_parameters(model: torch.nn.Module) -> bool:
    """Whether an engine has split `model`'s parameters over processes (ZeRO-3 partitions, FSDP2 DTensors)."""
    from torch.distributed.tensor import DTensor

    p = next(model.parameters(), None)
    return p is not None and (hasattr(p, "ds_id") or isinstance(p, DTensor))


def launched() -> str:
    """The engine `accelerate launch --config_file` asked for (its environment variables), known
    before any Accelerator or model exists."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        return f"deepspeed-zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '?')}"
    if os.environ.get("ACCELERATE_USE_FSDP") == "true":
        return f"fsdp{os.environ.get('FSDP_VERSION', '1')}"
    return "ddp" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else "single"


def check_supported(engine: str, quantized: bool) -> None:
    """Refuse, before any model is loaded, what the stages cannot run under."""
    if engine == "fsdp1":
        raise ConfigError(
            "FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
            "(accelerate_configs/fsdp2.yaml)"
        )
    if quantized and engine in ("deepspeed-zero3", "fsdp2"):
        raise ConfigError(
            f"QLoRA cannot run under {engine}: a quantized base cannot be sharded by this pipeline; "
            "use accelerate_configs/multi_gpu.yaml or zero2.yaml (the 4-bit base fits on each GPU)"
        )


def configure(acc: Accelerator, micro_batch_size: int, max_grad_norm: float) -> None:
    """DeepSpeed takes batch sizes and gradient clipping from its own config, and our PPO passes no
    dataloader through `prepare` to infer them. Values the user set in the config are checked, not
    overridden."""
    if acc.distributed_type != DistributedType.DEEPSPEED:
        return
    ds = acc.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": acc.gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * acc.gradient_accumulation_steps * acc.num_processes,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in wanted.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ConfigError(
                f"the DeepSpeed config sets {key}={ds[key]} but the recipe needs {value}: "
                f"remove it from the config (the recipe decides)"
            )
        ds[key] = value


def clip_gradients(acc: Accelerator, model, max_norm: float) -> None:
    """Under DeepSpeed the engine clips inside `step` (configure put the norm in its config)."""
    if acc.distributed_type != DistributedType.DEEPSPEED:
        acc.clip_grad_norm_(model.parameters(), max_norm)


def unwrap(acc: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The module under the engine's wrapper (DDP's, DeepSpeed's; FSDP2 shards in place and has none)
    and under torch.compile's (accelerate compiles where its config names a dynamo backend).
    accelerate's `unwrap_model` imports deepspeed whenever it is installed, to recognise its engine
    (~3 s and ~300 MB in each process): only a DeepSpeed run goes through it."""
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return acc.unwrap_model(model)
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper (accelerate's dynamo_backend), outermost
    model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def prepare_frozen(model: torch.nn.Module, acc: Accelerator) -> torch.nn.Module:
    """A frozen model (reference, reward) for the engine: sharded like the policy under ZeRO-3 and
    FSDP2 (trl's prepare_deepspeed / prepare_fsdp), else on the process's device."""
    model.requires_grad_(False).eval()
    if acc.distributed_type == DistributedType.DEEPSPEED:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, acc)
    if acc.distributed_type == DistributedType.FSDP:
        from trl.models.utils import prepare_fsdp

        return prepare_fsdp(model.to(acc.device), acc)
    return model.to(acc.device)


@contextmanager
def for_generation(model, acc: Accelerator):
    """The unwrapped PolicyAndValue with its policy's parameters whole for the whole generation.

    A rollout runs the policy alone, so only the policy is gathered, once per rollout rather than
    once per token, and the value network stays sharded (a 7B value model would otherwise be gathered
    on every rank too). Nothing collective runs inside, so each rank decodes as many steps as its own
    batch needs (no `synced_gpus`).

    ZeRO-3: the policy's parameters are gathered and DeepSpeed's fetch hooks removed meanwhile (trl's
    `unwrap_model_for_generation` does the same for every parameter of the engine's module, the value
    network's too: its hook helpers are used here). FSDP2, which trl does not cover: the policy's
    FSDP modules are unsharded once and kept so; the root's own group (the embeddings and heads of
    both networks, outside any decoder layer) is unsharded with them, the value network's decoder
    layers are not."""
    unwrapped = unwrap(acc, model)
    kind = name(acc)
    if kind == "deepspeed-zero3":
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        with deepspeed.zero.GatheredParameters(list(unwrapped.policy.parameters())):
            remove_hooks(model)
            try:
                yield unwrapped
            finally:
                add_hooks(model)
    elif kind == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        # FSDP2 names as root the first sharded module to run forward; generation runs the policy, a
        # submodule, so the real root is initialised first (torch has no public call for this).
        model._get_fsdp_state()._lazy_init()
        sharded = [model, *(m for m in unwrapped.policy.modules() if isinstance(m, FSDPModule))]
        for m in sharded:
            m.unshard()
            m.set_reshard_after_forward(False)
        try:
            yield unwrapped
        finally:
            for m in sharded:
                m.set_reshard_after_forward(True)
                m.reshard()
    else:
        yield unwrapped


@contextmanager
def single_process_loading():
    """`from_pretrained` on one rank only (the adapter merge for the artifact). Under ZeRO-3,
    transformers loads every model into DeepSpeed's partitioned init, a collective that would wait
    forever for the other ranks; the run's DeepSpeed config is hidden from it meanwhile (transformers
    keeps it in a module-level weak reference and has no public getter to restore it from)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def full_state_dict(acc: Accelerator, model) -> dict:
    """The trained model's whole state dict on the main process, its trained weights in float32
    (empty on the other processes; every process takes part).

    `accelerator.get_state_dict` gathers what the engine holds, and DeepSpeed with bf16 / fp16 holds the
    module in that dtype, its float32 master weights in the optimizer: saved from the module, the
    small updates of an RLHF run would be rounded away. Under DeepSpeed the trained weights are taken
    from the masters instead (deepspeed's `safe_get_full_fp32_param`, a collective over ZeRO-2's or
    ZeRO-3's partitions); a frozen weight has no master and is saved as stored, except under LoRA,
    where only the adapters are saved and the frozen base is left out (as the Trainer does)."""
    if acc.distributed_type == DistributedType.FSDP:
        return acc.get_state_dict(model)
    if acc.distributed_type != DistributedType.DEEPSPEED:  # (accelerate's get_state_dict: the same, via unwrap_model)
        return unwrap(acc, model).state_dict()
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = unwrap(acc, model)
    adapters = any(hasattr(m, "peft_config") for m in module.modules())
    gathered, state = {}, {}
    for name, p in module.named_parameters(remove_duplicate=False):  # (tied weights: both names)
        if adapters and not p.requires_grad:
            continue
        if id(p) not in gathered:
            value = safe_get_full_fp32_param(p) if p.requires_grad else None
            if value is None:
                with deepspeed.zero.GatheredParameters([p]):  # (a no-op below ZeRO-3)
                    value = p.detach().clone()
            gathered[id(p)] = value.cpu() if acc.is_main_process else None
        if acc.is_main_process:
            state[name] = gathered[id(p)]
    if acc.is_main_process:  # buffers (the persistent ones, which state_dict holds): never partitioned
        buffers = {name for name, _ in module.named_buffers()}
        state.update({k: v.clone() for k, v in module.state_dict().items() if k in buffers})
    return state


@contextmanager
def saving(acc: Accelerator):
    """Around transformers' `save_pretrained` (or the Trainer's `save_model`, which calls it): it
    unwraps the model with accelerate's `extract_model_from_parallel`, which imports deepspeed
    whenever it is installed, to recognise its engine: 0.3 s and 19 MB at the end of the demo's PPO
    stage, which made that moment its peak memory. Only a DeepSpeed run can hold such an engine, so in
    any other the lookup is skipped for the save (accelerate has no switch for it: its availability
    check is replaced meanwhile)."""
    from accelerate.utils import other

    if acc.distributed_type == DistributedType.DEEPSPEED:
        yield
        return
    available, other.is_deepspeed_available = other.is_deepspeed_available, lambda: False
    try:
        yield
    finally:
        other.is_deepspeed_available = available


def mark_float32(path) -> None:
    """A saved full model's config says float32. `save_pretrained` writes the dtype of the module it is
    called on, and under DeepSpeed in bf16 that is the engine's bf16 copy, whatever the state dict
    holds: `from_pretrained` (dtype "auto") would then load the float32 masters as bf16."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    config.dtype = "float32"
    config.save_pretrained(path)


def save_trainer_model(trainer, path) -> None:
    """`trainer.save_model` as one full, `from_pretrained`-loadable model in float32 (every rank takes
    part).

    FSDP2 checkpoints are sharded (accelerate_configs/fsdp2.yaml: each rank writes its own shard of the
    weights and AdamW state, and resume reads them back), and with a sharded state-dict type the
    Trainer's `save_model` writes no model at all: the final one is gathered in full instead. Under
    DeepSpeed `save_model` would save the engine's bf16 copy: the float32 masters are saved instead
    (`full_state_dict`)."""
    acc = trainer.accelerator
    if acc.distributed_type == DistributedType.DEEPSPEED:
        state = full_state_dict(acc, trainer.model_wrapped)
        if acc.is_main_process:
            unwrapped = unwrap(acc, trainer.model)
            unwrapped.save_pretrained(path, state_dict=state)
            if not hasattr(unwrapped, "peft_config"):  # (an adapter's own config names no dtype)
                mark_float32(path)
        acc.wait_for_everyone()
        return
    plugin = getattr(acc.state, "fsdp_plugin", None)
    if plugin is None or "SHARDED" not in str(plugin.state_dict_type):
        with saving(acc):
            trainer.save_model(path)
        return
    plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        trainer.save_model(path)
    finally:
        plugin.set_state_dict_type("SHARDED_STATE_DICT")
