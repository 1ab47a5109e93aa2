"""A trace as a ShareGPT-format JSON file, for ``vllm bench serve --dataset-name sharegpt``.

vLLM's benchmark client reads ShareGPT files (a list of ``{"conversations": [{"from": "human",
"value": PROMPT}, {"from": "gpt", "value": ANSWER}, ...]}``) and asks for as many output tokens
as the answer has under the served tokenizer. :func:`write_sharegpt` writes each request of a
trace with text as one conversation: the prompt is the trace's ``prompt_text``, the answer a
filler text of exactly ``output_tokens`` tokens (:data:`FILLER_WORD` repeated: one token each
under GPT-2/OPT's byte-level BPE), so the client requests the trace's response lengths.
"""

from __future__ import annotations

import json
from pathlib import Path

from econoserve.errors import TraceError
from econoserve.workload.trace import Trace

#: A word that is one token under GPT-2/OPT's BPE, alone and after a space.
FILLER_WORD = "hello"


def filler_text(num_tokens: int) -> str:
    """``num_tokens`` tokens of :data:`FILLER_WORD` (``"hello hello ..."``)."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    return " ".join([FILLER_WORD] * num_tokens)


def write_sharegpt(trace: Trace, path: str | Path) -> Path:
    """Write ``trace`` (with its ``prompt_text``) as a ShareGPT JSON file; returns the path."""
    if not trace.has_text:
        raise TraceError("a ShareGPT file needs the trace's prompt_text column (build the trace from a text dataset)")
    requests = trace.requests
    conversations = [
        {"id": str(request_id), "conversations": [
            {"from": "human", "value": prompt}, {"from": "gpt", "value": filler_text(int(output))}]}
        for request_id, prompt, output in zip(requests["request_id"], requests["prompt_text"], requests["output_tokens"])
    ]  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(conversations))
    return path
