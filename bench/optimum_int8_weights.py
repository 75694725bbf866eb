"""optimum-intel's int8 weight compression of an optimum-intel OpenVINO folder, for the peer columns of
`cpuflow bench --reference genai / optimum-intel` (bench/README.md, "Peers in the same table").

Run it with the interpreter of optimum-intel's own environment (bench/README.md says why it has one):

    /opt/optimum-venv/bin/python bench/optimum_int8_weights.py FP32_FOLDER OUT_FOLDER

It loads FP32_FOLDER with ``OVWeightQuantizationConfig(bits=8)`` (NNCF compress_weights on every model,
as ``optimum-cli export openvino --weight-format int8`` does) and saves it; the OpenVINO tokenizer GenAI
needs is copied over (optimum-intel's save_pretrained does not write it).
"""
import shutil
import sys
import time
from pathlib import Path


def main(src: Path, out: Path) -> None:
    from optimum.intel import OVWeightQuantizationConfig
    from optimum.intel.openvino import OVStableDiffusionPipeline

    t0 = time.time()
    pipe = OVStableDiffusionPipeline.from_pretrained(str(src), compile=False,
                                                     quantization_config=OVWeightQuantizationConfig(bits=8))
    pipe.save_pretrained(str(out))
    for f in (src / "tokenizer").glob("openvino_*"):
        if not (out / "tokenizer" / f.name).exists():
            shutil.copy2(f, out / "tokenizer" / f.name)
    print(f"int8 weights: {time.time() - t0:.1f} s")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
