"""`cpuflow bench` on the tiny x4 upscaler: the unet stage at the upscaler's shapes (7 channels,
class labels) and the upscale stage (one whole upscale), cpuflow and the torch reference
(StableDiffusionUpscalePipeline) on the same weights, in the table with their ratio."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from cpuflow.bench import report, runner  # noqa: E402
from cpuflow.errors import InvalidArgument  # noqa: E402
from cpuflow.manifest import load_manifest  # noqa: E402


def test_upscale_stages_with_the_torch_reference(tiny_upscale_export):
    m = load_manifest(tiny_upscale_export.model)
    settings = runner.BenchSettings(stages="unet,e2e", repeat=1, warmup=0, steps=1)
    configs, _ = runner.make_configs(m, ["onnxruntime"], [None], ["auto"])
    res = runner.run_bench(tiny_upscale_export.model, configs, settings, reference="torch",
                           reference_source=str(tiny_upscale_export.src), show_progress=False)
    assert res["settings"]["stages"] == ["unet", "upscale"]        # e2e of an upscaler is the upscale
    for col in res["configs"]:
        for key in ("unet", "upscale"):
            st = col["stages"][key]
            assert st["error"] is None, (col["id"], key, st.get("error_log_tail"))
            assert st["median_s"] > 0
    ref = res["configs"][-1]
    assert ref["stages"]["unet"]["weights_check"]["unet"] == {"conv_in.weight": True, "conv_out.weight": True}
    assert res["ratios"]["onnxruntime/default/auto"]["upscale"] is not None
    assert "x4 upscale, end to end (16->64, 1 steps)" in report.format_table(res)


def test_upscale_stage_needs_an_upscaler(tiny_export):
    m = load_manifest(tiny_export("sd1").model)
    with pytest.raises(InvalidArgument, match="upscale stage needs an x4 upscaler"):
        runner.stages_for_model(m, ("unet", "upscale"))
