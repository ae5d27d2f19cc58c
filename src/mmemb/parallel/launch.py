"""``mmemb VERB --num-processes N``: re-launch the same command through ``accelerate launch``.

Nothing distributed is done here: accelerate starts the N processes (torchrun underneath, gloo on
CPU, NCCL on GPUs, or FSDP / DeepSpeed from an accelerate config file) and each runs the same
``mmemb`` command; the command finds its place among them with :func:`mmemb.parallel.processes`.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Sequence


def launched() -> bool:
    """True inside a process started by accelerate / torchrun."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_command(cli_args: Sequence[str], num_processes: int, accelerate_config: str | None = None) -> list[str]:
    """The ``accelerate launch`` command line that runs ``mmemb <cli_args>`` (verb first) on N processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--main_process_port", str(_free_port())]
    if accelerate_config:
        cmd += ["--config_file", str(accelerate_config)]
    else:
        # torchrun underneath; without CUDA each process runs on CPU with gloo, one thread each
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--num_cpu_threads_per_process", "1"]
    cmd += ["--dynamo_backend", "no", "-m", "mmemb.cli", *cli_args]
    return cmd


def command_line(ctx: Any, leave_out: Sequence[str] = ("num_processes",)) -> list[str]:
    """The verb and options of a running ``mmemb`` command (a click / typer context), as argv again.

    Built from the parsed values, so it is the same whether the command came from a shell or from
    a test's CliRunner; the parameters named in ``leave_out`` are dropped.
    """
    verbs = []
    c = ctx
    while c.parent is not None:  # the root context is the program itself
        verbs.insert(0, c.info_name)
        c = c.parent
    args = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in leave_out or value is None:
            continue
        if param.param_type_name == "argument":
            args += [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        elif param.is_flag:
            flag = param.opts[0] if value else (param.secondary_opts or [None])[0]
            args += [flag] if flag else []
        else:
            for v in (value if param.multiple else [value]):
                args += [param.opts[0], str(v)]
    return verbs + args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
