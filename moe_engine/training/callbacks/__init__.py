"""Cross-cutting concerns of the training loop, one per file (OLMo-core's trainer callbacks are the
model): checkpoints and resume, MLflow, the loss history, progress, the profiler, the divergence
stop, snapshots, periodic validation and router statistics. ``loop.Callback`` lists the hooks."""

from moe_engine.training.callbacks.checkpointing import Checkpointer
from moe_engine.training.callbacks.divergence import StopOnDivergence, TrainingDiverged
from moe_engine.training.callbacks.evaluation import PeriodicEval
from moe_engine.training.callbacks.history import History
from moe_engine.training.callbacks.profiler import Profiler
from moe_engine.training.callbacks.progress import Progress
from moe_engine.training.callbacks.router_stats import RouterStats
from moe_engine.training.callbacks.snapshots import Snapshots
from moe_engine.training.callbacks.tracking import MLflowLogger

__all__ = ["Checkpointer", "History", "MLflowLogger", "PeriodicEval", "Profiler", "Progress", "RouterStats",
           "Snapshots", "StopOnDivergence", "TrainingDiverged"]
