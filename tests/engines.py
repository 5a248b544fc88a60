"""Test-only: run a stage under FSDP2 or DeepSpeed ZeRO-2/3 with gloo processes on a CPU machine.

    accelerate launch --multi_gpu --num_processes 2 tests/engines.py fsdp2|zero2|zero3 stages/ppo.py ARGS

accelerate never selects these engines on a CPU (a config file saying FSDP or DEEPSPEED with
`use_cpu` silently runs plain DDP; ../shared/CPU_ENGINES.md has the measurements), so this shim
switches the process state to the engine right after each `Accelerator` is built, as the notes
describe, and then runs the stage script unchanged. On GPUs the same stages get the engine from
`--config_file accelerate_configs/<engine>.yaml` and none of this exists.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU, over gloo; before deepspeed is imported

import accelerate  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin  # noqa: E402

ENGINES = ("fsdp2", "zero2", "zero3")


def _set_type(kind: DistributedType) -> None:
    # Both shared states: setting only one is reverted when the state is initialised again.
    AcceleratorState._shared_state["distributed_type"] = kind
    PartialState._shared_state["distributed_type"] = kind


def switch(acc: accelerate.Accelerator, engine: str) -> None:
    state = acc.state
    if engine == "fsdp2":
        state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=os.environ.get("FSDP_WRAP", "LlamaDecoderLayer").split(","),
            state_dict_type="SHARDED_STATE_DICT",
            reshard_after_forward=True,
        )
        _set_type(DistributedType.FSDP)
        return
    plugin = DeepSpeedPlugin(
        zero_stage=int(engine[-1]),
        gradient_accumulation_steps=acc.gradient_accumulation_steps,
        zero3_save_16bit_model=True,
        zero3_init_flag=os.environ.get("ZERO3_INIT") == "1",
    )
    plugin.set_mixed_precision(acc.mixed_precision)
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = {"default": plugin}
    acc.deepspeed_engine_wrapped = None
    acc.deepspeed_plugins = state.deepspeed_plugins
    _set_type(DistributedType.DEEPSPEED)


def main() -> None:
    engine, script, *args = sys.argv[1:]
    assert engine in ENGINES, f"engine must be one of {ENGINES}"
    build = accelerate.Accelerator.__init__

    def init(self, *a, **kw):
        build(self, *a, **kw)
        switch(self, engine)

    accelerate.Accelerator.__init__ = init
    # What `accelerate launch --config_file <engine>.yaml` exports: the Trainer (SFT, RM) builds its
    # engine plugin from these; the switch above then makes the state use it on CPU.
    if engine == "fsdp2":
        os.environ.update(
            {
                "ACCELERATE_USE_FSDP": "true",
                "FSDP_VERSION": "2",
                "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                "FSDP_RESHARD_AFTER_FORWARD": "true",
                "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
            }
        )
    else:
        os.environ.update(
            {
                "ACCELERATE_USE_DEEPSPEED": "true",
                "ACCELERATE_DEEPSPEED_ZERO_STAGE": engine[-1],
                "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true",
            }
        )
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
