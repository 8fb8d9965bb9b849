"""fmcomm: collective communication for foundation-model training.

Quick start, under ``mpiexec -n 4 python train.py`` or ``torchrun``::

    import fmcomm, torch
    fmcomm.init()
    t = torch.ones(1 << 20)
    fmcomm.all_reduce(t)            # in place, every rank gets the sum
"""
__version__ = "0.1.0"

from .api import (all_gather, all_reduce, all_to_all_single, barrier, broadcast, default_communicator, finalize,
                  get_rank, get_world_size, info, init, new_group, reduce, reduce_scatter)
from .communicator import Communicator, Work
from .config import Config
from .errors import (CollectiveError, CommTimeoutError, ConfigError, FmcommError, InitError, InvalidArgument,
                     MachineFileError, MismatchError, NonFiniteError, ScheduleError, TopologyError, TransportError,
                     TuningFileError, UnsupportedError)

__all__ = [
    "init", "finalize", "all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all_single",
    "barrier", "new_group", "info", "get_rank", "get_world_size", "default_communicator",
    "Communicator", "Work", "Config",
    "FmcommError", "ConfigError", "InitError", "InvalidArgument", "UnsupportedError", "ScheduleError",
    "CollectiveError", "CommTimeoutError", "MismatchError", "TransportError", "NonFiniteError",
    "TopologyError", "MachineFileError", "TuningFileError",
]
