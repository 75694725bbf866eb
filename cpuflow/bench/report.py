"""The bench result as a terminal table, a JSON file and a PNG chart (PIL only).

Table: one block of rows per stage (seconds median [min-max], peak RSS GiB,
speed-up vs torch), one column per configuration, torch last.
Chart: one panel per stage, one bar per configuration (median; the thin line
spans min..max), each panel on its own scale, plus a panel of peak RSS.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STAGE_ROWS = (
    ("text", "text encoder, 1 call"),
    ("depth", "depth estimator, 1 call"),
    ("unet", "UNet, 1 call"),
    ("vae", "VAE decode"),
    ("taesd", "TAESD decode"),
    ("e2e", "image, end to end"),
    ("upscale", "x4 upscale, end to end"),
    ("load_first", "load+compile, 1st start"),
    ("load_second", "load, 2nd start (cache)"),
)
REF_KEY = {"load_first": "load", "load_second": "load"}


def fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _stage_of(col: dict, key: str) -> dict | None:
    st = col["stages"].get(key)
    if st is None and col["kind"] in ("reference", "peer"):   # one "load" row: a fresh process each start
        st = col["stages"].get(REF_KEY.get(key, key))
    return st


def _ran_label(col: dict) -> str:
    """What the column really ran, from its UNet session (else any session)."""
    ran = col.get("ran") or {}
    facts = ran.get("unet") or ran.get("pipeline") or next(iter(ran.values()), None)
    if not facts:
        return "(no session)"
    dev = str(facts.get("device") or "?").replace("ExecutionProvider", "")
    return f"{dev} {facts.get('precision') or '?'} {facts.get('variant') or ''}".strip()


def stage_label(key: str, result: dict) -> str:
    s = result["settings"]
    label = dict(STAGE_ROWS)[key]
    if key == "unet":
        label += f" (batch {s['unet_batch']})"
    elif key == "e2e":
        label += f" ({s['steps']} steps)"
    elif key == "upscale":
        label += f" ({s['width'] // 4}->{s['width']}, {s['steps']} steps)"
    return label


def format_table(result: dict) -> str:
    s = result["settings"]
    mach = result["machine"]
    model = result["model"]
    cols = result["configs"]
    ratios = result.get("ratios") or {}
    threads = s["threads"] or f"default {mach['threads']['default']}"
    head = [
        f"cpuflow bench: {model['name']} ({model['family']}, {model['prediction_type']}"
        + (", random weights" if model["random_weights"] else "") + ")",
        f"  {s['width']}x{s['height']}, {s['steps']} steps ({s['sampler']}), guidance {s['guidance']:g}, "
        f"threads {threads}; {s['repeat']} repetition(s) after {s['warmup']} warm-up",
        f"  CPU: {mach['cpu_summary']}; {isa_line(mach['cpu'])}",
        "  seconds: median [min-max] of the repetitions; RSS: peak of the process that ran the stage"
        + ("; vs torch: torch median / this median (above 1: faster)" if ratios else ""),
        "",
    ]
    header1 = ["stage", ""] + [c["id"] if c["kind"] != "reference" else "torch (diffusers fp32)" for c in cols]
    if s.get("rounds", 1) > 1:
        head[1] += f"; {s['rounds']} interleaved rounds"
    header2 = ["", "ran on"] + [_ran_label(c) for c in cols]
    rows: list[list[str]] = [header1, header2]
    errors: list[str] = []
    for key, _ in STAGE_ROWS:
        if not any(_stage_of(c, key) for c in cols):
            continue
        t_row = [stage_label(key, result), "s"]
        m_row = ["", "RSS GiB"]
        r_row = ["", "vs torch"]
        for c in cols:
            st = _stage_of(c, key)
            if st is None:
                t_row.append("-")
                m_row.append("-")
                r_row.append("-")
                continue
            if st.get("median_s") is None:
                t_row.append("error" if st.get("error") else "-")
                if st.get("error"):
                    errors.append(f"{c['id']} {key}: {st.get('error_type', 'error')}: {st['error']}")
            else:
                t_row.append(f"{fmt_s(st['median_s'])} [{fmt_s(st['min_s'])}-{fmt_s(st['max_s'])}]")
            m_row.append("-" if st.get("peak_rss_gib") is None else f"{st['peak_rss_gib']:.2f}")
            if c["kind"] == "peer":
                r_row.append("-")
            elif c["kind"] == "reference":
                note = str(st.get("load_from", ""))
                r_row.append("-" if st.get("median_s") is None else
                             "random init" if key.startswith("load") and note.startswith("random") else "1")
            else:
                r = (ratios.get(c["id"]) or {}).get(key)
                r_row.append("-" if r is None else f"x{r:.2f}")
        rows += [t_row, m_row] + ([r_row] if ratios else [])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = head[:]
    for i, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if j < 2 else cell.rjust(w) for j, (cell, w) in
                               enumerate(zip(r, widths))).rstrip())
        if i == 1:
            lines.append("  ".join("-" * w for w in widths))
    for c in cols:
        st = c["stages"].get("e2e") or c["stages"].get("upscale")
        if st and st.get("breakdown"):
            b = st["breakdown"]
            med = {k: sorted(row.get(k, 0.0) for row in b)[len(b) // 2] for k in ("text_encoder", "unet_per_call",
                                                                                  "vae_decoder", "taesd_decoder")}
            dec = f"TAESD {fmt_s(med['taesd_decoder'])} s" if med["taesd_decoder"] else \
                f"VAE {fmt_s(med['vae_decoder'])} s"
            lines.append(f"  {c['id']}: per image, text encoder {fmt_s(med['text_encoder'])} s, "
                         f"UNet {fmt_s(med['unet_per_call'])} s/call, {dec}")
    for c in cols:
        starts = (c["stages"].get("load_first") or {}).get("starts") or []
        comp = next((s_["components"] for s_ in reversed(starts) if s_.get("components")), None)
        if comp:
            parts = ", ".join(f"{k} {fmt_s(v.get('compile_s'))} s" for k, v in comp.items())
            lines.append(f"  {c['id']}: first-start compile per component: {parts}")
    if model.get("build") and model["build"].get("built_now"):
        b = model["build"]
        lines.append(f"  model built now: export {fmt_s(b['export_s'])} s, peak RSS "
                     f"{b['export_peak_rss_bytes'] / 1024 ** 3:.2f} GiB")
    lines += peer_lines(result)
    for n in result.get("notes") or []:
        lines.append(f"  note: {n}")
    for e in errors:
        lines.append(f"  error: {e}")
    return "\n".join(lines)


def isa_line(cpu: dict) -> str:
    """The instruction sets that decide which precision pays (bf16 and int8 kernels)."""
    def yn(*keys):
        return "yes" if any(cpu.get(k) for k in keys) else "no"
    return (f"AVX2 {yn('avx2')}, AVX-512 {yn('avx512f')}, AVX512-BF16 {yn('avx512_bf16')}, "
            f"VNNI {yn('vnni', 'avx512_vnni', 'avx_vnni')}, AMX {yn('amx')}")


def peer_lines(result: dict) -> list[str]:
    """The peer block: every column's best whole image and peak RSS, and each cpuflow
    configuration's time as a multiple of the fastest peer's (issue 15's target: <= 0.7x)."""
    cmp_ = result.get("peer_comparison")
    if not cmp_:
        return []
    s = result["settings"]
    out = ["", f"  one image, end to end: best of {s.get('rounds', 1)} round(s) x {s['repeat']} (CPU: "
               f"{isa_line(result['machine']['cpu'])})"]
    width = max(len(c["id"]) for c in result["configs"])
    for c in result["configs"]:
        st = c["stages"].get("e2e") or {}
        what = {"cpuflow": "cpuflow", "reference": "diffusers fp32 (PyTorch)"}.get(c["kind"], c.get("label", ""))
        best = "error" if st.get("error") and st.get("min_s") is None else fmt_s(st.get("min_s"))
        rss = "-" if st.get("peak_rss_gib") is None else f"{st['peak_rss_gib']:.2f} GiB"
        out.append(f"    {c['id'].ljust(width)}  {best:>7} s  {rss:>10}  {what}")
    target = cmp_["target_ratio"]
    for cid, row in cmp_["cpuflow"].items():
        verdict = "met" if row["met"] else f"missed by {row['ratio'] - target:.2f}"
        rss = ""
        if row["rss_not_higher"] is not None:
            rss = (f"; peak RSS {row['peak_rss_gib']:.2f} vs {cmp_['fastest_peer_peak_rss_gib']:.2f} GiB "
                   f"({'not higher' if row['rss_not_higher'] else 'higher'})")
        out.append(f"  {cid} / fastest peer ({cmp_['fastest_peer']}): x{row['ratio']:.2f} "
                   f"(target <= x{target:g}: {verdict}){rss}")
    return out


def write_json(result: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- chart
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (188, 189, 34), (23, 190, 207))
TORCH_COLOR = (127, 127, 127)


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def write_chart(result: dict, path: str | os.PathLike) -> Path:
    """Bar chart of the medians (min..max as a line), one panel per stage."""
    from PIL import Image, ImageDraw

    cols = result["configs"]
    ratios = result.get("ratios") or {}
    panels: list[tuple[str, list[tuple[str, Any, Any, Any, str]], str]] = []
    for key, _ in STAGE_ROWS:
        bars = []
        for c in cols:
            st = _stage_of(c, key)
            if st is not None:
                r = (ratios.get(c["id"]) or {}).get(key)
                bars.append((c["id"] if c["kind"] != "reference" else "torch", st.get("median_s"), st.get("min_s"),
                             st.get("max_s"), "" if r is None else f"  (x{r:.2f} vs torch)"))
        if any(b[1] for b in bars):
            panels.append((stage_label(key, result) + ", seconds", bars, "s"))
    rss = []
    for c in cols:
        st = _stage_of(c, "e2e") or _stage_of(c, "load_second") or _stage_of(c, "load_first")
        if st is not None and st.get("peak_rss_gib"):
            rss.append((c["id"] if c["kind"] != "reference" else "torch", st["peak_rss_gib"], None, None, ""))
    if rss:
        panels.append(("peak RSS of a whole image (or a load), GiB", rss, "GiB"))

    W, left, right, bar_h, gap, title_h, pad = 1000, 240, 240, 22, 6, 28, 14
    f_title, f_text, f_head = _font(15), _font(13), _font(17)
    s = result["settings"]
    header = (f"cpuflow bench: {result['model']['name']}, {s['width']}x{s['height']}, {s['steps']} steps, "
              f"guidance {s['guidance']:g}, threads {s['threads'] or result['machine']['threads']['default']}")
    sub = (result["machine"]["cpu_summary"][:110] + "  |  bar: median, line: min-max")
    H = 70 + sum(title_h + len(b) * (bar_h + gap) + pad for _, b, _ in panels) + 10
    img = Image.new("RGB", (W, max(H, 120)), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 10), header, fill="black", font=f_head)
    d.text((pad, 34), sub, fill=(90, 90, 90), font=f_text)
    colors = {}
    for i, c in enumerate(cols):
        colors[c["id"] if c["kind"] != "reference" else "torch"] = (TORCH_COLOR if c["kind"] == "reference"
                                                                    else PALETTE[i % len(PALETTE)])
    y = 64
    span = W - left - right
    for title, bars, unit in panels:
        d.text((pad, y + 4), title, fill="black", font=f_title)
        y += title_h
        top = max((b[3] or b[1] or 0.0) for b in bars) or 1.0
        for name, med, lo, hi, extra in bars:
            d.text((pad + 8, y + 3), name[:32], fill="black", font=f_text)
            if med:
                x1 = left + int(span * med / top)
                d.rectangle([left, y, max(x1, left + 1), y + bar_h], fill=colors.get(name, (60, 60, 60)))
                if lo is not None and hi is not None and hi > lo:
                    xa, xb = left + int(span * lo / top), left + int(span * hi / top)
                    cy = y + bar_h // 2
                    d.line([xa, cy, xb, cy], fill="black", width=2)
                    d.line([xa, cy - 5, xa, cy + 5], fill="black", width=2)
                    d.line([xb, cy - 5, xb, cy + 5], fill="black", width=2)
                label = f"{fmt_s(med)} {unit}{extra}"
                d.text((left + int(span * (hi or med) / top) + 6, y + 3), label, fill="black", font=f_text)
            else:
                d.text((left + 6, y + 3), "error / not run", fill=(200, 0, 0), font=f_text)
            y += bar_h + gap
        d.line([left, y - gap - len(bars) * (bar_h + gap), left, y - gap], fill="black", width=1)
        y += pad
    path = Path(path)
    img.save(path, format="PNG")
    return path
