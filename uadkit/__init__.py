"""uadkit: the small library under the book *Unsupervised image anomaly detection, reproduced*.

Submodules are imported on use: ``uadkit.data``, ``uadkit.backbones``,
``uadkit.metrics``, ``uadkit.synth``, ``uadkit.train``, ``uadkit.viz``,
``uadkit.repro``, ``uadkit.profiles``, ``uadkit.models``.
"""
__version__ = "0.1.0"

import warnings as _warnings

# tqdm.auto (imported by some dependencies) warns when ipywidgets is absent; uadkit draws text bars.
_warnings.filterwarnings("ignore", message="IProgress not found")
