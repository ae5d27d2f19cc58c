"""Run under `accelerate launch --config_file configs/accelerate/{fsdp,deepspeed-zero2}.yaml --num_processes 2`
on CPU: trains each recipe given (a JSON list of override lists) under that config, over gloo.

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \\
        tests/dist_sharded_check.py FSDP '[["model=...", "output_dir=...", ...], ...]'

accelerate turns FSDP and DeepSpeed on only where its processes drive accelerators: on CPU
processes its state stays MULTI_CPU and the plugin is ignored (plain DDP runs instead, which
mmemb's trainer refuses). This script changes exactly that decision, so accelerate takes the gloo
CPU group for an accelerator group; everything after it runs as on GPUs: accelerate's FSDP2
wrapping of the config (fully_shard on every decoder layer and vision block) or DeepSpeed's ZeRO-2
engine, sharded passes and gradient reductions, clipping and AdamW, the sharded save_state and the
full-weight export. Each run's DeepSpeed config (as the engine got it) is written to
OUTPUT_DIR/deepspeed_config.json.
"""

import json
import os
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
_partial_init, _accelerator_init = PartialState.__init__, AcceleratorState.__init__
# cpu=False: the branches that set up FSDP / DeepSpeed (and their process group, here gloo)
PartialState.__init__ = lambda self, cpu=False, **kw: _partial_init(self, cpu=False, **kw)
AcceleratorState.__init__ = lambda self, *args, cpu=False, **kw: _accelerator_init(self, *args, cpu=False, **kw)
PartialState._prepare_backend = lambda self, *args, **kwargs: ("gloo", DistributedType.MULTI_GPU)

if __name__ == "__main__":
    import torch

    from mmemb.fileio import write_json
    from mmemb.train.config import load_config
    from mmemb.train.trainer import Trainer

    torch.set_num_threads(1)
    engine = DistributedType[sys.argv[1]]
    for overrides in json.loads(sys.argv[2]):
        trainer = Trainer(load_config(None, overrides))
        assert trainer.accelerator.distributed_type == engine, trainer.accelerator.distributed_type
        assert trainer.accelerator.num_processes == 2
        trainer.run()
        plugin = trainer.accelerator.state.deepspeed_plugin
        if plugin is not None and trainer.accelerator.is_main_process:
            write_json(trainer.out / "deepspeed_config.json", plugin.deepspeed_config)
