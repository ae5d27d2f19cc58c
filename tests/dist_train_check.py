"""Run under `torch.distributed.run --nproc_per_node 2`: one plain and one GradCache step under DDP (gloo).

Rank 0 saves the losses and the (DDP-averaged) gradients to OUT for tests/test_train_step.py to
compare with one process on the concatenated batch.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_train_check.py MODEL DATA OUT
"""

import sys

import torch
from step_check import step_results  # run as a script: its own folder is on sys.path

if __name__ == "__main__":
    model, data, out = sys.argv[1:4]
    results, accelerator = step_results(model, data, distributed=True)
    assert accelerator.num_processes == 2, accelerator.distributed_type
    if accelerator.is_main_process:
        torch.save(results, out)
