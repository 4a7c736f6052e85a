"""The serving model and its hot swap: follow ``models:/winback@champion`` without disturbing requests.

A background thread asks the registry which version ``champion`` points at every ``poll_seconds``. When it
moved, the new version is loaded beside the old one, warmed up on the errors the old one has seen and tried with a
canary decision (``check``), and only then does one attribute assignment make it the serving model (atomic in
CPython): a request reads ``holder.current`` once and keeps that model to the end, so no request fails or waits
for a swap. Between the steps of a load (the bundle's files when they come from the serving command's mirror, the
warm-up's, each canary merchant), and in a swap at each Python call too, it gives way to the worker's requests in
flight (api/inflight.py), so the requests it overlaps are slowed less. While no model is registered or the
registry is down, decisions come from the rules-only policy (``scorer is None``) and the holder keeps trying.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from model.catalog import ErrorCatalog, catalog_mismatch
from model.policy import RULES_ONLY_VERSION, Scorer
from model.requests import DecisionRequest
from model.rules import Candidate
from service.api.heap import release_free_memory
from service.api.inflight import RequestsInFlight
from service.api.poller import Poller, RetryWait

log = logging.getLogger("winback.api")
#: Longest a start waits for the first load of the champion before it serves rules-only meanwhile.
START_WAIT_SECONDS = 20.0


class ModelSource(Protocol):
    """Where models come from: the registry's champion version, and a way to load one version. A source may also
    have ``has_news() -> bool``: False skips a poll (nothing could have changed since the last one); and
    ``last_known_version() -> str | None``: the champion it last knew and can still load, which a holder serving
    nothing yet loads while the registry has no answer (a worker started during an outage); and ``load_turn()``: a
    context manager within which a swap's load is made, to take turns with the server's other workers."""

    def champion_version(self) -> str | None: ...

    def load(self, version: str) -> Scorer: ...


class VersionedScorer:
    """A scorer that reports the registry's version number, whatever the bundle calls itself."""

    def __init__(self, inner: Any, version: str) -> None:
        self.inner = inner
        self.version = version

    def score(self, request: DecisionRequest, candidates: list[Candidate]) -> np.ndarray:
        """Delegate to the wrapped scorer."""
        result: np.ndarray = self.inner.score(request, candidates)
        return result

    def explain(self, request: DecisionRequest, candidate: Candidate, k: int = 3) -> list[str]:
        """Delegate to the wrapped scorer."""
        reasons: list[str] = self.inner.explain(request, candidate, k)
        return reasons

    @property
    def retryable_threshold(self) -> float:
        """The wrapped scorer's: decide() applies it to the ``retryable`` verdict."""
        return float(self.inner.retryable_threshold)

    def __getattr__(self, name: str) -> Any:
        # Optional attributes decide() looks up with getattr (e.g. code_support) come from the bundle.
        return getattr(self.inner, name)


class MlflowSource:
    """The MLflow registry (imported on first use: MLflow is slow to import). The alias is read through
    ``model.registry_client`` (MLflow alone); ``model.registry``, whose pyfunc side brings LightGBM and scikit-learn
    (seconds of CPU, hundreds of modules), only once a version is to be loaded: an executor worker on a
    registry with no champion yet started without them."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri

    def champion_version(self) -> str | None:
        """The version ``winback@champion`` points at, or None when nothing is promoted yet."""
        from model import registry_client

        return registry_client.get_alias_version(registry_client.CHAMPION, tracking_uri=self.tracking_uri)

    def load(self, version: str) -> Scorer:
        """Download and load one version's bundle."""
        from model import registry

        bundle = registry.load_version(version, tracking_uri=self.tracking_uri)
        return VersionedScorer(bundle, version)


@dataclass(frozen=True)
class _Refusal:
    """Why a loaded version does not serve; ``new`` False: it failed before and its wait is not over."""

    reason: str
    new: bool = True


@dataclass(frozen=True)
class Served:
    """What answers requests right now. ``scorer is None`` means the rules-only policy. ``catalog_mismatch``: the
    model was trained with another error catalog than the one this process serves with (``catalog_mismatch``)."""

    scorer: Scorer | None
    version: str
    since: datetime
    catalog_mismatch: str | None = None


class ModelHolder:
    """Holds the serving model and swaps it when the champion alias moves."""

    def __init__(
        self,
        source: ModelSource | None,
        poll_seconds: float = 10.0,
        on_change: Callable[[Served], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        check: Callable[[Scorer], None] | None = None,
        retry_base_seconds: float | None = None,
        in_flight: RequestsInFlight | None = None,
        catalog: ErrorCatalog | None = None,
    ) -> None:
        self.source = source
        # The error catalog the caller's rules read (with its overlay, if any): every loaded version's features read
        # it too (``use_catalog``), or a code only the overlay defines would be known to the rules, new to the model.
        self.catalog = catalog
        # The worker's requests: a load gives way to them between its steps, and passes ``give_way`` on to the
        # warm-up; a swap also at each Python call (service/api/inflight.py), so it runs in the gaps between requests.
        self.in_flight = in_flight
        # Tries a loaded version before it serves (e.g. a canary decision); raising keeps the serving model.
        self.check = check
        self.poll_seconds = poll_seconds
        # A refused version waits this times 2, 4, 8... before it is tried again: the registry's poll interval, also
        # when the holder looks more often (at a mirror's note every second).
        self._refused = RetryWait(poll_seconds if retry_base_seconds is None else retry_base_seconds)
        self.on_change = on_change
        self.on_error = on_error  # called with the reason of every failed check (a metric counts them)
        self.current = Served(scorer=None, version=RULES_ONLY_VERSION, since=datetime.now(UTC))
        self.last_error: str | None = None
        self.last_check: datetime | None = None
        self._poller: Poller | None = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        """True once a registered model serves (rules-only is a fallback, not readiness)."""
        return self.current.scorer is not None

    def _swap(self, served: Served) -> None:
        self.current = served
        if self.on_change is not None:
            self.on_change(served)

    def refresh(self) -> bool:
        """Check the champion once and swap if it moved; True when the serving model changed. Never raises."""
        if self.source is None:
            return False
        has_news = getattr(self.source, "has_news", None)  # a source that knows when asking again tells nothing
        with contextlib.suppress(Exception):  # if it cannot tell, it is asked, and says why below
            if has_news is not None and not has_news():
                return False
        with self._lock:
            self.last_check = datetime.now(UTC)
            try:
                version = self.source.champion_version()
            except Exception as exc:
                return self._serve_last_known(f"model registry unavailable: {first_line(exc)}")
            if version is None:
                self.last_error = "no model registered as winback@champion yet"
                return False
            if version == self.current.version and self.current.scorer is not None:
                self.last_error = None
                return False
            with self._load_turn():  # to the swap's end: its memory trim and log line are the load's work too
                loaded = self._load(version)
                if isinstance(loaded, _Refusal):
                    return self._refuse(version, loaded) if loaded.new else self._waiting(loaded)
                return self._serve(loaded)

    def _load_turn(self) -> contextlib.AbstractContextManager[object]:
        """The source's ``load_turn()`` for a swap, taken with the server's other workers; a first load serves
        nothing yet and waits for no turn (nor does a source without turns)."""
        load_turn = getattr(self.source, "load_turn", None)
        if load_turn is None or self.current.scorer is None:
            return contextlib.nullcontext()
        turn: contextlib.AbstractContextManager[object] = load_turn()
        return turn

    def _serve_last_known(self, registry_error: str) -> bool:
        """With nothing served yet and no answer from the registry, load the champion the source last knew (a
        mirror's last download): the workers that loaded it before the outage serve it, and a worker started
        during the outage (uvicorn replacing one that died) must not answer rules-only beside them. Either way the
        check is reported once (``_failed``): the registry's error, and why the last known version did not serve
        when it did not."""
        last_known = getattr(self.source, "last_known_version", None)
        if self.current.scorer is not None or last_known is None:
            return self._failed(registry_error)
        try:
            version = last_known()
        except Exception as exc:  # a source that cannot tell either: rules-only, as before
            return self._failed(f"{registry_error}; no last known champion ({first_line(exc)})")
        if version is None:
            return self._failed(registry_error)
        log.warning("the registry has no answer; loading the last known champion, version %s", version,
                    extra={"error": registry_error})  # fmt: skip
        loaded = self._load(version)
        if isinstance(loaded, _Refusal):
            if loaded.new:
                self._refused.failed(version, loaded.reason)
            return self._failed(f"{registry_error}; the last known champion did not serve: {loaded.reason}")
        self._serve(loaded)
        self._failed(registry_error)  # serving again, with the registry still down: /readyz and the counter say so
        return True

    def _load(self, version: str) -> tuple[Served, float] | _Refusal:
        """Load ``version`` beside the serving model and prepare it: (what would serve, when the load started), or
        why it cannot serve (a new failure, or a refusal whose wait is not over). Caller holds the lock."""
        if (refusal := self._refused.waiting(version)) is not None:
            return _Refusal(refusal, new=False)  # refused lately: not loaded again before the wait is over
        assert self.source is not None  # for mypy: refresh returns before any load without a source
        started = time.perf_counter()  # after the wait for a turn (``_load_turn``): the load's own time is logged
        budget = self.in_flight.budget() if self.in_flight is not None else contextlib.nullcontext()
        # At each call too, once a model serves: a first load imports modules, holding their import locks, which a
        # request might wait for.
        each_call: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if self.in_flight is not None and self.current.scorer is not None:
            each_call = self.in_flight.at_each_call()
        with _requests_first(), budget, each_call:
            try:
                scorer = self.source.load(version)
            except Exception as exc:
                return _Refusal(
                    f"champion version {version} could not be loaded ({first_line(exc)}); "
                    f"serving {self.current.version}"
                )
            self._between_steps()
            try:
                self._prepare(scorer)
            except Exception as exc:
                return _Refusal(
                    f"champion version {version} failed before serving ({first_line(exc)}); "
                    f"serving {self.current.version}"
                )
        mismatch = catalog_mismatch(scorer, self.catalog)
        if mismatch is not None:  # once per load: /readyz says it while this version serves
            log.warning("champion version %s was %s", version, mismatch, extra={"model_version": version})
        return Served(scorer=scorer, version=version, since=datetime.now(UTC), catalog_mismatch=mismatch), started

    def _serve(self, loaded: tuple[Served, float]) -> bool:
        """Swap a loaded version in; always True."""
        served, started = loaded
        previous = self.current.version
        self._swap(served)
        self.last_error = None
        self._refused.succeeded()
        self._between_steps()  # malloc_trim below locks malloc's heaps for a few ms: not while requests run
        # The swapped-out model is freed with its last reference (a request may still hold it for a moment),
        # and what the load freed goes back to the OS: it would otherwise stay in the worker's RSS (api/heap.py).
        release_free_memory()
        log.info(
            "serving model version %s (was %s)",
            served.version,
            previous,
            extra={"model_version": served.version, "load_ms": round((time.perf_counter() - started) * 1e3, 1)},
        )
        return True

    def _waiting(self, refusal: _Refusal) -> bool:
        self.last_error = refusal.reason  # said when it was refused; not counted again at every check
        return False

    def _prepare(self, scorer: Scorer) -> None:
        """Warm a loaded version up on the errors the serving one has seen (``warm_up`` and ``seen_errors``, when
        the scorers have them), then ``check`` it: what a first request would build is built here, beside the
        serving model, so no request waits for it after the swap. A scorer with ``use_catalog`` reads the holder's
        catalog first."""
        use_catalog = getattr(scorer, "use_catalog", None)
        if use_catalog is not None and self.catalog is not None:
            use_catalog(self.catalog)
        warm_up = getattr(scorer, "warm_up", None)
        if warm_up is not None:
            seen = getattr(self.current.scorer, "seen_errors", None)
            errors = seen() if seen is not None else []
            if self.in_flight is None:
                warm_up(errors)
            else:
                warm_up(errors, between_steps=self.in_flight.give_way)
            self._between_steps()
        if self.check is not None:
            self.check(scorer)

    def _between_steps(self) -> None:
        if self.in_flight is not None:
            self.in_flight.give_way()

    def _refuse(self, version: str, refusal: _Refusal) -> bool:
        """A version that could not be loaded or failed before serving: ``_failed``, and it waits (``RetryWait``)
        before it is loaded again, a load costing seconds of CPU beside the requests in every worker."""
        self._refused.failed(version, refusal.reason)
        return self._failed(refusal.reason)

    def _failed(self, reason: str) -> bool:
        """Record a failed check (the serving model stays); always False: nothing changed."""
        self.last_error = reason
        log.warning("could not refresh the champion; still serving %s", self.current.version, extra={"error": reason})
        if self.on_error is not None:
            self.on_error(reason)
        return False

    def start(self, wait_seconds: float = START_WAIT_SECONDS) -> None:
        """Load the champion (rules-only if there is none), then keep polling, in a daemon thread.

        Waits up to ``wait_seconds`` for the first load, so a healthy registry's
        champion serves the first request. A registry that does not answer by then (down, black-holed, or
        retrying inside the MLflow client) does not hold the server's start: it answers rules-only, with
        ``/readyz`` false, until the load completes in the poller."""
        if self.on_change is not None:
            self.on_change(self.current)
        if self.source is None or self._poller is not None:
            return
        self._poller = Poller(self.refresh, self.poll_seconds, name="winback-champion-poller")
        if not self._poller.start(wait_seconds):  # /readyz says "no model loaded" until the poller's first load ends
            log.warning("the model registry has not answered in %g s; serving rules-only meanwhile", wait_seconds)

    def stop(self) -> None:
        """Stop polling (the serving model stays as it is)."""
        if self._poller is not None:
            self._poller.stop(30)
            self._poller = None


#: The interpreter's thread switch interval while a version loads (its default is 5 ms).
LOAD_SWITCH_INTERVAL = 0.00002


class _ShortSwitchInterval:
    """The switch interval at ``LOAD_SWITCH_INTERVAL`` while at least one load runs in the process, and what it was
    before once the last one ends (two holders' loads may overlap: each putting back what it found would leave the
    short interval behind)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._before = 0.0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._running == 0:
                self._before = sys.getswitchinterval()
                sys.setswitchinterval(LOAD_SWITCH_INTERVAL)
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    sys.setswitchinterval(self._before)


#: Runs a model load with a short switch interval. A load (the bundle, its warm-up on the errors seen, the canary
#: decisions: ~25 ms of CPU in a warm process, 1-1.6 s for a worker's first) is mostly Python in the holder's
#: thread. It gives way to the worker's requests between its steps and at each Python call within them
#: (``give_way``, ``at_each_call``: api/inflight.py; on Python 3.11, in a swap, outside the log handler's and the
#: import lock). So a request usually finds it holding the GIL, not sharing it: a request's thread that wakes then
#: waits the switch interval before the load is asked to let go (5 ms by default). Measured in one process
#: (``swap_probe.py``, twelve swaps a run, three runs each way, alternating, a quiet machine): the GIL wait of a
#: request arriving during a load was 1.12-1.18 ms at p90 with 0.5 ms, 0.29-0.36 ms with 20 us (0.12 ms away from
#: the loads), and the p90 of wait and decision together 1.82-2.08x the p90 away from the loads with 0.5 ms,
#: 1.31-1.43x with 20 us; the loads took as long (72-142 ms). 5 us waited no less while the kernel's timer slack
#: (50 us) was the floor; each worker's event loop now sets its own to 1 us (``precise_timers``, api/inflight.py).
#: Where a load and requests do share the GIL (a first load, which is not traced; a load whose budget is spent;
#: Python 3.12 and later), a review measured the same throughput untraced and 3-4% fewer decisions a second with a
#: traced load whose budget was spent, in one process, saturated.
_requests_first = _ShortSwitchInterval()


def first_line(exc: Exception) -> str:
    """``Type: first line of the message`` (a database error goes on with its SQL and parameters)."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
