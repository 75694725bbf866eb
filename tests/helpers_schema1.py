"""A manifest-schema-1 folder made from a schema-2 export, for the tests of old
exports (long prompts cut to one chunk, clip skip and embeddings refused with
"re-export") and of the shipped model's re-export (same images as before).

Schema 1's text encoder takes token ids and gives only ``last_hidden_state``;
schema 2's takes token embeddings (the table in ``token_embeddings.npy``) and
gives every layer. The schema-1 graph is the schema-2 one with the table put
back in front as a Gather on the ids (what the old exports' ``token_embedding``
was) and ``hidden_states`` dropped; the UNet's text length is declared 77.
Only the fp32 variants are kept."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from cpuflow.manifest import MANIFEST_NAME, record_all_files, write_manifest


def _token_id_text_encoder(src: Path, dst: Path, table: np.ndarray, n: int) -> None:
    import onnx
    import openvino as ov
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    (emb,) = [i for i in g.input if i.name == "inputs_embeds"]
    g.input.remove(emb)
    g.input.insert(0, helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", n]))
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table, np.float32), "token_table"))
    g.node.insert(0, helper.make_node("Gather", ["token_table", "input_ids"], ["inputs_embeds"], axis=0))
    for o in [o for o in g.output if o.name != "last_hidden_state"]:
        g.output.remove(o)
    dst.mkdir(parents=True, exist_ok=True)
    onnx.save_model(m, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx_data")
    ov.save_model(ov.convert_model(str(dst / "model.onnx")), str(dst / "openvino_model.xml"), compress_to_fp16=False)


def _declare_fixed_text_length(path: Path, n: int) -> None:
    """As the old exports declared it (ONNX Runtime then knows the length when it plans the graph)."""
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    (inp,) = [i for i in m.graph.input if i.name == "encoder_hidden_states"]
    inp.type.tensor_type.shape.dim[1].dim_value = n
    onnx.save(m, str(path))


def schema_1_copy(src: Path, dst: Path) -> Path:
    """``dst``: the schema-2 export ``src`` as a schema-1 export (fp32 variants only)."""
    src, dst = Path(src), Path(dst)
    data = json.loads((src / MANIFEST_NAME).read_text())
    assert data["schema_version"] == 2
    dst.mkdir(parents=True)
    shutil.copytree(src / data["tokenizer"]["path"], dst / data["tokenizer"]["path"])
    comps = {}
    for name, comp in data["components"].items():
        comp = json.loads(json.dumps(comp))
        comp["variants"] = {"fp32": comp["variants"]["fp32"]}
        if name == "text_encoder":
            n = int(data["tokenizer"]["max_length"])
            table = np.load(src / comp["config"]["token_embeddings"]["path"], allow_pickle=False)
            _token_id_text_encoder(src / comp["variants"]["fp32"]["files"]["onnx"][0], dst / "text_encoder",
                                   table, n)
            comp["inputs"] = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", n]}]
            comp["outputs"] = [o for o in comp["outputs"] if o["name"] == "last_hidden_state"]
            comp["config"] = {k: v for k, v in comp["config"].items()
                              if k not in ("default_layer", "hidden_states", "token_embeddings")}
            comp["variants"]["fp32"]["files"] = {"onnx": ["text_encoder/model.onnx", "text_encoder/model.onnx_data"],
                                                 "openvino": ["text_encoder/openvino_model.xml",
                                                              "text_encoder/openvino_model.bin"]}
        else:
            for paths in comp["variants"]["fp32"]["files"].values():
                for rel in paths:
                    (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src / rel, dst / rel)
            for spec in comp["inputs"]:
                if spec["name"] == "encoder_hidden_states":
                    spec["shape"][1] = int(data["tokenizer"]["max_length"])
                    _declare_fixed_text_length(dst / comp["variants"]["fp32"]["files"]["onnx"][0],
                                               spec["shape"][1])
        comps[name] = comp
    data["components"] = comps
    data["schema_version"] = 1
    data.pop("export", None)
    data["export"] = {"created": "2026-01-01T00:00:00+00:00", "tools": {}, "formats": ["onnx", "openvino"],
                      "weights_dtype": "fp32", "forced": False}
    data["files"] = record_all_files(dst)
    write_manifest(dst, data)
    return dst
