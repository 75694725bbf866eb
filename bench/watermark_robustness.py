"""How well cpuflow's invisible watermark (cpuflow/watermark.py) survives, what it costs in PSNR, and
how long it takes, on 50 images:

* 10 pictures of the shipped model generated at 256x256 (the smallest size that carries the mark),
* 10 pictures of the shipped model at its own 64x64, enlarged to 512x512 (LANCZOS: smooth, flat colour),
* 30 synthetic 512x512 textures: colour noise with a 1/f^beta spectrum (beta 0.8..2.2, the range of
  natural photographs), random mean colour and contrast; every third one has such contrast that
  a fifth or more of its pixels clip at 0 or 255 (saturated colour, where the mark has least room).

For each: detection by `cpuflow.watermark.detect` after a PNG round trip, after JPEG at quality 90,
80 and 70 (Pillow's default 4:2:0 chroma subsampling), 90 at 4:4:4, and 95, with which of cpuflow's two
marks read the message (the DWT-DCT chroma mark, the luma mark); on the unmarked image as PNG and as
JPEG 90 at 4:2:0 and 4:4:4 (false positives); imwatermark's own decoder on the same files when it is
installed; PSNR of the marked image against the original, with both marks and with the DWT-DCT mark
alone (``embed(..., luma=False)``, and imwatermark's encoder, for comparison); the time of `embed`
(both marks and DWT-DCT alone) and `detect` on 512x512 (median and best of 20; the machine's load
average is printed beside them).

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
from cpuflow import watermark_luma as wm_luma
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
            img = pipe.txt2img(prompt, seed=i, width=size, height=size, steps=20, watermark=False).images[0]
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
    ap.add_argument("--luma-steps", default="2,3",
                    help="other QIM steps of the luma mark to measure beside the default (comma-separated)")
    args = ap.parse_args()
    other_steps = [float(x) for x in args.luma_steps.split(",") if x]
    try:
        from imwatermark import WatermarkDecoder, WatermarkEncoder
    except ImportError:
        WatermarkDecoder = WatermarkEncoder = None

    images = model_images() + [(f"texture {s}", texture(s)) for s in range(30)]
    rows = []
    for name, img in images:
        marked = wm.embed(img)
        row = {"image": name, "size": img.size, "psnr_db": round(psnr(img, marked), 2),
               "psnr_db_dwtdct_only": round(psnr(img, wm.embed(img, luma=False)), 2)}
        for label, test in (("png", roundtrip(marked, "PNG")), ("jpeg90", roundtrip(marked, "JPEG", quality=90)),
                            ("jpeg80", roundtrip(marked, "JPEG", quality=80)),
                            ("jpeg70", roundtrip(marked, "JPEG", quality=70)),
                            ("jpeg90_444", roundtrip(marked, "JPEG", quality=90, subsampling=0)),
                            ("jpeg95", roundtrip(marked, "JPEG", quality=95)),
                            ("unmarked", img), ("unmarked_jpeg90", roundtrip(img, "JPEG", quality=90)),
                            ("unmarked_jpeg90_444", roundtrip(img, "JPEG", quality=90, subsampling=0))):
            found = wm.detect(test)
            row[label] = found.name if found else None
            row[label + "_agreement"] = round(found.agreement, 3) if found else None
            row[label + "_marks"] = [m for m, _ in found.marks] if found else []
            if WatermarkDecoder is not None:
                bgr = np.ascontiguousarray(np.asarray(test)[:, :, ::-1])
                row[label + "_imwatermark"] = WatermarkDecoder("bytes", 32).decode(bgr, "dwtDct") == wm.MESSAGE
        default_step = wm_luma.STEP
        for step in other_steps:         # the luma mark's JPEG rows and PSNR at other steps
            wm_luma.STEP = step
            try:
                other = wm.embed(img)
                row[f"step{step:g}_psnr_db"] = round(psnr(img, other), 2)
                for q in (90, 80, 70):
                    found = wm.detect(roundtrip(other, "JPEG", quality=q))
                    row[f"step{step:g}_jpeg{q}"] = found.name if found else None
                found = wm.detect(roundtrip(img, "JPEG", quality=90))
                row[f"step{step:g}_unmarked_jpeg90"] = found.name if found else None
            finally:
                wm_luma.STEP = default_step
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

    def by_mark(key, mark):
        return sum(r.get(key) == ours and mark in r[key + "_marks"] for r in rows) / n

    def groups(key):
        return {g: sum(r.get(key) == ours for r in rows if r["image"].startswith(g)) for g in
                ("model 256", "model 64", "texture")}

    cases = ("png", "jpeg90", "jpeg80", "jpeg70", "jpeg90_444", "jpeg95")
    summary = {"images": n}
    for key in cases:
        summary["detected_" + key] = rate(key)
        summary["detected_" + key + "_by_mark"] = {m: by_mark(key, m) for m in (wm.DWTDCT, wm.LUMA)}
        summary["detected_" + key + "_by_group"] = groups(key)
    summary.update({
        "false_positives_unmarked": sum(r["unmarked"] is not None for r in rows),
        "false_positives_unmarked_jpeg90": sum(r["unmarked_jpeg90"] is not None for r in rows),
        "false_positives_unmarked_jpeg90_444": sum(r["unmarked_jpeg90_444"] is not None for r in rows),
        "psnr_db_median": float(np.median([r["psnr_db"] for r in rows])),
        "psnr_db_min": min(r["psnr_db"] for r in rows),
        "psnr_db_max": max(r["psnr_db"] for r in rows),
        "psnr_db_dwtdct_only_median": float(np.median([r["psnr_db_dwtdct_only"] for r in rows])),
        "psnr_db_dwtdct_only_min": min(r["psnr_db_dwtdct_only"] for r in rows),
        "luma_step": wm_luma.STEP,
    })
    for step in other_steps:
        summary[f"luma_step_{step:g}"] = {
            "psnr_db_median": float(np.median([r[f"step{step:g}_psnr_db"] for r in rows])),
            "psnr_db_min": min(r[f"step{step:g}_psnr_db"] for r in rows),
            **{f"detected_jpeg{q}": rate(f"step{step:g}_jpeg{q}") for q in (90, 80, 70)},
            "false_positives_unmarked_jpeg90": sum(r[f"step{step:g}_unmarked_jpeg90"] is not None for r in rows)}
    if WatermarkDecoder is not None:
        summary["imwatermark_decoder_png"] = sum(bool(r["png_imwatermark"]) for r in rows) / n
        summary["imwatermark_decoder_jpeg90"] = sum(bool(r["jpeg90_imwatermark"]) for r in rows) / n
        summary["imwatermark_encoder_psnr_db_median"] = float(np.median([r["imwatermark_psnr_db"] for r in rows]))
        summary["imwatermark_encoder_detected_jpeg90"] = rate("imwatermark_jpeg90")
        summary["imwatermark_encoder_detected_jpeg90_444"] = rate("imwatermark_jpeg90_444")
    sample = texture(0)
    summary["embed_512"] = timing(wm.embed, sample)
    summary["embed_512_dwtdct_only"] = timing(lambda im: wm.embed(im, luma=False), sample)
    summary["detect_512"] = timing(wm.detect, wm.embed(sample))
    summary["load_average"] = [round(x, 1) for x in os.getloadavg()]
    summary["cpus"] = os.cpu_count()
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "images": rows}, f, indent=1)


if __name__ == "__main__":
    main()
