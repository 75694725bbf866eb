"""`cpuflow bench`: per-stage latency and peak memory, side by side with torch.

* :mod:`.runner` plans the configurations x stages and runs each in a worker
  process of its own (:mod:`.worker`), so peak RSS figures never mix and
  first / second starts are honest;
* :mod:`.report` prints the table and writes the JSON and the PNG chart;
* :mod:`.cli` is the click command mounted as ``cpuflow bench``.

The torch reference (diffusers on the same weights) lives in the export stage
(``export/bench_reference.py``) and is imported only inside a worker process
started for ``--reference torch``. Nothing here imports torch. The peers
(``--reference genai`` / ``optimum-intel``) are in :mod:`.peers` (GenAI, imported in
its worker only) and ``export/bench_optimum.py`` (optimum-intel needs torch).
"""
