"""Validation of what is loaded and what is generated: one rule set for CLI, API and server."""
import math

import pytest

from cpuflow.config import GenerationRequest, LoadConfig
from cpuflow.errors import InvalidArgument, ResourceLimitError


@pytest.mark.parametrize("kw, msg", [
    ({"width": 500}, "width must be a multiple of 8, got 500"),
    ({"height": 0}, "height must be positive"),
    ({"width": -64}, "width must be positive"),
    ({"width": 64.5}, "width must be a whole number"),
    ({"steps": 0}, "steps must be between 1 and 1000, got 0"),
    ({"steps": 5000}, "steps must be between 1 and 1000"),
    ({"guidance": math.nan}, "guidance must be finite"),
    ({"guidance": math.inf}, "guidance must be finite"),
    ({"guidance": -1}, "guidance must be between 0"),
    ({"strength": 1.5}, "strength must be between 0 and 1"),
    ({"strength": -0.1}, "strength must be between 0 and 1"),
    ({"seed": -1}, "seed must be between 0 and 4294967295"),
    ({"seed": 2**32}, "seed must be between 0 and 4294967295"),
    ({"n_samples": 0}, "n_samples must be between 1"),
    ({"sampler": "bogus"}, "sampler must be one of ddim"),
    ({"schedule": "cosine"}, "schedule must be one of default, karras"),
    ({"eta": 2}, "eta must be between 0 and 1"),
    ({"prompt": ("a", "b"), "negative_prompt": ("x", "y", "z")}, "negative_prompt has 3 entries but prompt has 2"),
    ({"prompt": 5}, "prompt must be a string"),
])
def test_bad_requests_name_field_value_and_rule(kw, msg):
    kw = {"prompt": "a cat", **kw}
    with pytest.raises(InvalidArgument) as e:
        GenerationRequest(**kw)
    assert msg in str(e.value)


def test_pixel_budget_is_a_resource_limit():
    with pytest.raises(ResourceLimitError):
        GenerationRequest(prompt="x", width=4096, height=4096)


def test_random_seed_is_recorded_and_in_range():
    r = GenerationRequest(prompt="x").with_seed()
    assert 0 <= r.seed <= 2**32 - 1
    assert r.with_seed().seed == r.seed


def test_prompt_lists_and_negative_broadcast():
    r = GenerationRequest(prompt=("a", "b"), negative_prompt="ugly")
    assert r.prompts == ("a", "b") and r.negative_prompts == ("ugly", "ugly")


@pytest.mark.parametrize("kw, msg", [
    ({"backend": "tensorflow"}, "backend must be one of openvino, onnxruntime"),
    ({"device": "tpu"}, "device must be one of auto, cpu, cuda"),
    ({"precision": "fp8"}, "precision must be one of auto, bf16, f32"),
    ({"threads": 0}, "threads must be between 1 and 1024"),
    ({"backend": "openvino", "device": "cuda"}, "use --backend onnxruntime"),
    ({"backend": "onnxruntime", "precision": "bf16"}, "use --backend openvino"),
])
def test_bad_load_configs(kw, msg):
    with pytest.raises(InvalidArgument) as e:
        LoadConfig(**kw)
    assert msg in str(e.value)
