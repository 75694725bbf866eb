"""A tiny random depth-to-image model (no downloads): the tiny SD 2.x folder
(tests/helpers_tiny.py kind "sd2") with a UNet taking C + 1 = 5 input channels
(latents + depth) and a tiny random DPT depth estimator (transformers
DPTForDepthEstimation: 32 wide, 4 layers, 8-pixel patches, 32x32 input -> 64x64
depth) with a DPT feature extractor config resizing to 32x32, as
stabilityai/stable-diffusion-2-depth is laid out (depth_estimator/, feature_extractor/).

API::

    save_tiny_depth_folder(path, seed=0) -> Path
    tiny_depth_pipeline(path) -> diffusers StableDiffusionDepth2ImgPipeline on those weights
"""
from __future__ import annotations

import json
from pathlib import Path

from helpers_seeded import seeded_modules
from helpers_tiny import assert_same_weights, save_tiny_diffusers_folder

DEPTH_SIZE = 32
DPT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=DEPTH_SIZE,
           patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 32, 32],
           fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5], is_hybrid=False)
PREPROCESSOR = {"do_normalize": True, "do_resize": True, "do_rescale": True, "do_pad": False,
                "ensure_multiple_of": 1, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                "image_processor_type": "DPTImageProcessor", "keep_aspect_ratio": False, "resample": 3,
                "rescale_factor": 1 / 255, "size": {"height": DEPTH_SIZE, "width": DEPTH_SIZE}}


def save_tiny_depth_folder(path, seed: int = 0) -> Path:
    from diffusers import UNet2DConditionModel
    from transformers import DPTConfig, DPTForDepthEstimation

    out = Path(save_tiny_diffusers_folder(path, "sd2", seed))
    cfg = json.loads((out / "unet" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["in_channels"] = 5
    unet, dpt = seeded_modules([(seed + 60, lambda: UNet2DConditionModel(**cfg)),
                                (seed + 61, lambda: DPTForDepthEstimation(DPTConfig(**DPT)))], 50_000 + seed)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    dpt.save_pretrained(out / "depth_estimator", safe_serialization=True)
    assert_same_weights(dpt, DPTForDepthEstimation.from_pretrained(out / "depth_estimator"), "saved DPT")
    (out / "feature_extractor").mkdir(exist_ok=True)
    (out / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    index = json.loads((out / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionDepth2ImgPipeline",
                 depth_estimator=["transformers", "DPTForDepthEstimation"],
                 feature_extractor=["transformers", "DPTImageProcessor"])
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def tiny_depth_pipeline(path):
    """diffusers' StableDiffusionDepth2ImgPipeline on the folder's weights (built from its parts:
    transformers 5 no longer has the DPTFeatureExtractor class real folders name)."""
    import diffusers
    from transformers import DPTForDepthEstimation
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    base = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    fe = DPTImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items() if k != "image_processor_type"})
    pipe = diffusers.StableDiffusionDepth2ImgPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=base.scheduler, depth_estimator=DPTForDepthEstimation.from_pretrained(Path(path) / "depth_estimator"),
        feature_extractor=fe)
    pipe.set_progress_bar_config(disable=True)
    return pipe
