"""Routers: which replica of a cluster serves an arriving request, written once like the policies.

A router sees each replica only through :class:`RoutingView` (estimated outstanding work and
predicted KV occupancy, from *predicted* lengths: never a request's true output length) and the
request's expected size (:meth:`RoutingView.expected_request_tokens`). Ties go to the lowest
replica index, so routing is deterministic. A one-replica cluster is the trivial case: every
router returns 0.

Adding a router: subclass :class:`Router` in its own module, set ``name``, implement
:meth:`Router.route`, and pass the class to :func:`register_router`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Protocol, Sequence

from econoserve.errors import UserError


class RoutingView(Protocol):
    """What a router may read of a replica."""

    @property
    def outstanding_tokens(self) -> int:
        """Estimated tokens still to compute for its unfinished requests [tokens]."""

    @property
    def predicted_kv_tokens(self) -> int:
        """KV its unfinished requests would hold at their expected lengths [tokens]."""

    @property
    def kv_capacity_tokens(self) -> int:
        """Its KV cache [tokens]."""

    def expected_request_tokens(self, row: int) -> int:
        """Prompt + expected output of the request in trace row ``row`` on this replica [tokens]."""


class Router(ABC):
    """Chooses a replica for each arriving request; may keep state (round-robin's cursor)."""

    name: ClassVar[str] = "base"

    @abstractmethod
    def route(self, row: int, replicas: Sequence[RoutingView]) -> int:
        """The index of the replica that serves the request in trace row ``row``."""


class RoundRobinRouter(Router):
    """Replicas in turn, regardless of load."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def route(self, row: int, replicas: Sequence[RoutingView]) -> int:
        choice = self._next % len(replicas)
        self._next = choice + 1
        return choice


class LeastOutstandingTokensRouter(Router):
    """The replica with the fewest estimated tokens still to compute (least loaded)."""

    name = "least-outstanding-tokens"

    def route(self, row: int, replicas: Sequence[RoutingView]) -> int:
        best, best_load = 0, None
        for index, replica in enumerate(replicas):
            load = replica.outstanding_tokens
            if best_load is None or load < best_load:
                best, best_load = index, load
        return best


class KVAwareRouter(Router):
    """The replica whose predicted KV occupancy (its unfinished requests plus this one, at their
    predicted lengths, over its capacity) would be lowest; suits replicas of different sizes."""

    name = "kv-aware"

    def route(self, row: int, replicas: Sequence[RoutingView]) -> int:
        best, best_share = 0, None
        for index, replica in enumerate(replicas):
            share = (replica.predicted_kv_tokens + replica.expected_request_tokens(row)) / replica.kv_capacity_tokens
            if best_share is None or share < best_share:
                best, best_share = index, share
        return best


#: Every registered router, by name.
ROUTERS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Add a router class to the registry (usable as a decorator); returns it."""
    ROUTERS[cls.name] = cls
    return cls


for _router in (RoundRobinRouter, LeastOutstandingTokensRouter, KVAwareRouter):
    register_router(_router)


def router_names() -> tuple[str, ...]:
    return tuple(ROUTERS)


def make_router(name: str) -> Router:
    """A fresh router ``name``; an unknown name is a :class:`UserError` listing the choices."""
    try:
        return ROUTERS[name]()
    except KeyError:
        raise UserError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}") from None
