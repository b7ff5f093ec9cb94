"""Real PyTorch models on the memory system: weights as resident blocks, checkpoints, peaks."""

from ._build import BUILD_LOCK as BUILD_LOCK
from ._build import BuiltModule as BuiltModule
from ._build import build_on_meta as build_on_meta
from ._model import CheckpointMismatchError as CheckpointMismatchError
from ._model import Model as Model
from ._model import ModelNotResidentError as ModelNotResidentError
from ._model import ResidentModel as ResidentModel
from ._model import bind_checkpoint as bind_checkpoint
from ._peak import measure_peak as measure_peak
from ._transformers import from_transformers as from_transformers

__all__ = (
    "BUILD_LOCK",
    "BuiltModule",
    "CheckpointMismatchError",
    "Model",
    "ModelNotResidentError",
    "ResidentModel",
    "bind_checkpoint",
    "build_on_meta",
    "from_transformers",
    "measure_peak",
)
