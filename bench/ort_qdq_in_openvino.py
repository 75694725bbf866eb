"""Could OpenVINO run ONNX Runtime's int8 file instead of a second quantization with NNCF? (issue #15 item 1)

`--format both --quantize int8` quantizes the UNet twice: ORT's quantize_static (its own activation
ranges) and NNCF (its own statistics pass, bias correction). OpenVINO reads the ORT QDQ file directly
(QuantizeLinear / DequantizeLinear become FakeQuantize), which would make one calibration serve both
formats. This measures, on an export folder that has both int8 files:

* the conversion of ``unet/model_int8.onnx`` to an IR (the NNCF stage it would replace is in the
  export's stage table),
* one 512x512 batch-2 UNet call of the fp32 IR, the NNCF int8 IR and the converted QDQ IR, at the
  runtime's default precision hint (bf16 where the CPU has it) and at f32, 3 calls each,
* each int8 output's PSNR against the fp32 IR at f32 on the same seeded input.

    python bench/ort_qdq_in_openvino.py EXPORT_DIR SCRATCH_DIR [--json OUT.json]

For the judge, a copy of a model folder whose OpenVINO int8 UNet is the converted QDQ file (the
manifest's size and sha256 of the two files rewritten; everything else as it was):

    python bench/ort_qdq_in_openvino.py --model-copy MODEL_DIR OUT_DIR
    python bench/eval_default_model.py --model OUT_DIR --variant fp32 --variant int8 --guidance 5 --backend openvino
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
import openvino as ov


def model_copy(src: Path, out: Path) -> None:
    """``src`` copied to ``out`` with unet/openvino_model_int8.* converted from unet/model_int8.onnx."""
    import hashlib
    import shutil

    shutil.copytree(src, out)
    model = ov.convert_model(str(out / "unet" / "model_int8.onnx"))
    ov.save_model(model, str(out / "unet" / "openvino_model_int8.xml"), compress_to_fp16=False)
    manifest = json.loads((out / "cpuflow.json").read_text())
    for rel in ("unet/openvino_model_int8.xml", "unet/openvino_model_int8.bin"):
        data = (out / rel).read_bytes()
        manifest["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (out / "cpuflow.json").write_text(json.dumps(manifest, indent=1))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("scratch", type=Path, help="where the converted IR is written (--model-copy: the copy)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--model-copy", action="store_true", help="write the judge's model copy instead")
    args = ap.parse_args()
    if args.model_copy:
        model_copy(args.export_dir, args.scratch)
        return
    unet = args.export_dir / "unet"
    core = ov.Core()
    args.scratch.mkdir(parents=True, exist_ok=True)
    qdq_xml = args.scratch / "unet_from_ort_qdq.xml"
    t = time.perf_counter()
    model = ov.convert_model(str(unet / "model_int8.onnx"))
    ov.save_model(model, str(qdq_xml), compress_to_fp16=False)
    del model
    gc.collect()
    result = {"convert_and_save_s": round(time.perf_counter() - t, 1), "runs": {}}
    print("ORT QDQ file -> IR:", result["convert_and_save_s"], "s", flush=True)
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 64, 64)).astype(np.float32),
             "timestep": np.array([500, 500]),
             "encoder_hidden_states": rng.standard_normal((2, 77, 768)).astype(np.float32)}
    ref = None
    for name, path, hint in [("fp32", unet / "openvino_model.xml", "f32"),
                             ("nncf int8", unet / "openvino_model_int8.xml", "default"),
                             ("ORT QDQ int8", qdq_xml, "default"),
                             ("nncf int8", unet / "openvino_model_int8.xml", "f32"),
                             ("ORT QDQ int8", qdq_xml, "f32")]:
        model = core.read_model(str(path))
        model.reshape({p: ov.PartialShape(list(feeds[p.get_any_name()].shape)) for p in model.inputs})
        f = {p.get_any_name(): feeds[p.get_any_name()].astype(p.get_element_type().to_dtype())
             for p in model.inputs}
        config = {"INFERENCE_NUM_THREADS": 2}
        if hint == "f32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        t = time.perf_counter()
        compiled = core.compile_model(model, "CPU", config)
        compile_s = time.perf_counter() - t
        precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()   # f32 / bf16
        req = compiled.create_infer_request()
        calls = []
        for _ in range(3):
            t = time.perf_counter()
            out = req.infer(f)
            calls.append(round(time.perf_counter() - t, 2))
        y = np.array(next(iter(out.values())), copy=True)
        row = {"precision": precision, "compile_s": round(compile_s, 1), "call_s": calls}
        if ref is None:
            ref = y
        else:
            mse = float(np.mean((y - ref) ** 2))
            row["psnr_db_vs_fp32"] = round(10 * np.log10(float(ref.max() - ref.min()) ** 2 / mse), 1)
        result["runs"][f"{name} ({precision})"] = row
        print(name, json.dumps(row), flush=True)
        del compiled, req, model
        gc.collect()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
