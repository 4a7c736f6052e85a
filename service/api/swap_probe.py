"""How much a model swap slows a request in the worker that loads it, measured in one process (``python -m
service.api.swap_probe <tracking-uri>``).

The swap bench (``swap_bench.py``) measures what a client sees: a whole server, its two workers, the load generator
and the alias mover share two cores, so a request in flight during a load is slowed by all of them together, and a
few hundred such requests a run make its figures move by tens of percent from run to run. This probe takes one of
those causes apart: the interpreter's lock (GIL) that the loading thread and the requests' thread share.

It builds the worker's runtime as ``winback serve`` does (``build_runtime``: the holder with its give-way, the
short switch interval, the canary), reading a registry mirror of a copy of the store. A thread stands in for the
event loop (with its precise timers, ``precise_timers``): it sleeps 1-4 ms, as a loop waits for its next request,
then marks a request in flight and decides one request of the mixed traffic. The main thread moves the champion,
lets the mirror publish it, and swaps it in (``ModelHolder.refresh``), with a pause of ``PAUSE_SECONDS`` before
and after each swap. For each request it records how late the thread woke (``wait``: mostly the time it waited
for the GIL) and how long its decision took. A request counts as during a load if the load ran when it woke or when
it ended. The alias move and the mirror's check before each swap (MLflow's client, 30-70 ms of Python that a server
runs in another process) are this process's own artefact: requests beside them count in neither figure, only in
``moving``.

The wait cannot fall below the stand-in thread's timer slack (1 us with ``precise_timers``; Linux's default is
50 us): its sleep and its wait for the GIL may each end that much late. The figures move with the machine's other
work: on a busy machine they spread far more than on a quiet one.
"""

from __future__ import annotations

import enum
import math
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from service.api.bench import _percentile
from service.signals import sigterm_exits

#: Quiet time before and after each swap: requests then count as away from the loads.
PAUSE_SECONDS = 1.0
#: Each sleep of the stand-in request thread is drawn between these (seconds).
GAP_SECONDS = (0.001, 0.004)
#: A request woken this late (ms) counts as held up (``PhaseFigures.late``). The p90 during the loads compares the
#: requests that overlapped one: a load made shorter by taking out work that held no request up raises it although
#: no fewer are held up. The count per swap moves only with the requests held up. The same count away from the
#: loads covers far more time (``2 * pause_seconds`` a swap): it shows the machine's own late wake-ups.
LATE_WAIT_MS = 1.0


@dataclass(frozen=True)
class PhaseFigures:
    """The stand-in requests of one phase (during the loads, or away from them), in milliseconds."""

    requests: int
    wait_p50_ms: float
    wait_p90_ms: float
    decide_p50_ms: float
    decide_p90_ms: float
    #: The wait and the decision together, per request.
    total_p90_ms: float
    #: Requests that woke more than ``LATE_WAIT_MS`` late.
    late: int = 0


@dataclass(frozen=True)
class ProbeResult:
    swaps: int
    #: Each swap's ``ModelHolder.refresh``: the mirror's read, the load, the warm-up, the canary and the switch.
    load_ms: tuple[float, ...]
    during: PhaseFigures
    away: PhaseFigures
    #: Requests beside an alias move and the mirror's check, in neither figure.
    moving: int
    switch_interval_ms: float


class Phase(enum.Enum):
    AWAY = "away"
    LOAD = "load"
    MOVE = "move"


@dataclass(frozen=True)
class _Sample:
    phase: Phase
    wait: float
    decide: float


def _quantile_ms(values: list[float], q: float) -> float:
    return round(_percentile(sorted(values), q), 3)


def phase_figures(samples: list[_Sample], phase: Phase) -> PhaseFigures:
    """The figures of the samples taken in ``phase``."""
    chosen = [sample for sample in samples if sample.phase is phase]
    waits = [sample.wait for sample in chosen]
    decides = [sample.decide for sample in chosen]
    totals = [sample.wait + sample.decide for sample in chosen]
    return PhaseFigures(
        requests=len(chosen),
        wait_p50_ms=_quantile_ms(waits, 0.5),
        wait_p90_ms=_quantile_ms(waits, 0.9),
        decide_p50_ms=_quantile_ms(decides, 0.5),
        decide_p90_ms=_quantile_ms(decides, 0.9),
        total_p90_ms=_quantile_ms(totals, 0.9),
        late=sum(1 for wait in waits if wait * 1e3 > LATE_WAIT_MS),
    )


def run_swap_probe(
    tracking_uri: str, *, swaps: int = 12, pause_seconds: float = PAUSE_SECONDS, seed: int = 0
) -> ProbeResult:
    """Swap the champion ``swaps`` times in this process while a thread decides requests, pausing
    ``pause_seconds`` before and after each swap (see the module's text). The store at ``tracking_uri`` is copied
    first (it must be a SQLite file store holding a champion)."""
    from threadpoolctl import threadpool_limits

    from model import registry_client as registry
    from model.fastpredict import lightgbm_threads
    from model.requests import DecisionRequest
    from service.api.app import build_runtime
    from service.api.bench import BENCH_CONFIG, mixed_traffic
    from service.api.inflight import precise_timers
    from service.api.mirror import RegistryMirror
    from service.api.model_holder import LOAD_SWITCH_INTERVAL
    from service.api.settings import Settings
    from service.api.swap_bench import versions_to_swap

    if swaps < 1:
        raise ValueError(f"swaps must be at least 1, not {swaps}")
    # A worker runs LightGBM, OpenBLAS and MKL on one thread each (``server_env``): a load parsing its boosters on
    # both cores held up the stand-in requests here as it does not in a worker. threadpoolctl sets OpenBLAS's and
    # MKL's pools, and OpenMP's count for this thread (the one that loads); LightGBM's own maximum is set apart.
    with (
        sigterm_exits(),
        lightgbm_threads(1),
        threadpool_limits(limits=1),
        tempfile.TemporaryDirectory(prefix="winback-swap-probe-") as tmp,
    ):
        folder = Path(tmp)
        store, versions = versions_to_swap(tracking_uri, folder)
        mirror_dir = folder / "mirror"
        mirror_dir.mkdir()
        # Checked by hand below (the poll is never reached), so each swap starts when the probe says.
        mirror = RegistryMirror(mirror_dir, store, poll_seconds=3600)
        mirror.check()
        settings = Settings(
            config_path=BENCH_CONFIG,
            tracking_uri=store,
            database_url=f"sqlite:///{folder / 'decisions.db'}",
            model_mirror_dir=mirror_dir,
            log_decisions=False,
            log_level="WARNING",
        )
        runtime = build_runtime(settings)
        runtime.holder.refresh()  # the first load: the champion, before the clock starts
        requests = [DecisionRequest.model_validate_json(body) for body, _ in mixed_traffic().requests]
        merchants = [runtime.config.merchants[request.merchant_id] for request in requests]
        for request, merchant in zip(requests, merchants, strict=True):  # warm, as a server is before its traffic
            runtime._decide(request, merchant, runtime.holder.current.scorer)

        phase = Phase.AWAY  # set by the main thread only
        done = threading.Event()
        samples: list[_Sample] = []
        errors: list[BaseException] = []
        rng = random.Random(seed)

        def stand_in_requests() -> None:
            index = 0
            try:
                precise_timers()  # as a worker's event loop does at start (api/app.py)
                while not done.is_set():
                    gap = rng.uniform(*GAP_SECONDS)
                    slept_at = time.perf_counter()
                    time.sleep(gap)
                    woke = time.perf_counter()
                    at_wake = phase
                    runtime.in_flight.started()
                    try:
                        request, merchant = requests[index % len(requests)], merchants[index % len(requests)]
                        runtime._decide(request, merchant, runtime.holder.current.scorer)
                    finally:
                        runtime.in_flight.ended()
                    decided = time.perf_counter()
                    at_end = phase
                    # During a load or a move at either end (a move next to a load counts as the load).
                    seen = {at_wake, at_end}
                    either = Phase.LOAD if Phase.LOAD in seen else Phase.MOVE if Phase.MOVE in seen else Phase.AWAY
                    samples.append(_Sample(either, woke - slept_at - gap, decided - woke))
                    index += 1
            except BaseException as error:  # said by the main thread, which ends the run
                errors.append(error)

        thread = threading.Thread(target=stand_in_requests, name="winback-swap-probe-requests", daemon=True)
        thread.start()
        loads: list[float] = []
        try:
            time.sleep(pause_seconds)
            for index in range(swaps):
                target = versions[index % len(versions)]
                phase = Phase.MOVE
                registry.set_alias(registry.CHAMPION, target, tracking_uri=store)
                mirror.check()
                phase = Phase.AWAY
                time.sleep(pause_seconds)
                phase = Phase.LOAD
                started = time.perf_counter()
                runtime.holder.refresh()
                loads.append(time.perf_counter() - started)
                phase = Phase.AWAY
                if runtime.holder.current.version != target:
                    raise RuntimeError(
                        f"swap {index + 1} did not serve version {target} (serving {runtime.holder.current.version}: "
                        f"{runtime.holder.last_error})"
                    )
                time.sleep(pause_seconds)
                if errors:
                    break
        finally:
            done.set()
            thread.join(30)
            mirror.stop()
        if errors:
            raise RuntimeError(f"a stand-in request failed: {errors[0]!r}") from errors[0]
    return ProbeResult(
        swaps=len(loads),
        load_ms=tuple(round(seconds * 1e3, 1) for seconds in loads),
        during=phase_figures(samples, Phase.LOAD),
        away=phase_figures(samples, Phase.AWAY),
        moving=sum(1 for sample in samples if sample.phase is Phase.MOVE),
        switch_interval_ms=LOAD_SWITCH_INTERVAL * 1e3,
    )


def phase_text(figures: PhaseFigures) -> str:
    """The figures of one phase in words; "no request" when it had none."""
    if not figures.requests:
        return "no request"
    return (
        f"{figures.requests} requests, GIL wait p50 {figures.wait_p50_ms:g} / p90 {figures.wait_p90_ms:g} ms, "
        f"decision p50 {figures.decide_p50_ms:g} / p90 {figures.decide_p90_ms:g} ms, both p90 "
        f"{figures.total_p90_ms:g} ms, {figures.late} woke over {LATE_WAIT_MS:g} ms late"
    )


def describe_probe(result: ProbeResult) -> str:
    """One paragraph of the probe's figures; a phase without a request says so (no NaN)."""
    loads = f"{min(result.load_ms):g}-{max(result.load_ms):g}" if result.load_ms else "-"
    ratio = probe_ratio(result)
    return (
        f"{result.swaps} swaps in one process ({loads} ms each, switch interval {result.switch_interval_ms:g} ms "
        f"while loading): during the loads {phase_text(result.during)}; away from them {phase_text(result.away)}; "
        f"{result.moving} beside the alias moves, in neither; "
        + (f"p90 ratio {ratio:.2f}x" if math.isfinite(ratio) else "no p90 ratio")
        + f"; {result.during.late / max(result.swaps, 1):.1f} requests woke over {LATE_WAIT_MS:g} ms late per swap"
    )


def probe_ratio(result: ProbeResult) -> float:
    """The p90 of a request's wait and decision during the loads, against away from them (NaN if not measured)."""
    during, away = result.during.total_p90_ms, result.away.total_p90_ms
    return during / away if math.isfinite(during) and math.isfinite(away) and away > 0 else float("nan")


if __name__ == "__main__":  # pragma: no cover (a measurement run by hand)
    print(describe_probe(run_swap_probe(sys.argv[1])))
