"""econoserve: the EconoServe LLM-serving scheduler, its workloads, simulator and vLLM adapter.

See ``README.md`` for the two set-up commands and ``../shared/PAPER.md`` for the system.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("econoserve")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
