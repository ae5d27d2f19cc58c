"""Several processes through accelerate: re-launching a command, and inference work shared between them."""

from .launch import command_line, launch_command, launched
from .processes import Processes, process_device, processes, run_shared

__all__ = ["Processes", "command_line", "launch_command", "launched", "process_device", "processes", "run_shared"]
