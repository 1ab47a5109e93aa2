"""The policy registry: ``make_policy(name, limits, config)``."""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping

from econoserve.errors import UserError
from econoserve.policy.base import EngineLimits, Policy
from econoserve.policy.econoserve import ECONOSERVE_POLICIES
from econoserve.policy.fastgen import FastGenPolicy
from econoserve.policy.orca import OrcaPolicy
from econoserve.policy.sarathi import SarathiPolicy
from econoserve.policy.vllm import VLLMChunkedPolicy, VLLMPolicy
from econoserve.validation import check_field_values

#: Every registered policy, by name.
POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (VLLMPolicy, VLLMChunkedPolicy, OrcaPolicy, SarathiPolicy, FastGenPolicy, *ECONOSERVE_POLICIES)
}


class PolicyConfigError(UserError):
    """An unknown policy name, or a configuration field it does not have, or a bad value.

    (A value of the wrong type is a :class:`~econoserve.validation.ConfigValueError`.)
    """


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Add a policy class to the registry (usable as a decorator); returns it."""
    POLICIES[cls.name] = cls
    return cls


def policy_names() -> tuple[str, ...]:
    return tuple(POLICIES)


def parse_policy_spec(spec: str) -> tuple[str, dict[str, object]]:
    """A scheduler spec, ``name`` or ``name[knob=value,...]``, as its name and configuration
    overrides (each value parsed as JSON, else kept as a string), e.g.
    ``econoserve[ordering_prompt_weight=0,kvcpipe=curve]`` -> ``("econoserve",
    {"ordering_prompt_weight": 0, "kvcpipe": "curve"})``. Names and knobs are not checked here."""
    name, bracket, rest = spec.partition("[")
    if bracket and not rest.endswith("]"):
        raise PolicyConfigError(f"scheduler {spec!r}: overrides go in brackets, name[knob=value,...]")
    options: dict[str, object] = {}
    for item in filter(None, rest[:-1].split(",") if bracket else ()):
        knob, equals, text = item.partition("=")
        if not equals or not knob:
            raise PolicyConfigError(f"scheduler {spec!r}: {item!r} is not knob=value")
        try:
            options[knob] = json.loads(text)
        except json.JSONDecodeError:
            options[knob] = text
    return name, options


def with_engine_max_num_seqs(name: str, overrides: Mapping[str, object] | None, max_num_seqs: int) -> dict[str, object]:
    """Policy ``name``'s configuration ``overrides`` for a run inside an engine that batches at
    most ``max_num_seqs`` requests: a ``max_num_seqs`` knob they leave unset becomes the engine's
    (a policy's own default, 256, stands for vLLM's; inside an engine, vLLM's is known). The vLLM
    drop-in and its simulated counterpart both build their policies with it."""
    config = dict(overrides or {})
    if any(f.name == "max_num_seqs" for f in dataclasses.fields(_policy_class(name).config_class)):
        config.setdefault("max_num_seqs", max_num_seqs)
    return config


def make_config(name: str, config: Mapping[str, object] | object | None = None) -> object:
    """The policy's configuration dataclass, from a mapping of field overrides (or as given)."""
    cls = _policy_class(name)
    config_class = cls.config_class
    if config is None:
        return config_class()
    if isinstance(config, config_class):
        return config
    if not isinstance(config, Mapping):
        raise PolicyConfigError(f"{name}: configuration must be a mapping or {config_class.__name__}")
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise PolicyConfigError(
            f"{name}: unknown option(s) {', '.join(unknown)}; options: {', '.join(sorted(fields))}"
        )
    values = check_field_values(name, config_class, config)  # types first: a str or list never reaches a comparison
    try:
        return config_class(**values)
    except (TypeError, ValueError) as error:
        raise PolicyConfigError(f"{name}: {error}") from None


def make_policy(name: str, limits: EngineLimits, config: Mapping[str, object] | object | None = None) -> Policy:
    """A fresh policy ``name`` for an engine with ``limits``; ``config`` overrides its defaults."""
    return _policy_class(name)(limits, make_config(name, config))


def _policy_class(name: str) -> type[Policy]:
    try:
        return POLICIES[name]
    except KeyError:
        raise PolicyConfigError(f"unknown scheduler {name!r}; choose one of {', '.join(POLICIES)}") from None
