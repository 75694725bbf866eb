"""TAESD's decoder against SD 1.5's VAE decoder (random weights: latency does not depend on them),
one 512x512 decode (64x64 latents), float32, ONNX Runtime and OpenVINO, 2 threads; one warm-up run,
then the median of 3. Needs the export extra. Run from the repository root:

    PYTHONPATH=. python bench/taesd_vs_vae_decode.py [OUT_FOLDER]
"""
import json, time, sys
import numpy as np, torch
torch.set_num_threads(2)
from diffusers import AutoencoderKL
from export.components import VaeDecoderWrapper
from export.taesd import TaesdDecoderWrapper, random_taesd
out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/taesd_bench"
import os
os.makedirs(out, exist_ok=True)
cfg = json.load(open("export/configs/sd15/vae/config.json"))
mods = {"taesd": TaesdDecoderWrapper(random_taesd(0)).eval(),
        "vae": VaeDecoderWrapper(AutoencoderKL.from_config(cfg).eval()).eval()}
z = torch.randn(1, 4, 64, 64)
for name, m in mods.items():
    with torch.no_grad():
        torch.onnx.export(m, (z,), f"{out}/{name}.onnx", input_names=["latent_sample"], output_names=["sample"],
                          opset_version=17, dynamo=False)
del mods
import onnxruntime as ort, openvino as ov
zz = np.random.default_rng(0).standard_normal((1, 4, 64, 64), dtype=np.float32)
core = ov.Core()
for name in ("taesd", "vae"):
    so = ort.SessionOptions(); so.intra_op_num_threads = 2
    s = ort.InferenceSession(f"{out}/{name}.onnx", so, providers=["CPUExecutionProvider"])
    s.run(None, {"latent_sample": zz})
    ts = []
    for _ in range(3):
        t0 = time.perf_counter(); s.run(None, {"latent_sample": zz}); ts.append(time.perf_counter() - t0)
    print(name, "onnxruntime", "median %.3f s" % sorted(ts)[1], [round(t, 3) for t in ts], flush=True)
    del s
    c = core.compile_model(f"{out}/{name}.onnx", "CPU", {"INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "f32"})
    r = c.create_infer_request(); r.infer({0: zz})
    ts = []
    for _ in range(3):
        t0 = time.perf_counter(); r.infer({0: zz}); ts.append(time.perf_counter() - t0)
    print(name, "openvino f32", "median %.3f s" % sorted(ts)[1], [round(t, 3) for t in ts], flush=True)
    del c, r
