"""The executor's workers: claim due actions in batches, perform them, record the outcomes.

A batch is claimed in one short transaction (PostgreSQL: ``FOR UPDATE SKIP LOCKED``; SQLite: ``BEGIN IMMEDIATE``)
with a lease; its effects are performed outside any transaction, each with the action's idempotency key; the
outcomes are then recorded in one transaction (a savepoint per action) that also settles each action, guarded by
the claim token. A worker that dies mid-batch loses nothing: its lease runs out, another worker claims the same
actions and re-sends them with the same keys, which the connectors and providers deduplicate.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import random
import select
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from multiprocessing import resource_tracker
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from model.catalog import REQUEST_CATALOG_MEMO_SIZE, ErrorCatalog, MemoCatalog
from model.gsm import serving_catalog
from model.merchant_config import MerchantConfig, WinbackConfig, load_config, unlisted_endpoints
from model.policy import PolicyConfig, decide, new_decision_id
from model.requests import Decision, DecisionRequest
from service.api.settings import settings_from_env
from service.api.store import shown_url
from service.executor.by_hand import Case, Marked, mark_cases_done
from service.executor.channels.templates import validate_templates
from service.executor.connectors import Connector, ConnectorRegistry
from service.executor.core import (
    CHARGE_KINDS,
    SWITCH_FOLLOW_UPS,
    ActionRow,
    ChargeDispute,
    ChargeResolutionError,
    Decider,
    DisputeResolutionError,
    Executor,
    Outcome,
    PaidTwice,
    RefundByHand,
    RetryPolicy,
    SilentNotCharged,
    StaleClaimError,
    Transient,
    by_order_of,
    charge_disputes,
    paid_twice,
    refunds_by_hand,
    resolve_charge_disputes,
    silent_not_charged,
)
from service.executor.effects import AdapterFactory, Effects
from service.executor.links import LinkSigner
from service.executor.settings import ExecutorSettings
from service.executor.store import ActionKind, cases_by_hand, make_executor_engine, orders, utcnow
from service.signals import restore_sigchld_default

log = logging.getLogger("winback.executor")


def make_decider(
    catalog: ErrorCatalog, tracking_uri: str | None, seed: int | None = None
) -> tuple[Decider, Callable[[], None]]:
    """decide() with the registry's champion (rules-only while none is registered); returns (decider, stop).

    A model that fails on a request is answered by the rules-only policy, as in the API.
    """
    from service.api.model_holder import MlflowSource, ModelHolder

    holder = ModelHolder(MlflowSource(tracking_uri) if tracking_uri else None, catalog=catalog)
    holder.start()
    memo = MemoCatalog(catalog, REQUEST_CATALOG_MEMO_SIZE)
    policy = PolicyConfig()
    rng = np.random.default_rng(seed)  # exploration only: decision ids are fresh, workers and restarts never repeat one

    def decider(request: DecisionRequest, merchant: MerchantConfig) -> Decision:
        scorer = holder.current.scorer
        try:
            return decide(
                request, merchant, scorer, catalog=memo, config=policy, rng=rng, decision_id=new_decision_id(None)
            )
        except Exception:
            if scorer is None:
                raise
            log.exception("model failed on a request; answered rules-only")
            return decide(
                request, merchant, None, catalog=memo, config=policy, rng=rng, decision_id=new_decision_id(None)
            )

    return decider, holder.stop


def build_executor(
    settings: ExecutorSettings,
    config: WinbackConfig,
    decider: Decider,
    engine: Any | None = None,
    catalog: ErrorCatalog | None = None,
) -> Executor:
    """The state machine over ``settings.database_url`` (or ``engine``); ``catalog`` is the one the decider's rules
    read (None: the Executor's own default, the shipped one)."""
    executor = Executor(
        engine=engine if engine is not None else make_executor_engine(settings.database_url),
        config=config,
        decider=decider,
        links=LinkSigner(settings.link_secret.get_secret_value(), settings.link_secrets_previous()),
        retry_policy=RetryPolicy(
            max_attempts=settings.max_attempts,
            webhook_alert_attempts=settings.webhook_alert_attempts,
            backoff_base_seconds=settings.backoff_base_seconds,
            backoff_cap_seconds=settings.backoff_cap_seconds,
            jitter=lambda ceiling: random.uniform(0.0, ceiling),
        ),
        clock=settings.clock(),
    )
    if catalog is not None:
        executor.catalog = catalog
    return executor


def build_effects(
    executor: Executor,
    settings: ExecutorSettings,
    catalog: ErrorCatalog,
    *,
    connectors: Mapping[str, Connector] | None = None,
    adapters: AdapterFactory | None = None,
    env: Mapping[str, str] | None = None,
) -> Effects:
    """Connectors, channels and the webhook client of one process."""
    environment = env if env is not None else os.environ
    registry = ConnectorRegistry(
        {merchant_id: dict(m.connector_endpoints) for merchant_id, m in executor.config.merchants.items()},
        environment,
        settings.sandbox_url,
        overrides=connectors,
    )
    return Effects(
        executor,
        registry,
        catalog,
        settings.public_base_url,
        unsubscribe_key=settings.unsubscribe_keys()[0],
        env=environment,
        adapters=adapters,
        lease=timedelta(seconds=settings.lease_seconds),
    )


class StartupCheckError(ValueError):
    """A secret the merchant config names is not set, or a channel provider cannot be built: one line naming
    every such variable and problem by its key's path."""


def _secrets_and_providers(
    config: WinbackConfig, env: Mapping[str, str], providers: bool, connectors: bool = True
) -> tuple[list[str], list[str]]:
    """(secrets not set, channel providers that cannot be built) of every merchant in ``config``."""
    from service.executor.channels.adapters import provider_problems

    missing = [
        f"merchants.{merchant_id}.webhook.secret_env: {merchant.webhook.secret_env}"
        for merchant_id, merchant in config.merchants.items()
        if merchant.webhook is not None and not env.get(merchant.webhook.secret_env)
    ]
    unbuildable: list[str] = []
    for merchant_id, merchant in config.merchants.items() if providers else ():
        unset, problems = provider_problems(merchant_id, merchant, env)
        missing += unset
        unbuildable += problems
    # A connector endpoint's key (service/executor/connectors.py reads it at the first charge through it).
    missing += [
        f"merchants.{merchant_id}.connector_endpoints.{connector}.api_key_env: {endpoint.api_key_env}"
        for merchant_id, merchant in (config.merchants.items() if connectors else ())
        for connector, endpoint in merchant.connector_endpoints.items()
        if endpoint.kind == "http" and endpoint.api_key_env and not env.get(endpoint.api_key_env)
    ]
    return missing, unbuildable


def missing_secrets(
    config: WinbackConfig, env: Mapping[str, str], *, providers: bool = True, connectors: bool = True
) -> list[str]:
    """``merchants.<id>.webhook.secret_env: VAR`` for every webhook secret not set in ``env``, (``providers``)
    ``merchants.<id>.providers.<channel>.<field>: VAR`` for every channel provider's secret not set, and
    (``connectors``) ``merchants.<id>.connector_endpoints.<connector>.api_key_env: VAR`` for every connector key."""
    return _secrets_and_providers(config, env, providers, connectors)[0]


def check_secrets(
    config: WinbackConfig, env: Mapping[str, str], *, providers: bool = True, connectors: bool = True
) -> None:
    """The start-up check of ``winback executor run`` and ``winback serve``, before any worker starts: every secret
    the config names (webhooks; channel providers unless ``providers`` is false: their adapters replaced; connector
    endpoints' keys unless ``connectors`` is false: the connectors replaced) is set, and every channel provider can
    be built. Otherwise each message to such a channel would be refused at send time, counted against the
    customer's messages, and its order failed; each silent retry through such a connector refused likewise.
    Raises StartupCheckError naming them all in one line."""
    missing, unbuildable = _secrets_and_providers(config, env, providers, connectors)
    problems = []
    if missing:
        problems.append("secrets are not set: " + "; ".join(missing))
    if unbuildable:
        problems.append("channel providers cannot be built: " + "; ".join(unbuildable))
    if problems:
        raise StartupCheckError(" | ".join(problems))


@dataclass
class Worker:
    """One claiming loop (run one per process; several processes share the database)."""

    executor: Executor
    effects: Effects
    worker_id: str
    batch_size: int = 50
    lease_seconds: float = 30.0
    poll_seconds: float = 0.5
    #: How often the worker deletes what is kept only for a while (``Executor.expire_early_receipts``,
    #: ``Executor.forget_idle_customers``).
    clean_up_seconds: float = 3600.0

    #: When (monotonic) the worker last cleaned up; None: not yet in this run.
    _cleaned_at: float | None = field(default=None, init=False, repr=False)
    #: The claim token of the batch being run (claimed, not all recorded): a batch that fails leaves its actions
    #: leased under it.
    _unfinished: str | None = field(default=None, init=False, repr=False)

    def run_once(self) -> int:
        """Claim, perform and record one batch; the number of actions claimed."""
        token = uuid.uuid4().hex
        batch = self.executor.claim(self.batch_size, self.lease_seconds, self.worker_id, token)
        if not batch:
            return 0
        self._unfinished = token
        with self.executor.engine.connect() as conn:
            found = self.executor.orders_of(conn, batch)
        performed: list[tuple[ActionRow, Outcome]] = []
        for action in batch:
            outcome = self.effects.perform(action, found.get((action.merchant_id, action.order_id)))
            if action.kind in CHARGE_KINDS or action.kind in (ActionKind.NUDGE, ActionKind.WEBHOOK, *SWITCH_FOLLOW_UPS):
                # A charge's, a message's or a webhook's answer is recorded at once: its claim is renewed only while
                # it is out, and the rest of the batch may take longer than a lease (another worker would then take
                # it over, and the answer would be refused as stale: a message the customer got, or a webhook the
                # merchant acknowledged, with no record of it, sent again).
                self.record([(action, outcome)])
            else:
                performed.append((action, outcome))
        if performed:
            self.record(performed)
        self._unfinished = None
        return len(batch)

    def record(self, performed: list[tuple[ActionRow, Outcome]]) -> None:
        """Record a batch's outcomes in one transaction; if any fails, record them one transaction each.

        Recording an outcome locks its order (``Executor.complete``), and the transaction keeps every lock it took
        until it commits: the outcomes go order by order (``by_order``), so two workers whose batches hold actions
        of the same orders lock them the same way round. In the batch's planned order, a worker recording order 1
        then order 2 and another recording order 2 then order 1 deadlocked on PostgreSQL: one was aborted, its
        whole batch rolled back and recorded again one by one (review)."""
        try:
            with self.executor.engine.begin() as conn:
                for action, outcome in by_order(performed):
                    self.executor.complete(conn, action, outcome)
            return
        except Exception:
            log.warning("recording a batch of %d failed; recording its actions one by one", len(performed))
        for action, outcome in performed:
            self._record_one(action, outcome)

    def _record_one(self, action: ActionRow, outcome: Outcome) -> None:
        """Record one outcome; if that fails (logged), record it as one to try again later (``recording_failed``).
        If that fails too, the error goes up to the worker's loop, nothing of it written: the action stays claimed
        until its lease ends and is then tried again."""
        try:
            with self.executor.engine.begin() as conn:
                self.executor.complete(conn, action, outcome)
            return
        except StaleClaimError:
            log.warning(
                "action %s is no longer this worker's (another took it over after the lease, or its order was "
                "settled); its outcome (%s) is dropped",
                action.action_id,
                type(outcome).__name__,
            )
            return
        except Exception as exc:
            log.exception("recording action %s failed", action.action_id)
            error = f"recording failed: {type(exc).__name__}: {exc}"
        try:
            with self.executor.engine.begin() as conn:
                self.executor.complete(conn, action, recording_failed(outcome, error))
        except StaleClaimError:
            pass

    def run(self, stop: StopFlag | None = None, stop_after: float | None = None, until_idle: bool = False) -> int:
        """Loop until ``stop`` is set, ``stop_after`` seconds passed, or (``until_idle``) nothing is due.

        A batch that fails on the database (it went away, or chose this transaction as a deadlock's victim) is
        logged, and the worker waits (the poll interval, doubling up to MAX_DATABASE_BACKOFF) and goes on: what
        was claimed and not recorded is claimed again when its lease ends (a charge marked sent as a re-send).
        An error that lasts (a missing schema or column, a database that does not come back) ends the run with
        that error, so its supervisor sees it: after MAX_DATABASE_FAILURES failed batches in a row
        (UNTIL_IDLE_DATABASE_FAILURES until idle). In a row: no poll between them answered while no failed
        batch's action was still leased to this worker (a failure after the claim leaves its batch leased, and the
        polls that find nothing due meanwhile say nothing of the database's health). A run until idle that finds
        nothing due while such an action is still leased to it raises that batch's error rather than end as idle.
        """
        deadline = None if stop_after is None else time.monotonic() + stop_after
        total = 0
        backoff, failures = self.poll_seconds, 0
        leased: dict[str, sa.exc.DBAPIError] = {}  # claim tokens of failed batches that may still hold actions
        give_up_after = UNTIL_IDLE_DATABASE_FAILURES if until_idle else MAX_DATABASE_FAILURES
        while not (stop is not None and stop.is_set()) and (deadline is None or time.monotonic() < deadline):
            try:
                self._clean_up_when_due()
                claimed = self.run_once()
                if leased:
                    held = self.executor.claims_held(list(leased))
                    leased = {token: error for token, error in leased.items() if token in held}
            except sa.exc.DBAPIError as error:
                failures += 1
                if self._unfinished is not None:
                    leased[self._unfinished], self._unfinished = error, None
                if failures >= give_up_after:
                    log.error("the database failed %d batches in a row; the worker stops", failures)
                    raise
                log.exception("a batch failed on the database; trying again in %.3g s", backoff)
                self._wait(stop, backoff, deadline)
                backoff = min(backoff * 2, MAX_DATABASE_BACKOFF)
                continue
            backoff = self.poll_seconds
            total += claimed
            if not leased:
                failures = 0
            if claimed:
                continue
            if until_idle:
                if leased:  # nothing is due because a failed batch is still this worker's
                    log.error("a batch that failed on the database is still leased to this worker; the run stops")
                    raise next(iter(leased.values()))
                break
            self._wait(stop, self.poll_seconds, deadline)
        return total

    def _clean_up_when_due(self) -> None:
        """Delete the receipts kept too long unmatched, and the customers' pacing rows no longer needed, at the
        start of a run and every ``clean_up_seconds``."""
        now = time.monotonic()
        if self._cleaned_at is not None and now - self._cleaned_at < self.clean_up_seconds:
            return
        self.executor.expire_early_receipts()
        self.executor.forget_idle_customers()
        self._cleaned_at = now

    @staticmethod
    def _wait(stop: StopFlag | None, seconds: float, deadline: float | None = None) -> None:
        if deadline is not None:
            seconds = max(min(seconds, deadline - time.monotonic()), 0.0)
        if stop is not None:
            stop.wait(seconds)
        else:
            time.sleep(seconds)


def recording_failed(outcome: Outcome, error: str) -> Transient:
    """What is recorded for ``outcome`` once recording it failed with ``error``: a try to be made again later. A
    provider's answer that it did not take the message (a 429 or a 503, and its ``Retry-After``) stays what it is,
    with the failure added to its error: it still counts toward the channel's outage, its ``Retry-After`` is still
    honoured, and the try is not counted as one that may have reached the customer. Recorded as a plain transient
    (review), the 429 lost all three: the message went again at the next backoff step, sooner than the provider
    asked, and was kept in the history as maybe sent."""
    if isinstance(outcome, Transient):
        return replace(outcome, error=f"{outcome.error}; {error}")
    return Transient(error)


def by_order(performed: Sequence[tuple[ActionRow, Outcome]]) -> list[tuple[ActionRow, Outcome]]:
    """``performed`` sorted by order (merchant, then order id), the lock order of every transaction that locks
    several orders; the actions of one order keep their planned order (the sort is stable)."""
    return sorted(performed, key=lambda done: by_order_of(done[0])[:2])


class StopFlag(Protocol):
    """What a worker's loop asks of its stop: ``threading.Event``, or ``SignalStop`` in a worker process."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


_LONGEST_POLL_MS = 2**31 - 1


class SignalStop:
    """A stop set by a signal (``signum``), safe where ``threading.Event`` is not.

    The worker's SIGTERM handler used to call ``Event.set``, which takes the Event's lock. Python runs a handler in
    the main thread between two bytecodes, and the main thread spends its idle time in ``Event.wait``, which holds
    that lock around its own bytecodes: a signal landing there made the handler wait for a lock its own thread
    held, for good, and the worker never stopped (a loop of short waits, signalled once: 1 hung process in 30).
    Here the handler only sets a flag, and a wait sleeps in ``poll`` on a pipe that the interpreter's C-level
    handler writes to as the signal arrives (``signal.set_wakeup_fd``), so a signal still ends a wait at once.
    Made in the main thread of a process that has no other wakeup fd (a worker process)."""

    def __init__(self, signum: signal.Signals) -> None:
        self._flag = False
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._readable = select.poll()  # not select(): no limit on the descriptor's number
        self._readable.register(self._read, select.POLLIN)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        signal.signal(signum, self._on_signal)

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self._flag = True  # no lock, no I/O: the wakeup byte is already written

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        """Stop from code rather than a signal (tests)."""
        self._flag = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._write, b"\0")

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep up to ``timeout`` seconds, less when a signal comes (any handled one); whether the stop is set."""
        if not self._flag:
            # poll() takes milliseconds as a C int: a longer wait is a shorter one, after which the caller looks again.
            self._readable.poll(None if timeout is None else min(max(timeout, 0.0) * 1000.0, _LONGEST_POLL_MS))
            with contextlib.suppress(BlockingIOError):
                while os.read(self._read, 512):
                    pass
        return self._flag

    def close(self) -> None:
        """Put the wakeup fd back and close the pipe. The handler stays (it only sets the flag): a signal during
        the worker's clean-up after this must not end the process before the clean-up does (review)."""
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._read)
        os.close(self._write)


#: The longest a worker waits between tries while its database fails.
MAX_DATABASE_BACKOFF = 30.0
#: Batches failing on the database in a row after which a worker stops (about 2.5 min of backing off from 0.5 s
#: when claiming fails; about ten leases when what fails comes after the claim), and after which a run until idle
#: (the CLI, tests) stops.
MAX_DATABASE_FAILURES = 10
UNTIL_IDLE_DATABASE_FAILURES = 3


def worker_main(
    database_url: str,
    config_path: str,
    tracking_uri: str | None,
    worker_id: str,
    stop_after: float | None,
    until_idle: bool = False,
    connectors_factory: Callable[[], Mapping[str, Connector]] | None = None,
    adapters: AdapterFactory | None = None,
) -> int:
    """One worker process: build everything from the environment and the arguments, then loop."""
    from service.api.logging import configure_logging

    configure_logging()  # JSON lines on stderr, scrubbed, as the scorer's (the settings below may fail)
    settings = settings_from_env(ExecutorSettings, database_url=database_url, config_path=Path(config_path))
    configure_logging(settings.log_level)
    config = load_config(config_path)
    catalog = serving_catalog(settings.gsm_overlay)  # the API's: overlay codes decided alike in both
    decider, stop_model = make_decider(catalog, tracking_uri)
    executor = build_executor(settings, config, decider, catalog=catalog)
    effects = build_effects(
        executor, settings, catalog, connectors=connectors_factory() if connectors_factory else None, adapters=adapters
    )
    stop = SignalStop(signal.SIGTERM)
    log.info("executor worker %s is running", worker_id)
    # The config may omit connector_endpoints (CONTRACT.md section 4): each silent retry through such a connector is
    # then dead-lettered at send time, unless a sandbox is configured. Said once at start, not only per retry.
    unrouted = [
        f"merchants.{merchant_id}.connectors: {', '.join(names)}"
        for merchant_id, merchant in config.merchants.items()
        if (names := effects.connectors.unrouted(merchant_id, merchant.connectors))
    ]
    if unrouted:
        log.warning(
            "no connector_endpoints entry and no WINBACK_SANDBOX_URL for %s: each silent retry through them will be "
            "dead-lettered",
            "; ".join(unrouted),
        )
    if unlisted := unlisted_endpoints(config):
        log.warning(
            "connector_endpoints entries naming none of their merchant's connectors: %s; they serve only requests "
            "whose available_connectors name them (a misspelt key leaves the real connector without an endpoint)",
            "; ".join(unlisted),
        )
    worker = Worker(
        executor,
        effects,
        worker_id,
        batch_size=settings.batch_size,
        lease_seconds=settings.lease_seconds,
        poll_seconds=settings.poll_seconds,
    )
    try:
        return worker.run(stop=stop, stop_after=stop_after, until_idle=until_idle)
    finally:
        stop_model()
        effects.close()
        executor.engine.dispose()
        stop.close()


class _StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM in the parent of the workers, for as long as ``run()`` supervises them: either
    stops every worker after its batch (a KeyboardInterrupt in ``run()``, which sends each a SIGTERM).

    - While the workers start (:meth:`held`), a signal is noted and acted on once the start is over. The workers
      start with SIGINT blocked: a Ctrl-C that reaches one while it imports waits until ``_child`` ignores it,
      where it is dropped. (A blocked mask survives the spawn's exec; a Python handler does not.) The parent used
      to ignore SIGINT for the start instead, so that the workers inherit the ignore, and lost a Ctrl-C that came
      then: nothing stopped the started workers (seen in CI). A SIGTERM then killed the parent before its handler
      was set.
    - The handler notes rather than raises while the start is held (a native library's thread that does not block
      the signal may be the one the kernel gives it to) and once the workers are being stopped (a second Ctrl-C
      raised inside the stop left workers never told to stop, and the exit waiting on them for good).
    - One handler for the whole run, never swapped at the end of the start: a signal in the middle of a swap
      left the signals blocked and the noting handler in place (review).
    - A signal that the caller ignores (a background job's SIGINT) stays ignored.
    """

    def __init__(self) -> None:
        self.holding = False
        self.stopping = False
        self.noted: list[int] = []
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> _StopSignals:
        self.holding = True  # a signal while the handlers go in is noted, and acted on after the start (held())
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        # A signal during the restore is noted, then sent again to its own handler once all are back: one raised
        # half-way left a handler of this run in place (seen at 1 in 3,000 under load). A handler put back that
        # raises (the caller's own) does not keep the others from going back.
        self.stopping = True
        restoring_from = len(self.noted)
        try:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        finally:
            for signum, handler in self._previous.items():
                if signal.getsignal(signum) is not handler:
                    signal.signal(signum, handler)
        noted = dict.fromkeys(self.noted[restoring_from:])
        for noted_signal in sorted(noted, key=lambda signum: signum != signal.SIGTERM):
            signal.raise_signal(noted_signal)  # SIGTERM first: a KeyboardInterrupt from SIGINT's would end the loop

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.holding or self.stopping:
            self.noted.append(signum)
            return
        self.stopping = True  # one stop: a second signal right behind this one only notes (review)
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Start the workers in this block: a stop signal that comes meanwhile raises KeyboardInterrupt after it."""
        resource_tracker.ensure_running()  # its first start would lift this thread's block, mid-way
        self.holding = True
        # An ignored SIGINT is not blocked: blocked, the kernel keeps even an ignored signal, and it was taken
        # below as a stop (review). The workers inherit the ignore itself.
        blocked = {signal.SIGINT} if signal.SIGINT in self._previous else set()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            yield
        finally:
            # A Ctrl-C the kernel holds for this thread is taken here, so that the unblock delivers nothing.
            while blocked and (pending := signal.sigtimedwait(blocked, 0)) is not None:
                self.noted.append(pending.si_signo)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            self.stopping = bool(self.noted)  # set before holding ends: a signal from here on only notes
            self.holding = False
        if self.noted:
            raise KeyboardInterrupt


def _child(*args: Any) -> None:
    # Ctrl-C reaches the whole process group: the parent turns it into a SIGTERM to each worker, which finishes
    # its batch and exits 0, instead of a KeyboardInterrupt mid-batch (a traceback, exit 1, the command failing).
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # also drops a Ctrl-C held since the start (_StopSignals)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked for the start (see _StopSignals)
    # A parent that is gone (killed outright) can no longer stop this worker: it stops itself, as on SIGTERM.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_stop_with, args=(parent.sentinel,), name="winback-parent-watch", daemon=True).start()
    worker_main(*args)


def _stop_with(sentinel: int) -> None:
    """Send this process SIGTERM (a worker's graceful stop) once ``sentinel`` (its parent's) is ready."""
    multiprocessing.connection.wait([sentinel])
    os.kill(os.getpid(), signal.SIGTERM)


def resolve_charge(
    database_url: str,
    action_id: int,
    charged: bool,
    config_path: str | Path | None = None,
    tracking_uri: str | None = None,
) -> str:
    """``winback executor resolve-charge``: an operator's answer for a charge sent and never answered (see
    ``Executor.resolve_charge``); the order's state after it."""
    from service.api.settings import DEMO_CONFIG

    config = load_config(Path(config_path) if config_path else DEMO_CONFIG)
    settings = settings_from_env(ExecutorSettings, database_url=database_url)
    engine = _existing_executor_database(database_url)
    catalog = serving_catalog(settings.gsm_overlay)
    decider, stop = make_decider(catalog, tracking_uri)
    executor = build_executor(settings, config, decider, engine=engine, catalog=catalog)
    try:
        return executor.resolve_charge(action_id, charged)
    except KeyError as exc:  # the order's merchant is not in this config
        raise ChargeResolutionError(f"{exc.args[0]} (pass the config the executor runs with: --config)") from None
    finally:
        stop()
        engine.dispose()


def _existing_executor_database(database_url: str) -> Engine:
    """An engine on the executor's database at ``database_url``; ChargeResolutionError when there is none there, or
    it is not at the current schema (an operator's command must not create an empty database, nor read an old one)."""
    url = sa.make_url(database_url)
    on_disk = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
    if on_disk and not Path(str(url.database)).is_file():  # connecting would create an empty database file
        raise ChargeResolutionError(f"no winback database at {url.database} (from --database-url)")
    engine = make_executor_engine(database_url)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            if "unanswered_since" not in {c["name"] for c in inspector.get_columns("actions")} or (
                not inspector.has_table(cases_by_hand.name)
            ):
                raise ChargeResolutionError("the database is not at the current schema: run `winback executor run`")
    except sa.exc.NoSuchTableError:
        engine.dispose()
        raise ChargeResolutionError(f"{shown_url(url)} holds no executor tables") from None
    except Exception:
        engine.dispose()
        raise
    return engine


def list_charge_disputes(database_url: str, merchant_id: str | None = None) -> list[ChargeDispute]:
    """``winback executor charge-disputes``: the charges an operator answered for as charged whose switch then said
    otherwise (``Executor._flag_dispute``), a merchant's or all, oldest first, dealt with or not."""
    return _read_executor_database(database_url, lambda conn: charge_disputes(conn, merchant_id))


def list_refunds_by_hand(
    database_url: str, merchant_id: str | None = None
) -> tuple[list[RefundByHand], list[PaidTwice], list[SilentNotCharged]]:
    """``winback executor refunds-by-hand``, a merchant's or all, oldest first, read on one connection: the refunds
    of duplicate charges given to an operator to make by hand (``Executor._hand_refund_over``), the orders paid
    by winback's charge that their merchant then reported paid by a payment of its own
    (``Executor._merchant_paid_too``), and the charges taken as never charged whose switch then went silent
    (``Executor._stop_asking``)."""
    return _read_executor_database(
        database_url,
        lambda conn: (
            refunds_by_hand(conn, merchant_id),
            paid_twice(conn, merchant_id),
            silent_not_charged(conn, merchant_id),
        ),
    )


#: What an operator's listing reads from the executor's database.
T = TypeVar("T")


def _read_executor_database(database_url: str, read: Callable[[sa.Connection], T]) -> T:
    """What ``read`` reads from the executor's existing database at ``database_url`` (an operator's listing)."""
    engine = _existing_executor_database(database_url)
    try:
        with engine.connect() as conn:
            return read(conn)
    finally:
        engine.dispose()


def resolve_case_by_hand(
    database_url: str, order_id: str, note: str, by: str, merchant_id: str | None = None
) -> Marked[Case]:
    """``winback executor refunds-by-hand --resolve ORDER_ID --note TEXT``: mark the open refunds by hand and
    possible double payments of the order as dealt with (``mark_cases_done``), in one transaction; those dealt with
    before are left as they were (``Marked.before``). The order is named as for ``resolve_charge_dispute``."""
    engine = _existing_executor_database(database_url)
    try:
        with engine.begin() as conn:
            merchant = _merchant_of_order(conn, order_id, merchant_id)
            return mark_cases_done(conn, merchant, order_id, by, note, utcnow())
    finally:
        engine.dispose()


def _merchant_of_order(conn: sa.Connection, order_id: str, merchant_id: str | None) -> str:
    """The merchant of order ``order_id`` (of ``merchant_id``'s, when named); DisputeResolutionError when no
    merchant has such an order, or several do and none is named."""
    query = sa.select(orders.c.merchant_id).where(orders.c.order_id == order_id)
    if merchant_id is not None:
        query = query.where(orders.c.merchant_id == merchant_id)
    merchants = sorted(conn.scalars(query))
    if not merchants:
        of = "" if merchant_id is None else f" of merchant {merchant_id}"
        raise DisputeResolutionError(f"no order {order_id!r}{of}")
    if len(merchants) > 1:
        raise DisputeResolutionError(
            f"order {order_id!r} is an order of merchants {', '.join(merchants)}: name one with --merchant"
        )
    return str(merchants[0])


def resolve_charge_dispute(
    database_url: str, order_id: str, note: str, by: str, merchant_id: str | None = None
) -> Marked[ChargeDispute]:
    """``winback executor charge-disputes --resolve ORDER_ID --note TEXT``: mark the open charge disputes of the
    order as dealt with (``resolve_charge_disputes``), in one transaction; those dealt with before are left as they
    were (``Marked.before``). The order is named by its id, and by its
    merchant when another merchant has an order of that id; DisputeResolutionError otherwise."""
    engine = _existing_executor_database(database_url)
    try:
        with engine.begin() as conn:
            merchant = _merchant_of_order(conn, order_id, merchant_id)
            return resolve_charge_disputes(conn, merchant, order_id, by, note, utcnow())
    finally:
        engine.dispose()


#: How long ``_wait_for_an_error`` waits before it reads an ended worker's unread exit again.
_REREAD_SECONDS = 0.05


def _wait_for_an_error(processes: Sequence[BaseProcess]) -> list[str]:
    """Wait until every process has ended, or until some ended with an exit code other than 0; the names of those.

    A process's sentinel closes as it exits, a moment before the kernel lets it be reaped. Each exit is read once,
    after a join: polled in that moment, a worker that had failed read as alive, then as ended on the next poll,
    and was dropped from the watch unreported, so the command ran on short of it (seen: 120 s, until the healthy
    worker's own deadline).

    A process that has exited but whose exit still reads as unknown after its join, and again a moment later, was
    reaped elsewhere: by another thread here through the same Process object that has not stored the code yet, by
    code here that waits for any child (``os.wait``), or by the kernel while SIGCHLD is ignored. ``run`` puts back
    the default for an ignore inherited from whatever started the command, so that last one takes an ignore set
    after it (by a library, say). Such an exit may never be read, and its closed sentinel would wake this loop at
    once, forever, at a full core: it counts as failed."""
    running = list(processes)
    while running:
        ready = set(multiprocessing.connection.wait([process.sentinel for process in running]))
        for process in running:
            if process.sentinel in ready:
                process.join()  # it is exiting: reapable within moments
        exit_codes = [(process, process.exitcode) for process in running]  # one read each: a later one may differ
        if any(code is None and process.sentinel in ready for process, code in exit_codes):
            # Ended, its exit unread: reaped elsewhere, perhaps by another thread here through the same Process
            # object (``active_children``), which stores the code a moment after it reaps. Read again after that.
            time.sleep(_REREAD_SECONDS)
            exit_codes = [(process, process.exitcode if code is None else code) for process, code in exit_codes]
        failed = [
            process.name
            for process, code in exit_codes
            if code not in (None, 0) or (code is None and process.sentinel in ready)
        ]
        if failed:
            return failed
        running = [process for process, code in exit_codes if code is None]
    return []


def _exit_of(process: BaseProcess) -> str:
    """How a worker process ended, in words: its exit code, or that it could not be read."""
    if process.exitcode is None:
        return "exit code unknown: it was reaped elsewhere (a wait for any child here, or SIGCHLD set to ignored)"
    return f"exit code {process.exitcode}"


def run(
    database_url: str,
    workers: int = 1,
    config_path: str | Path | None = None,
    tracking_uri: str | None = None,
    stop_after: float | None = None,
    *,
    until_idle: bool = False,
    connectors_factory: Callable[[], Mapping[str, Connector]] | None = None,
    adapters: AdapterFactory | None = None,
) -> None:
    """``winback executor run``: migrate the database, then run ``workers`` worker processes until stopped
    (SIGINT/SIGTERM) or for ``stop_after`` seconds.

    The merchant config is checked first (ConfigError names the bad key), then the secrets it names and its
    channel providers (StartupCheckError lists every missing variable and unbuildable provider).
    ``connectors_factory`` and ``adapters`` (importable callables) replace the configured connectors and channel
    adapters, for tests and the demo.
    """
    from service.api.settings import DEMO_CONFIG
    from service.migrations import upgrade_at_start

    restore_sigchld_default()  # the workers' exits must be readable (here too for callers other than the CLI)
    config_file = Path(config_path) if config_path else DEMO_CONFIG
    config = load_config(config_file)
    # Every merchant's message templates must render (with the payment link) before anything is sent.
    validate_templates(
        config, Path(os.environ["WINBACK_TEMPLATES_DIR"]) if "WINBACK_TEMPLATES_DIR" in os.environ else None
    )
    # Every secret the config names, and every channel provider it configures (unless ``adapters`` replaces them).
    check_secrets(config, os.environ, providers=adapters is None, connectors=connectors_factory is None)
    # Every WINBACK_* value is checked before any fork (SettingsError names each variable it refuses, and a
    # placeholder link secret outside dev), so a bad one is one line here, not a traceback in every worker; so is
    # an overlay file that cannot be read (GsmError).
    serving_catalog(settings_from_env(ExecutorSettings, database_url=database_url).gsm_overlay)
    upgrade_at_start(database_url, make_executor_engine, "the executor")
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_child,
            args=(
                database_url,
                str(config_file),
                tracking_uri,
                f"{os.uname().nodename}:{os.getpid()}:{index}",
                stop_after,
                until_idle,
                connectors_factory,
                adapters,
            ),
            name=f"winback-executor-{index}",
        )
        for index in range(workers)
    ]

    signals = _StopSignals()

    def _stop_all() -> None:
        signals.stopping = True  # a second Ctrl-C changes nothing: each worker still finishes its batch
        started = [process for process in processes if process.pid is not None]
        for process in started:
            pid = process.pid
            # Not once its sentinel has closed: it has exited, and if it was reaped elsewhere (see
            # _wait_for_an_error) it still reads as alive, and its pid may already be someone else's.
            if pid is not None and process.is_alive() and not multiprocessing.connection.wait([process.sentinel], 0):
                os.kill(pid, signal.SIGTERM)
        for process in started:
            process.join(timeout=30)

    # Workers that ended with anything but 0 while the command was not stopping (an error, such as a database that
    # kept failing, or a signal sent to that worker alone): the others are stopped at once and the command fails,
    # so its supervisor restarts the whole set rather than the command running on short.
    ended_alone: list[str] = []
    with signals:
        try:
            with signals.held():
                for process in processes:
                    process.start()
            ended_alone = _wait_for_an_error(processes)
            if ended_alone:
                log.error("executor worker %s exited with an error; stopping the others", ", ".join(ended_alone))
                _stop_all()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM
            _stop_all()
        except BaseException:  # a worker that could not be started, say: those that were are not left running
            _stop_all()
            raise
        finally:
            signals.stopping = True  # no handler can run between this and the restore: none is left raising
    failed = [
        f"{p.name} ({_exit_of(p)})"
        for p in processes
        if p.pid is not None and (p.name in ended_alone or p.exitcode not in (0, -signal.SIGTERM))
    ]
    if failed:
        raise RuntimeError(f"executor workers exited with an error: {', '.join(failed)}")
