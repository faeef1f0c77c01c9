"""Calibration: record the dense model on text, build neuron selectors, order neurons by
co-activation, and write it all into the store atomically (`calibrate(store_path,
tokens=...)`). How well the selections do is measured in `flashlm.bench.accuracy`.
"""

from flashlm.calibration.calibrate import calibrate

__all__ = ["calibrate"]
