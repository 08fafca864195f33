"""Router analytics: metrics (metrics.py), online monitoring during training (online.py), offline
recording as tidy tables (recorder.py, tables.py, schemas.py), plots and an HTML report
(plots.py, report.py, analyze.py) and the ``moe-lab analyze`` command (cli.py).

    from moe_engine.analytics import RoutingRecorder, RouterMonitor
    rec = RoutingRecorder(model)
    with rec:
        model(input_ids=ids)
    rec.layer_table()

Names resolve lazily: importing this package imports neither pandas, pandera nor matplotlib.
"""

from importlib import import_module

_EXPORTS = {
    "RoutingRecorder": "moe_engine.analytics.recorder",
    "RouterMonitor": "moe_engine.analytics.online",
    "MonitorConfig": "moe_engine.analytics.online",
    "Alert": "moe_engine.analytics.online",
    "analyze": "moe_engine.analytics.analyze",
    "AnalyzeConfig": "moe_engine.analytics.analyze",
    "load_dataset": "moe_engine.analytics.data",
    "AnalyticsError": "moe_engine.analytics.data",
    "saturation_table": "moe_engine.analytics.tables",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moe_engine.analytics' has no attribute {name!r}")
