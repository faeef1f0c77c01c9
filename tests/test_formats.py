"""The quantised formats' sizes are defined once, in flashlm.kernels.formats, and every side
agrees with them: the quantiser's tensors, the bundle layout the kernels read, and the bundles
the store writer puts on disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashlm.io.format import bundle_nbytes
from flashlm.io.writer import write_store
from flashlm.kernels import (
    QBundles, available_backends, dequantize_bundles, dequantize_rows, ffn_gated, quantize, quantize_activations,
    use_backend,
)
from flashlm.kernels.formats import (
    GATED_PARTS, GROUP, QUANT_DTYPES, BundleLayout, bundle_bytes, bundle_layout, data_bytes, row_bytes,
)
from flashlm.kernels.quantizers import quantize_rows

D, N = 96, 7  # three groups per row


def test_the_sizes_written_out():
    assert GROUP == 32 and QUANT_DTYPES == {"int8": "q8", "q4": "q4", "q4d8": "q4"}
    assert (data_bytes("q8", 64), row_bytes("q8", 64)) == (64, 64 + 2 * 2)  # int8 values, an fp16 scale a group
    assert (data_bytes("q4", 64), row_bytes("q4", 64)) == (32, 32 + 2 * 2 * 2)  # nibbles, fp16 scale and min
    assert bundle_bytes("q4", 64, 3) == 3 * 40 == BundleLayout("q4", 64).nbytes
    # q4d8: gate and up as q4 rows, down as a q8 row
    assert bundle_layout("q4d8", 64, GATED_PARTS).nbytes == 2 * 40 + 68 == bundle_nbytes(3, 64, "q4d8")
    assert bundle_nbytes(2, 64, "q4d8") == 40 + 68 == bundle_nbytes(2, 64, "q4d8", ("fc1", "fc2"))


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_the_quantiser_makes_rows_of_row_bytes(fmt):
    rows = quantize(fmt, torch.randn(N, D))
    held = sum(t.numel() * t.element_size() for t in (rows.data, rows.scales, rows.mins) if t is not None)
    assert held == rows.nbytes == N * row_bytes(fmt, D)
    assert rows.data.shape == (N, data_bytes(fmt, D)) and rows.scales.shape == (N, D // GROUP)


@pytest.mark.parametrize("dtype", sorted(QUANT_DTYPES))
def test_the_store_writer_and_the_kernels_agree(tmp_path, dtype):
    torch.manual_seed(0)
    layer = torch.randn(N, 3, D)
    m = write_store(tmp_path / "s", model_type="llama", config={"model_type": "llama", "hidden_size": D},
                    dtype=dtype, source={"kind": "test"}, resident={"model.norm.weight": torch.ones(D)},
                    ffn_layers=iter([layer]), n_layers=1, parts=GATED_PARTS, hidden_size=D)
    layout = bundle_layout(dtype, D, GATED_PARTS)
    fmt = layout.fmt
    assert m.ffn.bundle_bytes == bundle_nbytes(3, D, dtype) == sum(row_bytes(f, D) for f in layout.fmts) == layout.nbytes
    raw = np.fromfile(tmp_path / "s" / "ffn.bin", dtype=np.uint8)
    at = m.ffn.layers[0].offset
    disk = torch.from_numpy(raw[at:at + N * m.ffn.stride].reshape(N, m.ffn.stride).copy())
    assert not disk[:, layout.nbytes:].any()  # past the layout's bytes: only padding
    # each part, read at the kernels' offsets, is the writer's quantiser's rows byte for byte
    bundles = QBundles(disk, layout)
    for p, name in enumerate(GATED_PARTS):
        pf = layout.fmts[p]
        want, got = quantize_rows(pf, layer[:, p]), bundles.part(name)
        assert torch.equal(got.data, want.data) and torch.equal(got.scales, want.scales)
        assert (got.mins is None) == (want.mins is None) and (got.mins is None or torch.equal(got.mins, want.mins))
        assert torch.equal(dequantize_bundles(bundles)[:, p], dequantize_rows(pf, want))
    # every backend (the C kernels' own offset arithmetic, and the torch reference's through
    # unpack_bundle) reads the store's padded bundles alike
    x, slots = torch.randn(2, D), torch.tensor([0, 3, 5, 6], dtype=torch.int32)
    outs = {}
    for b in available_backends():
        with use_backend(b):
            outs[b] = ffn_gated(fmt, disk, layout, "silu", quantize_activations(x), slots, torch.zeros(2, D))
    assert outs["torch"].abs().sum() > 0
    for b, out in outs.items():
        torch.testing.assert_close(out, outs["torch"], rtol=1e-4, atol=1e-5, msg=b)
