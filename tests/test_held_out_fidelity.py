"""The UNet's held-out fidelity figure (issue #15 item 2): one PSNR pooled over every
call of the held-out sampling run (export/quantize.py ``pooled_psnr_db`` /
``held_out_entry``), with the worst call and the mean beside it. Plain numpy: fast."""
from __future__ import annotations

import math

import numpy as np
import pytest

from export import quantize as quant
from export import validate


def _calls():
    refs = [np.array([0.0, 1.0]), np.array([2.0, 3.0])]
    outs = [np.array([0.1, 1.0]), np.array([2.0, 3.3])]
    return refs, outs


def test_pooled_psnr_is_one_figure_over_every_element_of_every_call():
    refs, outs = _calls()
    # squared errors 0.01 and 0.09 over 4 elements; peak = the pooled reference's range, 3 - 0
    want = 10 * math.log10(3.0 ** 2 / ((0.01 + 0.09) / 4))
    assert quant.pooled_psnr_db(refs, outs) == pytest.approx(want, abs=1e-9)
    # not the mean of per-call figures, nor each call's own range
    per_call = [validate.figures(r, o)["psnr_db"] for r, o in zip(refs, outs)]
    assert per_call == pytest.approx([10 * math.log10(1 / (0.01 / 2)), 10 * math.log10(1 / (0.09 / 2))])
    assert abs(want - np.mean(per_call)) > 5


def test_pooled_psnr_edge_cases():
    refs, outs = _calls()
    assert quant.pooled_psnr_db(refs, refs) == validate.PSNR_CAP_DB
    assert quant.pooled_psnr_db(refs, [outs[0], np.array([2.0, np.nan])]) == -math.inf
    assert quant.pooled_psnr_db(refs, [outs[0], np.array([2.0, 3.0, 4.0])]) == -math.inf
    assert quant.pooled_psnr_db(refs, outs[:1]) == -math.inf
    # one call: the same figure as validate.figures
    assert quant.pooled_psnr_db(refs[1:], outs[1:]) == pytest.approx(validate.figures(refs[1], outs[1])["psnr_db"])


def test_held_out_entry_records_pooled_worst_call_and_mean():
    refs, outs = _calls()
    refs.append(np.array([-1.0, 0.0]))
    outs.append(np.array([-1.0, 0.0]))     # a perfect call: capped per-call figure
    e = quant.held_out_entry(refs, outs)
    assert e["points"] == 3 and e["finite"]
    assert e["psnr_db"] == pytest.approx(10 * math.log10(4.0 ** 2 / (0.1 / 6)))
    assert e["psnr_db_worst_call"] == pytest.approx(10 * math.log10(1 / 0.045))
    assert e["psnr_db_mean"] == pytest.approx(np.mean([10 * math.log10(1 / 0.005), 10 * math.log10(1 / 0.045),
                                                       validate.PSNR_CAP_DB]))
    assert e["psnr_db"] >= e["psnr_db_worst_call"]   # pooled never falls below the worst call


def test_gate_on_held_out_fails_a_broken_file():
    refs, _ = _calls()
    entry = {"finite": True, "passed": True}
    quant.gate_on_held_out(entry, "openvino", refs, [r + 10.0 for r in refs])
    assert entry["gate"] == "held_out" and entry["passed"] is False
    assert entry["held_out"]["psnr_db"] < quant.QUANT_TOLERANCE.psnr_db
    assert entry["held_out"]["reference_format"] == "openvino"
    quant.gate_on_held_out(entry, "openvino", refs, [r + 1e-4 for r in refs])
    assert entry["passed"] is True
