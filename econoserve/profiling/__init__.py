"""Measuring step times on real hardware without vLLM, and fitting the simulator to them.

* :mod:`.torch_steps` — :func:`~.torch_steps.profile_torch_steps`: a real architecture with
  random weights on PyTorch + ``transformers`` alone (GPU or CPU), timed over a batch-composition
  grid, written as the step-time table the latency fit reads.
* :mod:`.commands` — ``econoserve profile-gpu`` (that profiler) and ``econoserve calibrate``
  (the roofline's factors fitted to any measured step table, with its error before and after).

PyTorch is imported only inside functions: the package imports without it.
"""
