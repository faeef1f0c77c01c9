"""Measurement: the paper's Tables 2-3 (`paper`), the engine bench (`engine`), the flash-read
bench and its workloads (`io`, `io_workloads`), the 7B-scale I/O simulation (`scale`),
perplexity against bytes read per selection (`accuracy`, `flashlm eval`), trace reports and
plots (`trace_report`), the RSS probe (`rss_probe`).

Built on the engine's public pieces; nothing in the engine (`flashlm.io`, `flashlm.models`,
`flashlm.pipeline`) imports it. The `flashlm bench`, `flashlm eval` and `flashlm trace
report` commands run it.
"""

from __future__ import annotations

from typing import Any

from flashlm.errors import MissingDependencyError


def pyplot(what: str) -> Any:
    """matplotlib.pyplot on the Agg backend, or MissingDependencyError saying `what` needs it."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(f"{what} needs matplotlib, which is not installed: pip install "
                                     f"'flashlm[bench]' (or matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
