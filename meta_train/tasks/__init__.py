"""Optimizee tasks: interfaces, the paper's test tasks and the meta-training task family."""

from ._common import TEST_LOSS, TEST_TOP1, TEST_TOP2, ImageClassificationTask, ParamLayout
from .base import Batch, Task, TaskConfig, TaskFamily
from .cnn import CNNTask
from .family import (
    DM_FAMILY,
    HYPERADAM_FAMILY,
    RNNPROP_FAMILY,
    FamilyMix,
    MetaTaskConfig,
    MetaTaskFamily,
    MetaTaskFamilyConfig,
)
from .lstm import SineLSTMTask
from .mlp import MLPTask
from .suite import TEST_TASKS, TestTaskSpec, build_test_task
from .tricks import MixedTask

__all__ = [
    "Batch",
    "CNNTask",
    "DM_FAMILY",
    "FamilyMix",
    "HYPERADAM_FAMILY",
    "ImageClassificationTask",
    "MLPTask",
    "MetaTaskConfig",
    "MetaTaskFamily",
    "MetaTaskFamilyConfig",
    "MixedTask",
    "ParamLayout",
    "RNNPROP_FAMILY",
    "SineLSTMTask",
    "TEST_LOSS",
    "TEST_TASKS",
    "TEST_TOP1",
    "TEST_TOP2",
    "Task",
    "TaskConfig",
    "TaskFamily",
    "TestTaskSpec",
    "build_test_task",
]
