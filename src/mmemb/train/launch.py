"""``mmemb train --num-processes N``: re-launch the same command through ``accelerate launch``.

Nothing distributed is done here: accelerate starts the N processes (torchrun underneath, gloo on
CPU, NCCL on GPUs, or FSDP / DeepSpeed from an accelerate config file) and each runs
``mmemb train`` as usual.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Sequence


def launched() -> bool:
    """True inside a process started by accelerate / torchrun."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_command(train_args: Sequence[str], num_processes: int, accelerate_config: str | None = None) -> list[str]:
    """The ``accelerate launch`` command line that runs ``mmemb train <train_args>`` on N processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--main_process_port", str(_free_port())]
    if accelerate_config:
        cmd += ["--config_file", str(accelerate_config)]
    else:
        # torchrun underneath; without CUDA each process runs on CPU with gloo, one thread each
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--num_cpu_threads_per_process", "1"]
    cmd += ["--dynamo_backend", "no", "-m", "mmemb.cli", "train", *train_args]
    return cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
