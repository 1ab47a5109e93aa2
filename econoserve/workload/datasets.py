"""Real datasets as request tables, and traces built from them.

:func:`load_requests` turns a registered dataset into one row per request (no arrivals yet):

``source_index``    0-based record index in the source file (conversation / meeting / row)
``prompt_text``     the prompt (absent for the Azure and Mooncake traces, which have no text)
``response_text``   the reference response (absent where there is no text)
``prompt_tokens``   prompt length [tokens] in the chosen tokenizer (or from the trace)
``output_tokens``   reference response length [tokens]
``dataset``         the dataset name
``timestamp_s``     arrival time [s] since the first record (timestamped traces only)
``split``           QMSum's train/val/test split (QMSum only)

Request families (PAPER.md, "Workloads"):

* ``alpaca``: short prompt, short response. Prompt = ``instruction``, plus ``"\\n\\n" + input``
  when the input is non-empty; response = ``output``. Records with an empty output are dropped.
* ``sharegpt``: conversational, long responses. The filter of vLLM's serving benchmark
  (``benchmarks/benchmark_serving.py``, ``sample_sharegpt_requests``): keep conversations with at
  least two turns, prompt = turn 1, response = turn 2; drop pairs whose prompt or response is
  shorter than 4 tokens, whose prompt is longer than 1024 tokens, or whose prompt + response is
  longer than 2048 tokens (:class:`ShareGPTFilter`, in the chosen tokenizer).
* ``qmsum``: long prompt, short response (stands in for BookCorpus). ``context="span"``
  (default): each query-specific question with the transcript turns QMSum marks relevant to it;
  ``context="full"``: every query (general and specific) with the whole meeting transcript
  (about 11k tokens, beyond most models' context). Prompt = context + ``"\\n\\nQuery: "`` + query;
  response = the reference answer.
* ``azure-conv`` / ``azure-code``: the Azure LLM inference traces 2023 (token counts and real
  timestamps, no text).
* ``mooncake``: the Mooncake conversation trace (token counts, real timestamps, no text).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from econoserve import __version__
from econoserve.errors import DataError, UserError
from econoserve.workload.arrivals import (
    ARRIVAL_PROCESSES,
    gamma_arrivals,
    poisson_arrivals,
    replay_arrivals,
)
from econoserve.workload.registry import cache_dir, dataset_path, get_entry
from econoserve.workload.tokenizer import TOKENIZER_NAMES, load_tokenizer
from econoserve.workload.trace import Trace

TEXT_DATASETS: tuple[str, ...] = ("alpaca", "sharegpt", "qmsum")
TIMESTAMPED_DATASETS: tuple[str, ...] = ("azure-conv", "azure-code", "mooncake")
DATASETS: tuple[str, ...] = TEXT_DATASETS + TIMESTAMPED_DATASETS
VICUNA_TEMPERATURES: tuple[str, ...] = ("L_t0.0", "L_t0.3", "L_t0.5", "L_t0.7")

#: Bump when a loader's output changes, so cached request tables are rebuilt.
LOADER_VERSION = 1


@dataclass(frozen=True)
class ShareGPTFilter:
    """vLLM serving-benchmark filter for ShareGPT pairs (all lengths in tokens)."""

    min_prompt_tokens: int = 4
    min_output_tokens: int = 4
    max_prompt_tokens: int = 1024
    max_total_tokens: int = 2048


@dataclass(frozen=True)
class LoadOptions:
    """Dataset-specific choices of :func:`load_requests` (documented in the module docstring)."""

    sharegpt_filter: ShareGPTFilter = ShareGPTFilter()
    qmsum_context: str = "span"


# --------------------------------------------------------------------- request tables
def load_requests(
    dataset: str,
    tokenizer: str = "llama2",
    options: LoadOptions = LoadOptions(),
    use_cache: bool = True,
) -> pd.DataFrame:
    """Every request of ``dataset`` (see the module docstring for columns and filters).

    Tokenized tables are cached under ``data/cache/requests/`` keyed by the source file's sha256,
    the tokenizer, the options and :data:`LOADER_VERSION`, since tokenizing ShareGPT takes a while.
    """
    _check_name("dataset", dataset, DATASETS)
    if dataset in TEXT_DATASETS:
        _check_name("tokenizer", tokenizer, TOKENIZER_NAMES)
    cache_path = _cache_path(dataset, tokenizer, options)
    if use_cache and cache_path.is_file():
        try:
            return pq.read_table(cache_path).to_pandas()
        except (pa.ArrowException, OSError):
            cache_path.unlink(missing_ok=True)  # a torn cache file: rebuild it
    frame = _LOADERS[dataset](dataset_path(dataset), dataset, tokenizer, options)
    if use_cache:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
        tmp.replace(cache_path)
    return frame


def _cache_path(dataset: str, tokenizer: str, options: LoadOptions) -> Path:
    token_source = tokenizer if dataset in TEXT_DATASETS else "counts"
    key = json.dumps(
        [get_entry(dataset).sha256, token_source, asdict(options), LOADER_VERSION], sort_keys=True
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "requests" / f"{dataset}-{token_source}-{digest}.parquet"


def _load_alpaca(path: Path, dataset: str, tokenizer: str, options: LoadOptions) -> pd.DataFrame:
    records = _read_json(path)
    frame = pd.DataFrame(
        {
            "source_index": np.arange(len(records), dtype=np.int64),
            "prompt_text": [alpaca_prompt(r["instruction"], r["input"]) for r in records],
            "response_text": [r["output"] for r in records],
        }
    )
    return _tokenize_and_drop_empty(frame, tokenizer, dataset)


def alpaca_prompt(instruction: str, input_text: str) -> str:
    """The Alpaca prompt of this package: the instruction, then the input after a blank line."""
    return f"{instruction}\n\n{input_text}" if input_text.strip() else instruction


def _load_sharegpt(path: Path, dataset: str, tokenizer: str, options: LoadOptions) -> pd.DataFrame:
    conversations = _read_json(path)
    pairs = [
        (index, conv["conversations"][0]["value"], conv["conversations"][1]["value"])
        for index, conv in enumerate(conversations)
        if len(conv.get("conversations", [])) >= 2
    ]
    frame = pd.DataFrame(pairs, columns=["source_index", "prompt_text", "response_text"])
    frame = _tokenize(frame, tokenizer, dataset)
    rule = options.sharegpt_filter
    keep = (
        (frame["prompt_tokens"] >= rule.min_prompt_tokens)
        & (frame["output_tokens"] >= rule.min_output_tokens)
        & (frame["prompt_tokens"] <= rule.max_prompt_tokens)
        & (frame["prompt_tokens"] + frame["output_tokens"] <= rule.max_total_tokens)
    )
    return frame[keep].reset_index(drop=True)


#: Added to each length by DistServe's ShareGPT preparation: Hugging Face's OPT tokenizer puts
#: a ``</s>`` (BOS) token before every text it encodes [tokens].
DISTSERVE_OPT_BOS_TOKENS = 1


def load_distserve_sharegpt(seed: int = 0, use_cache: bool = True) -> pd.DataFrame:
    """ShareGPT as DistServe prepares it (``evaluation/2-benchmark-serving/0-prepare-dataset.py``,
    defaults), for comparing with DistServe's own results; columns as :func:`load_requests`.

    Conversations of at least 3 turns; prompt = the first ``k`` turns joined by newlines, ``k``
    drawn by Python's ``random.randint(1, min(turns - 1, 1000))`` (seeded ``seed``, one draw per
    kept conversation, in file order, as DistServe draws it); response = turn ``k + 1``. Lengths
    in OPT's tokenizer (GPT-2's BPE plus its BOS token, :data:`DISTSERVE_OPT_BOS_TOKENS`); drops
    pairs where both lengths are below 4 or prompt + response >= 2048 tokens.
    """
    import random

    cache_path = cache_dir() / "requests" / f"sharegpt-distserve-{get_entry('sharegpt').sha256[:16]}-{seed}-v{LOADER_VERSION}.parquet"
    if use_cache and cache_path.is_file():
        return pq.read_table(cache_path).to_pandas()
    draw = random.Random(seed)
    rows = []
    for index, conversation in enumerate(_read_json(dataset_path("sharegpt"))):
        turns = [turn["value"] for turn in conversation.get("conversations", [])]
        if len(turns) < 3:
            continue
        k = draw.randint(1, min(len(turns) - 1, 1000))
        rows.append((index, "\n".join(turns[:k]), turns[k]))
    frame = _tokenize(pd.DataFrame(rows, columns=["source_index", "prompt_text", "response_text"]), "opt", "sharegpt")
    frame["prompt_tokens"] += DISTSERVE_OPT_BOS_TOKENS
    frame["output_tokens"] += DISTSERVE_OPT_BOS_TOKENS
    prompt, output = frame["prompt_tokens"], frame["output_tokens"]
    frame = frame[~((prompt < 4) & (output < 4)) & (prompt + output < 2048)].reset_index(drop=True)
    if use_cache:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), cache_path)
    return frame


def _load_qmsum(path: Path, dataset: str, tokenizer: str, options: LoadOptions) -> pd.DataFrame:
    if options.qmsum_context not in ("span", "full"):
        raise UserError(f"qmsum context must be 'span' or 'full', got {options.qmsum_context!r}")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for meeting_index, line in enumerate(handle):
            meeting = json.loads(line)
            turns = [f"{t['speaker']}: {t['content']}" for t in meeting["meeting_transcripts"]]
            for query, answer, context in _qmsum_queries(meeting, turns, options.qmsum_context):
                rows.append((meeting_index, meeting["split"], f"{context}\n\nQuery: {query}", answer))
    frame = pd.DataFrame(rows, columns=["source_index", "split", "prompt_text", "response_text"])
    return _tokenize_and_drop_empty(frame, tokenizer, dataset)


def _qmsum_queries(meeting: dict, turns: list[str], context: str):
    if context == "full":
        transcript = "\n".join(turns)
        for item in meeting["general_query_list"] + meeting["specific_query_list"]:
            yield item["query"], item["answer"], transcript
        return
    for item in meeting["specific_query_list"]:
        spans = [turns[int(start) : int(end) + 1] for start, end in item["relevant_text_span"]]
        yield item["query"], item["answer"], "\n".join(turn for span in spans for turn in span)


def _load_azure(path: Path, dataset: str, tokenizer: str, options: LoadOptions) -> pd.DataFrame:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    try:
        stamps = np.array([_azure_timestamp(r["TIMESTAMP"]) for r in rows])
        frame = pd.DataFrame(
            {
                "source_index": np.arange(len(rows), dtype=np.int64),
                "prompt_tokens": np.array([int(r["ContextTokens"]) for r in rows], dtype=np.int64),
                "output_tokens": np.array([int(r["GeneratedTokens"]) for r in rows], dtype=np.int64),
                "timestamp_s": stamps - stamps.min(),
            }
        )
    except (KeyError, ValueError) as exc:
        raise DataError(f"{path}: not an Azure LLM inference trace CSV ({exc})") from None
    return _drop_nonpositive(frame, dataset)


def _azure_timestamp(text: str) -> float:
    # "2023-11-16 18:15:46.6805900": seven fractional digits, more than datetime parses.
    whole, _, fraction = text.partition(".")
    seconds = datetime.fromisoformat(whole).timestamp()
    return seconds + (float(f"0.{fraction}") if fraction else 0.0)


def _load_mooncake(path: Path, dataset: str, tokenizer: str, options: LoadOptions) -> pd.DataFrame:
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    stamps = np.array([r["timestamp"] for r in records], dtype=float) / 1000.0
    frame = pd.DataFrame(
        {
            "source_index": np.arange(len(records), dtype=np.int64),
            "prompt_tokens": np.array([r["input_length"] for r in records], dtype=np.int64),
            "output_tokens": np.array([r["output_length"] for r in records], dtype=np.int64),
            "timestamp_s": stamps - stamps.min(),
        }
    )
    return _drop_nonpositive(frame, dataset)


def _tokenize(frame: pd.DataFrame, tokenizer: str, dataset: str) -> pd.DataFrame:
    encoder = load_tokenizer(tokenizer)
    frame = frame.copy()
    frame["prompt_tokens"] = encoder.count(frame["prompt_text"].tolist())
    frame["output_tokens"] = encoder.count(frame["response_text"].tolist())
    frame["dataset"] = dataset
    return frame


def _tokenize_and_drop_empty(frame: pd.DataFrame, tokenizer: str, dataset: str) -> pd.DataFrame:
    return _drop_nonpositive(_tokenize(frame, tokenizer, dataset), dataset)


def _drop_nonpositive(frame: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Drop requests with an empty prompt or response: a trace needs both to be >= 1 token."""
    frame = frame.copy()
    frame["dataset"] = dataset
    keep = (frame["prompt_tokens"] > 0) & (frame["output_tokens"] > 0)
    return frame[keep].reset_index(drop=True)


_LOADERS: dict[str, Callable[[Path, str, str, LoadOptions], pd.DataFrame]] = {
    "alpaca": _load_alpaca,
    "sharegpt": _load_sharegpt,
    "qmsum": _load_qmsum,
    "azure-conv": _load_azure,
    "azure-code": _load_azure,
    "mooncake": _load_mooncake,
}


def load_vicuna_lengths(split: str) -> pd.DataFrame:
    """Vicuna-7B response lengths [tokens] for Alpaca prompts (Zheng et al., NeurIPS 2023).

    Columns: ``source_index`` (0-based Alpaca index = file ``id`` - 1), ``L_gt`` (reference answer
    length), ``L_t0.0`` ... ``L_t0.7`` (lengths Vicuna-7B generated at each temperature, capped at
    512), ``L_max`` (max over the four temperatures, the target of their Acc-50/Acc-100 protocol).
    """
    _check_name("split", split, ("train", "val"))
    records = _read_json(dataset_path(f"vicuna7b-alpaca-{split}"))
    frame = pd.DataFrame(records)
    frame["source_index"] = frame.pop("id").astype(np.int64) - 1
    columns = ["source_index", "L_gt", *VICUNA_TEMPERATURES]
    frame = frame[columns].astype(np.int64)
    frame["L_max"] = frame[list(VICUNA_TEMPERATURES)].max(axis=1)
    return frame


# --------------------------------------------------------------------- traces
@dataclass(frozen=True)
class TraceSpec:
    """Everything that determines a built trace: same spec, same bytes."""

    dataset: str
    tokenizer: str = "llama2"
    num_requests: int | None = 1000
    arrival: str = "poisson"
    rate_rps: float | None = 1.0
    cv: float | None = None
    seed: int = 0
    replay_source: str | None = None
    include_text: bool = True
    options: LoadOptions = LoadOptions()


def build_trace(spec: TraceSpec) -> Trace:
    """Sample ``spec.num_requests`` requests of ``spec.dataset`` and give them arrival times.

    * ``poisson`` / ``gamma``: requests are drawn without replacement (seeded), in random order,
      and arrive by the seeded process at ``rate_rps`` (``gamma`` with CV ``cv``).
    * ``replay``: real timestamps. For a timestamped dataset, the first ``num_requests`` requests
      in time order keep their own timestamps; a text dataset borrows the timestamps of
      ``replay_source`` (e.g. ``azure-conv``) for a seeded sample of its requests. With
      ``rate_rps`` set, time is scaled to that mean rate.
    """
    _check_spec(spec)
    requests = load_requests(spec.dataset, spec.tokenizer, spec.options)
    sample_rng, arrival_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(2))
    num_requests = _requested_count(spec, len(requests))

    if spec.arrival == "replay" and spec.replay_source is None:
        chosen = requests.sort_values("timestamp_s", kind="stable").iloc[:num_requests]
        arrivals = replay_arrivals(chosen["timestamp_s"].to_numpy(), spec.rate_rps)
    else:
        chosen = requests.iloc[sample_rng.permutation(len(requests))[:num_requests]]
        arrivals = _arrivals(spec, num_requests, arrival_rng)

    frame = pd.DataFrame(
        {
            "request_id": np.arange(num_requests, dtype=np.int64),
            "arrival_time_s": arrivals,
            "prompt_tokens": chosen["prompt_tokens"].to_numpy(),
            "output_tokens": chosen["output_tokens"].to_numpy(),
            "dataset": spec.dataset,
        }
    )
    if spec.include_text and "prompt_text" in chosen:
        frame["prompt_text"] = chosen["prompt_text"].to_numpy()
    return Trace.from_frame(frame, _trace_metadata(spec, num_requests), source=f"<{spec.dataset} trace>")


def _arrivals(spec: TraceSpec, num_requests: int, rng: np.random.Generator) -> np.ndarray:
    if spec.arrival == "poisson":
        return poisson_arrivals(num_requests, spec.rate_rps, rng)
    if spec.arrival == "gamma":
        return gamma_arrivals(num_requests, spec.rate_rps, spec.cv, rng)
    source = load_requests(spec.replay_source).sort_values("timestamp_s", kind="stable")
    if len(source) < num_requests:
        raise UserError(
            f"replay source {spec.replay_source} has {len(source)} timestamps; {num_requests} requests asked"
        )
    return replay_arrivals(source["timestamp_s"].to_numpy()[:num_requests], spec.rate_rps)


def _check_spec(spec: TraceSpec) -> None:
    _check_name("dataset", spec.dataset, DATASETS)
    _check_name("tokenizer", spec.tokenizer, TOKENIZER_NAMES)
    _check_name("arrival", spec.arrival, ARRIVAL_PROCESSES)
    if spec.num_requests is not None and spec.num_requests <= 0:
        raise UserError(f"--num-requests must be a positive integer, got {spec.num_requests}")
    if spec.arrival in ("poisson", "gamma") and spec.rate_rps is None:
        raise UserError(f"--arrival {spec.arrival} needs --rate (requests per second)")
    if spec.arrival == "gamma" and spec.cv is None:
        raise UserError("--arrival gamma needs --cv (coefficient of variation of inter-arrival gaps)")
    if spec.arrival != "gamma" and spec.cv is not None:
        raise UserError(f"--cv applies to --arrival gamma only, not {spec.arrival}")
    if spec.arrival != "replay" and spec.replay_source is not None:
        raise UserError("--replay-source applies to --arrival replay only")
    if spec.replay_source is not None:
        _check_name("replay source", spec.replay_source, TIMESTAMPED_DATASETS)
    if spec.arrival == "replay" and spec.replay_source is None and spec.dataset not in TIMESTAMPED_DATASETS:
        raise UserError(
            f"{spec.dataset} has no timestamps to replay; add --replay-source "
            f"({' | '.join(TIMESTAMPED_DATASETS)}) to borrow a real trace's arrival times"
        )


def _requested_count(spec: TraceSpec, available: int) -> int:
    if spec.num_requests is None:
        return available
    if spec.num_requests > available:
        raise UserError(
            f"{spec.dataset} has {available} usable requests; --num-requests {spec.num_requests} is more"
        )
    return spec.num_requests


def _trace_metadata(spec: TraceSpec, num_requests: int) -> dict[str, object]:
    spec_fields = asdict(spec)
    spec_fields["num_requests"] = num_requests
    spec_fields["tokenizer"] = spec.tokenizer if spec.dataset in TEXT_DATASETS else "none (source token counts)"
    return {
        "spec": spec_fields,
        "source_sha256": get_entry(spec.dataset).sha256,
        "econoserve_version": __version__,
    }


def _read_json(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot parse ({exc})") from None


def _check_name(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
