"""The runtime never imports torch (nor diffusers, nor transformers)."""
import subprocess
import sys
import textwrap

from conftest import ROOT

FORBIDDEN = ("torch", "diffusers", "transformers", "onnx", "nncf")


def test_runtime_imports_without_torch():
    code = textwrap.dedent(f"""
        import sys
        import cpuflow, cpuflow.api, cpuflow.cli, cpuflow.config, cpuflow.manifest, cpuflow.image
        import cpuflow.tokenizer, cpuflow.rng, cpuflow.samplers, cpuflow.schedules, cpuflow.denoiser
        import cpuflow.pipelines.generate, cpuflow.pipelines.model, cpuflow.pipelines.stages
        import cpuflow.backends.base, cpuflow.backends.openvino_backend, cpuflow.backends.onnxruntime_backend
        import cpuflow.batch, cpuflow.batch.local, cpuflow.batch.ray_pool, cpuflow.batch.model_transfer
        import cpuflow.server.request
        from click.testing import CliRunner
        r = CliRunner().invoke(cpuflow.cli.main, ["--help"])
        assert r.exit_code == 0, r.output
        bad = sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})
        print("LOADED:", bad)
        assert not bad, bad
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_runtime_works_with_torch_unimportable(tmp_path):
    """Simulate a machine without torch: a meta-path hook makes importing it fail."""
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in {FORBIDDEN!r}:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from click.testing import CliRunner
        import cpuflow.cli
        r = CliRunner().invoke(cpuflow.cli.main, ["export", "x", "y"])
        print(r.output)
        assert r.exit_code == 4, r.exit_code
        assert "export extra" in r.output
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
