"""How well cpuflow's invisible watermark (cpuflow/watermark.py) survives, what it costs in PSNR, and
how long it takes, on 50 images:

* 10 pictures of the shipped model generated at 256x256 (the smallest size that carries the mark),
* 10 pictures of the shipped model at its own 64x64, enlarged to 512x512 (LANCZOS: smooth, flat colour),
* 30 synthetic 512x512 textures: colour noise with a 1/f^beta spectrum (beta 0.8..2.2, the range of
  natural photographs), random mean colour and contrast; every third one has such contrast that
  a fifth or more of its pixels clip at 0 or 255 (saturated colour, where the mark has least room).

For each: detection by `cpuflow.watermark.detect` after a PNG round trip, after JPEG at quality 90
(Pillow's default 4:2:0 chroma subsampling, and 4:4:4) and 95, and on the unmarked image (false positives);
imwatermark's own decoder on the same files when it is installed; PSNR of the marked image against
the original (and of imwatermark's encoder, for comparison); the time of `embed` and `detect` on
512x512 (median and best of 20; the machine's load average is printed beside them).

    PYTHONPATH=. .venv/bin/python bench/watermark_robustness.py [--json OUT.json]   # from the repository root
"""
from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
from PIL import Image

from cpuflow import watermark as wm
from tests.helpers_images import psnr, texture      # the same textures the tests use


def model_images() -> list[tuple[str, Image.Image]]:
    from cpuflow import Pipeline
    from cpuflow.toyworld import COLORS, SHAPES
    r = np.random.default_rng(0)
    out = []
    with Pipeline.load(None, precision="f32") as pipe:
        for i in range(20):
            c, b = r.choice(len(COLORS), 2, replace=False)
            prompt = f"a {COLORS[c]} {SHAPES[i % 3]} on a {COLORS[b]} background"
            size = 256 if i < 10 else 64
            img = pipe.txt2img(prompt, seed=i, width=size, height=size, steps=20).images[0]
            if size == 64:
                img = img.resize((512, 512), Image.Resampling.LANCZOS)
            out.append((f"model {size}: {prompt}", img))
            print(f"  made {out[-1][0]}", flush=True)
    return out


def roundtrip(img: Image.Image, fmt: str, **kw) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def timing(f, *a, n: int = 20) -> dict:
    f(*a)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f(*a)
        ts.append(time.perf_counter() - t0)
    return {"median_ms": round(float(np.median(ts)) * 1e3, 2), "best_ms": round(min(ts) * 1e3, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        from imwatermark import WatermarkDecoder, WatermarkEncoder
    except ImportError:
        WatermarkDecoder = WatermarkEncoder = None

    images = model_images() + [(f"texture {s}", texture(s)) for s in range(30)]
    rows = []
    for name, img in images:
        marked = wm.embed(img)
        row = {"image": name, "size": img.size, "psnr_db": round(psnr(img, marked), 2)}
        for label, test in (("png", roundtrip(marked, "PNG")), ("jpeg90", roundtrip(marked, "JPEG", quality=90)),
                            ("jpeg90_444", roundtrip(marked, "JPEG", quality=90, subsampling=0)),
                            ("jpeg95", roundtrip(marked, "JPEG", quality=95)),
                            ("unmarked", img), ("unmarked_jpeg90", roundtrip(img, "JPEG", quality=90))):
            found = wm.detect(test)
            row[label] = found.name if found else None
            row[label + "_agreement"] = round(found.agreement, 3) if found else None
            if WatermarkDecoder is not None:
                bgr = np.ascontiguousarray(np.asarray(test)[:, :, ::-1])
                row[label + "_imwatermark"] = WatermarkDecoder("bytes", 32).decode(bgr, "dwtDct") == wm.MESSAGE
        if WatermarkEncoder is not None:
            enc = WatermarkEncoder()
            enc.set_watermark("bytes", wm.MESSAGE)
            theirs = Image.fromarray(enc.encode(np.ascontiguousarray(np.asarray(img)[:, :, ::-1]), "dwtDct")[:, :, ::-1])
            row["imwatermark_psnr_db"] = round(psnr(img, theirs), 2)
            for label, kw in (("jpeg90", {}), ("jpeg90_444", {"subsampling": 0})):
                found = wm.detect(roundtrip(theirs, "JPEG", quality=90, **kw))
                row["imwatermark_" + label] = found.name if found else None
        rows.append(row)
        print(json.dumps(row), flush=True)

    ours = "cpuflow " + ".".join(wm.MESSAGE[2:].decode())
    n = len(rows)

    def rate(key):
        return sum(r.get(key) == ours for r in rows) / n

    def groups(key):
        return {g: sum(r.get(key) == ours for r in rows if r["image"].startswith(g)) for g in
                ("model 256", "model 64", "texture")}

    summary = {
        "images": n,
        "detected_png": rate("png"), "detected_jpeg90": rate("jpeg90"), "detected_jpeg90_444": rate("jpeg90_444"),
        "detected_jpeg95": rate("jpeg95"),
        "detected_png_by_group": groups("png"), "detected_jpeg90_444_by_group": groups("jpeg90_444"),
        "false_positives_unmarked": sum(r["unmarked"] is not None for r in rows),
        "false_positives_unmarked_jpeg90": sum(r["unmarked_jpeg90"] is not None for r in rows),
        "psnr_db_median": float(np.median([r["psnr_db"] for r in rows])),
        "psnr_db_min": min(r["psnr_db"] for r in rows),
        "psnr_db_max": max(r["psnr_db"] for r in rows),
    }
    if WatermarkDecoder is not None:
        summary["imwatermark_decoder_png"] = sum(bool(r["png_imwatermark"]) for r in rows) / n
        summary["imwatermark_decoder_jpeg90"] = sum(bool(r["jpeg90_imwatermark"]) for r in rows) / n
        summary["imwatermark_encoder_psnr_db_median"] = float(np.median([r["imwatermark_psnr_db"] for r in rows]))
        summary["imwatermark_encoder_detected_jpeg90"] = rate("imwatermark_jpeg90")
        summary["imwatermark_encoder_detected_jpeg90_444"] = rate("imwatermark_jpeg90_444")
    sample = texture(0)
    summary["embed_512"] = timing(wm.embed, sample)
    summary["detect_512"] = timing(wm.detect, wm.embed(sample))
    summary["load_average"] = [round(x, 1) for x in os.getloadavg()]
    summary["cpus"] = os.cpu_count()
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "images": rows}, f, indent=1)


if __name__ == "__main__":
    main()
