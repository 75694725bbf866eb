"""cpuflow: Stable Diffusion on a CPU, from an exported folder, without torch."""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import cpuflow` stays light (no backend is imported until used).
    if name == "Pipeline":
        from .api import Pipeline
        return Pipeline
    if name == "GenerationRequest":
        from .config import GenerationRequest
        return GenerationRequest
    raise AttributeError(name)
