"""Calibration: record the dense model on text, build neuron selectors, order neurons by
co-activation, write it all into the store atomically; and evaluate the selections.

Entry points: `calibrate(store_path, tokens=...)` and `evaluate(store_path, quick=...)`.
"""

from flashlm.calibration.calibrate import calibrate
from flashlm.calibration.evaluate import evaluate

__all__ = ["calibrate", "evaluate"]
