"""The live part of ``winback demo``: the whole recovery loop on one machine, on embedded defaults only.

In this process: the sandbox connector, local fake providers (Gupshup for WhatsApp and SMS, SMTP for e-mail,
the push webhook), a webhook receiver that checks every signature, and a driver that posts failed payments and
then plays the customers (reads the links out of the captured messages and pays some of them). As child
processes: the API (scorer + executor endpoints, ``winback serve``) and one executor worker
(``winback executor run``), both on a demo config written into the work folder that points every merchant at
those fakes, and on a fast demo clock (``WINBACK_CLOCK_SPEED``) so that a cadence of hours and days plays out
in minutes. Every secret here is made up per run for the demo and never leaves the machine.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from rich.console import Console
from rich.table import Table

from model.merchant_config import ConfigError, load_config, parse_config, read_config_yaml
from model.wording import count_noun, labelled_lines
from service.api.settings import DEMO_CONFIG
from service.executor.channels.fakes import FakeSmtpServer, RunningFake, run_fake_provider
from service.executor.sandbox import RunningServer, create_sandbox_app, serve_in_thread
from service.executor.store import orders, payment_links, transactions
from service.executor.webhooks import SIGNATURE_HEADER, verify_signature
from service.signals import sigterm_raises

#: Environment variables the demo config names; the demo process makes their values up for each run.
GUPSHUP_KEY_ENV = "WINBACK_DEMO_GUPSHUP_KEY"
GUPSHUP_SMS_ENV = "WINBACK_DEMO_GUPSHUP_SMS"  # "<userid>:<password>" of Gupshup Enterprise SMS
PUSH_SECRET_ENV = "WINBACK_DEMO_PUSH_SECRET"
#: Strategies of a silent retry (everything but the first attempt and a payment through a link).
NOT_RETRIES = ("initial", "retarget_link")
_LINK = re.compile(r"/pay/([A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+)")
_TOKEN = re.compile(r"[A-Za-z0-9_\-]{16,}\.[A-Za-z0-9_\-]{16,}")


def webhook_secret_env(merchant_id: str) -> str:
    """The variable holding a merchant's webhook secret in the demo config."""
    return "WINBACK_DEMO_WEBHOOK_SECRET_" + re.sub(r"\W", "_", merchant_id).upper()


@dataclass(frozen=True)
class DemoSecrets:
    """Secrets of one demo run: random, made up here, handed to the children by environment only."""

    link_secret: str
    gupshup_key: str
    sms_user: str
    sms_password: str
    push_secret: str
    webhook: dict[str, str]

    @classmethod
    def fresh(cls, merchant_ids: Sequence[str]) -> DemoSecrets:
        """New random values (demo only)."""
        return cls(
            link_secret=secrets.token_urlsafe(32),
            gupshup_key=secrets.token_hex(16),
            sms_user="winback-demo",
            sms_password=secrets.token_hex(12),
            push_secret=secrets.token_hex(24),
            webhook={merchant_id: "whsec_demo_" + secrets.token_hex(24) for merchant_id in merchant_ids},
        )

    def env(self) -> dict[str, str]:
        """The variables the demo config and the executor read."""
        return {
            "WINBACK_LINK_SECRET": self.link_secret,
            GUPSHUP_KEY_ENV: self.gupshup_key,
            GUPSHUP_SMS_ENV: f"{self.sms_user}:{self.sms_password}",
            PUSH_SECRET_ENV: self.push_secret,
            **{webhook_secret_env(merchant_id): secret for merchant_id, secret in self.webhook.items()},
        }


@dataclass(frozen=True)
class FakeEndpoints:
    """Where the local fakes listen."""

    sandbox_url: str
    gupshup_url: str
    smtp_port: int
    push_url: str
    webhook_url: str  # the receiver's base; a merchant's webhook is <webhook_url>/<merchant_id>


def demo_config(endpoints: FakeEndpoints, shipped: Path = DEMO_CONFIG) -> dict[str, Any]:
    """The shipped merchants, each pointed at the local fakes: providers for its retarget channels, a webhook
    on the receiver, and every connector on the sandbox (CONTRACT.md section 4)."""
    raw = read_config_yaml(shipped)
    if not isinstance(raw, dict):
        raise ConfigError(f"{shipped}: expected a mapping of merchants")
    providers: dict[str, dict[str, Any]] = {
        "whatsapp": {
            "kind": "gupshup",
            "base_url": endpoints.gupshup_url,
            "api_key_env": GUPSHUP_KEY_ENV,
            "source": "919000000000",
        },
        "sms": {"kind": "gupshup", "base_url": endpoints.gupshup_url, "api_key_env": GUPSHUP_SMS_ENV},
        "email": {"kind": "smtp", "host": "127.0.0.1", "port": endpoints.smtp_port},
        "push": {"kind": "push_webhook", "base_url": endpoints.push_url, "api_key_env": PUSH_SECRET_ENV},
    }
    for merchant_id, merchant in raw["merchants"].items():
        channels = merchant.get("retarget", {}).get("channels", [])
        merchant["providers"] = {
            channel: providers[channel]
            | ({"sender": f"pay@{merchant_id.replace('_', '-')}.example"} if channel == "email" else {})
            for channel in channels
        }
        merchant["webhook"] = {
            "url": f"{endpoints.webhook_url}/{merchant_id}",
            "secret_env": webhook_secret_env(merchant_id),
        }
        merchant["connector_endpoints"] = {
            connector: {"kind": "sandbox", "base_url": endpoints.sandbox_url} for connector in merchant["connectors"]
        }
    return raw


def write_demo_config(path: Path, endpoints: FakeEndpoints) -> Path:
    """Write the demo config (checked against the contract first) to ``path``."""
    raw = demo_config(endpoints)
    parse_config(raw, source=str(path))
    header = (
        "# Written by `winback demo` for this run: the shipped demo merchants pointed at local fakes.\n"
        "# Secrets are not here: the demo process sets the *_env variables (demo-only values).\n"
    )
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- webhook receiver


class WebhookReceiver:
    """A merchant's webhook endpoint for every demo merchant: records each delivery and checks its signature
    the way a merchant should (HMAC of ``"<t>.<raw body>"`` and a recent ``t``)."""

    def __init__(self, secrets_by_merchant: Mapping[str, str]) -> None:
        self.secrets = dict(secrets_by_merchant)
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def app(self) -> FastAPI:
        """The receiver's ASGI app: ``POST /webhooks/{merchant_id}``, ``GET /_webhooks``."""
        app = FastAPI(title="winback demo webhook receiver")

        @app.post("/webhooks/{merchant_id}")
        async def receive(merchant_id: str, request: Request) -> JSONResponse:
            raw = await request.body()
            secret = self.secrets.get(merchant_id)
            header = request.headers.get(SIGNATURE_HEADER, "")
            valid = secret is not None and verify_signature(secret, header, raw, int(time.time()))
            try:
                body = json.loads(raw)
            except ValueError:
                body = {}
            with self._lock:
                self.received.append(
                    {
                        "merchant_id": merchant_id,
                        "order_id": body.get("order_id"),
                        "event": body.get("event"),
                        "signature_valid": valid,
                        "idempotency_key": request.headers.get("idempotency-key"),
                    }
                )
            if not valid:
                return JSONResponse({"error": "bad signature"}, status_code=401)
            return JSONResponse({"received": True})

        @app.get("/_webhooks")
        async def webhooks() -> list[dict[str, Any]]:
            return self.snapshot()

        return app

    def snapshot(self) -> list[dict[str, Any]]:
        """Every delivery received so far."""
        with self._lock:
            return [dict(entry) for entry in self.received]


# ----------------------------------------------------------------------------------------------- the summary


@dataclass
class LiveSummary:
    """What the loop did so far."""

    demo_time: str
    real_seconds: float
    clock_speed: float
    posted: int
    states: dict[str, int]
    retries: int
    retries_succeeded: int
    sandbox_calls: int
    messages: dict[str, int]
    links_found: int
    links_opened: int
    links_paid: int
    links_declined: int
    webhooks: int
    webhooks_verified: int
    webhook_events: dict[str, int]
    terminal_orders: list[str] = field(default_factory=list)
    webhooks_per_order: dict[str, int] = field(default_factory=dict)
    processes: dict[str, int] = field(default_factory=dict)
    processes_left: list[int] = field(default_factory=list)
    #: Orders in the database the demo did not post (one posted by hand to the running API): not in ``states``.
    other_orders: int = 0

    @property
    def webhook_pending(self) -> list[str]:
        """Terminal orders whose webhook has not arrived yet."""
        return [order_id for order_id in self.terminal_orders if order_id not in self.webhooks_per_order]

    @property
    def one_webhook_per_terminal_order(self) -> bool:
        """Every terminal order got exactly one webhook, and nothing else got one."""
        return set(self.webhooks_per_order) == set(self.terminal_orders) and all(
            count == 1 for count in self.webhooks_per_order.values()
        )

    def orders_by_state(self) -> str:
        """``AWAITING_AGENT 6, PENDING 19, SUCCEEDED 15``."""
        return ", ".join(f"{state} {count}" for state, count in sorted(self.states.items())) or "none yet"

    def counts(self) -> str:
        """The status lines' counts, without the demo clock: the orders by state, then (indented, on a line of its
        own, so neither line is wider than an 80-column terminal) what the loop did."""
        messages = sum(self.messages.values())
        return (
            f"{self.orders_by_state() if self.states else 'no order yet'}\n"
            f"  retries {self.retries} | messages {messages} | links paid {self.links_paid} | "
            f"webhooks {self.webhooks_verified}/{self.webhooks} verified"
        )

    def line(self) -> str:
        """One status: two lines, the first after the demo clock."""
        return f"[{self.demo_time}] {self.counts()}"

    def table(self) -> Table:
        """The summary as a table."""
        speed = f"demo clock x{self.clock_speed:g}" if self.clock_speed != 1 else "real time"
        table = Table(title="winback demo: the recovery loop")
        table.add_column("what", no_wrap=True)
        table.add_column("so far")
        table.add_row("demo time", f"{self.demo_time} ({speed})")
        others = f"; and {count_noun(self.other_orders, 'order')} the demo did not post" if self.other_orders else ""
        table.add_row("failed payments posted", f"{self.posted} (orders by state: {self.orders_by_state()}{others})")
        table.add_row(
            "silent retries",
            f"{self.retries} through the sandbox connector, {self.retries_succeeded} recovered the order "
            f"(sandbox calls: {self.sandbox_calls})",
        )
        by_channel = ", ".join(f"{channel} {count}" for channel, count in sorted(self.messages.items()))
        table.add_row("nudges captured", by_channel or "none yet")
        table.add_row(
            "payment links",
            f"{self.links_found} found by customers, {self.links_opened} opened, {self.links_paid} paid, "
            f"{self.links_declined} declined",
        )
        events = ", ".join(f"{event} {count}" for event, count in sorted(self.webhook_events.items()))
        table.add_row(
            "merchant webhooks",
            f"{self.webhooks} received, {self.webhooks_verified} with a valid signature ({events or 'none yet'})",
        )
        once = "yes" if self.one_webhook_per_terminal_order else f"no ({len(self.webhook_pending)} still on the way)"
        table.add_row("one webhook per terminal order", once)
        return table

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (written to live/summary.json)."""
        return asdict(self) | {"one_webhook_per_terminal_order": self.one_webhook_per_terminal_order}


class StatusLines:
    """When the loop prints a status line: at most one every ``every`` seconds, and only when a count changed.
    While the orders wait (the assisted merchant's for an agent, the others for their next nudge) the same line
    came every 5 s with only the demo clock moved, a dozen times in a row."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self._checked = -math.inf
        self._shown: str | None = None

    def due(self, now: float) -> bool:
        """Whether to look at the counts again (``now``: ``time.monotonic()``)."""
        if now - self._checked < self.every:
            return False
        self._checked = now
        return True

    def line(self, summary: LiveSummary) -> str | None:
        """The status line for ``summary``, or None when its counts are those of the last line shown."""
        counts = summary.counts()
        if counts == self._shown:
            return None
        self._shown = counts
        return summary.line()


# ---------------------------------------------------------------------------------------------- processes


@dataclass
class Child:
    """A child process of the demo (in its own process group, so a terminal's Ctrl-C reaches only the demo,
    which then stops its children in order)."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: signal.Signals

    @property
    def pid(self) -> int:
        """The child's pid (also its process group id)."""
        return self.process.pid

    def log_tail(self, lines: int = 15) -> str:
        """The end of the child's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        """Ask politely, then insist on the whole process group."""
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGTERM)
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    self.process.wait(timeout=5)
        deadline = time.monotonic() + 10
        while group_members(self.pid) and time.monotonic() < deadline:  # e.g. the executor's worker processes
            time.sleep(0.1)
        if group_members(self.pid):
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.pid, sig)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid`` (Linux /proc; empty elsewhere)."""
    found: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


def port_is_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def demo_clock_span(speed: float) -> str:
    """What one real second is on a demo clock ``speed`` times as fast, in its largest whole unit: "1 demo hour"
    (x3600), "1 demo minute" (x60, which read "1 demo minutes"), "1.5 demo minutes", "30 demo seconds"."""
    unit, seconds = next(
        ((unit, size) for unit, size in (("hour", 3600), ("minute", 60)) if speed >= size), ("second", 1)
    )
    amount = speed / seconds
    return f"{amount:g} demo {unit}{'' if amount == 1 else 's'}"


def port_taken(host: str, port: int) -> str | None:
    """What to tell the user when the demo's ``host:port`` cannot be bound now (None: it is free)."""
    if port_is_free(host, port):
        return None
    another = port + 1 if port < 65535 else port - 1
    return (
        f"port {port} on {host} is in use: stop what runs there or pass another --port "
        f'(make demo DEMO_ARGS="--port {another}")'
    )


# ------------------------------------------------------------------------------------------------ the demo


@dataclass(frozen=True)
class LiveOptions:
    """How the live loop runs."""

    workdir: Path
    database_url: str
    tracking_uri: str
    host: str = "127.0.0.1"
    port: int = 8000
    seed: int = 1
    clock_speed: float = 3600.0
    serve: bool = True
    seconds: float = 60.0  # without serve: how long the loop runs before it settles and exits
    pay_share: float = 0.6  # customers who pay a link they got
    look_share: float = 0.15  # customers who open the page and leave


#: ``failed_payment_events(now)``: the failed-payment events to post (decision requests + idempotency key).
EventSource = Callable[[datetime], list[dict[str, Any]]]


#: The demo merchant in assisted mode: its orders wait for an agent in the console.
ASSISTED_DEMO_MERCHANT = "m_uk_retail"
#: The demo merchant with the most live orders: its agent sees every chart filled.
AUTONOMOUS_DEMO_MERCHANT = "m_in_stream"


class LiveDemo:
    """Starts the fakes, the services and the driver; ``stop()`` ends everything it started."""

    def __init__(self, options: LiveOptions, winback: Sequence[str], console: Console) -> None:
        self.options = options
        self.winback = list(winback)
        self.console = console
        self.live_dir = options.workdir / "live"
        self.base_url = f"http://{options.host}:{options.port}"
        self.merchant_ids = list(load_config(DEMO_CONFIG).merchants)
        self.secrets = DemoSecrets.fresh(self.merchant_ids)
        # Console sign-ins (passwords made up per run, printed): the assisted merchant's agent works the queue;
        # the busiest autonomous merchant's agent watches recommendations and the charts fill from its orders.
        self.agents = {
            merchant: (f"agent@{merchant}", secrets.token_urlsafe(9))
            for merchant in (ASSISTED_DEMO_MERCHANT, AUTONOMOUS_DEMO_MERCHANT)
        }
        self.receiver = WebhookReceiver(self.secrets.webhook)
        self.children: list[Child] = []
        self.started = time.monotonic()
        self.origin = time.time()
        self.posted: list[dict[str, Any]] = []
        self.links: dict[str, str] = {}  # token -> what the customer did: pay, look, ignore
        self.outcomes: Counter[str] = Counter()
        self._links_per_order: Counter[str] = Counter()
        self._servers: list[RunningServer] = []
        self._fakes: list[RunningFake] = []
        self._smtp: FakeSmtpServer | None = None
        self._gupshup: RunningFake | None = None
        self._push: RunningFake | None = None
        self._sandbox_state: Any = None
        self._http = httpx.Client(timeout=httpx.Timeout(30.0))
        self._engine: sa.Engine | None = None
        self.config_path = options.workdir / "demo-merchants.yaml"

    # -------------------------------------------------------------------------------------- the clock

    def now(self) -> datetime:
        """The demo clock (the same formula as the executor's ``WINBACK_CLOCK_SPEED`` clock)."""
        speed = self.options.clock_speed
        return datetime.fromtimestamp(self.origin + (time.time() - self.origin) * speed, UTC)

    def _scaled(self, real_seconds: float) -> str:
        return f"{real_seconds * self.options.clock_speed:g}"

    # ------------------------------------------------------------------------------------------ start

    def start_fakes(self) -> FakeEndpoints:
        """The sandbox, the fake providers and the webhook receiver, on free loopback ports."""
        sandbox_app = create_sandbox_app(seed=self.options.seed)
        self._sandbox_state = sandbox_app.state.sandbox
        sandbox = serve_in_thread(sandbox_app)
        self._servers.append(sandbox)
        receiver = serve_in_thread(self.receiver.app())
        self._servers.append(receiver)
        self._gupshup = run_fake_provider(
            "gupshup",
            api_key=self.secrets.gupshup_key,
            username=self.secrets.sms_user,
            password=self.secrets.sms_password,
        ).__enter__()
        self._fakes.append(self._gupshup)
        self._push = run_fake_provider("push", push_secret=self.secrets.push_secret).__enter__()
        self._fakes.append(self._push)
        self._smtp = FakeSmtpServer().__enter__()
        return FakeEndpoints(
            sandbox_url=sandbox.url,
            gupshup_url=self._gupshup.base_url,
            smtp_port=self._smtp.port,
            push_url=f"{self._push.base_url}/push",
            webhook_url=f"{receiver.url}/webhooks",
        )

    def child_env(self, endpoints: FakeEndpoints) -> dict[str, str]:
        """The children's environment: the demo secrets, the demo clock and where everything is."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("WINBACK_")}
        return (
            env
            | self.secrets.env()
            | {
                "WINBACK_ENV": "dev",
                "WINBACK_DATABASE_URL": self.options.database_url,
                "WINBACK_PUBLIC_BASE_URL": self.base_url,
                "WINBACK_SANDBOX_URL": endpoints.sandbox_url,
                "WINBACK_CLOCK_SPEED": f"{self.options.clock_speed:g}",
                "WINBACK_CLOCK_ORIGIN": repr(self.origin),
                # Leases and backoff are in executor (demo-clock) seconds: keep them a few real seconds long.
                "WINBACK_LEASE_SECONDS": self._scaled(30),
                "WINBACK_BACKOFF_BASE_SECONDS": self._scaled(0.5),
                "WINBACK_BACKOFF_CAP_SECONDS": self._scaled(10),
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "DO_NOT_TRACK": "true",
            }
        )

    def _spawn(self, name: str, args: list[str], env: Mapping[str, str], stop_signal: signal.Signals) -> Child:
        log_path = self.live_dir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*self.winback, *args],
                cwd=self.options.workdir,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
        child = Child(name, process, log_path, stop_signal)
        self.children.append(child)
        return child

    def start_services(self, endpoints: FakeEndpoints) -> None:
        """The API (which also serves the agent console; waits until it is ready), then one executor worker."""
        from service.api.store import make_engine
        from service.console.admin import ensure_demo_agent
        from service.migrations import upgrade

        # Migrated here, once: both children then find nothing to do and can start (and load the model) at once.
        engine = make_engine(self.options.database_url)
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        for merchant, (name, password) in self.agents.items():
            ensure_demo_agent(self.options.database_url, merchant, name, password)
        env = self.child_env(endpoints)
        common = ["--config", str(self.config_path), "--tracking-uri", self.options.tracking_uri]
        api = self._spawn(
            "api",
            ["serve", "--host", self.options.host, "--port", str(self.options.port), *common],
            env,
            signal.SIGTERM,
        )
        self._spawn(
            "executor",
            ["executor", "run", "--workers", "1", "--database-url", self.options.database_url, *common],
            env,
            signal.SIGTERM,  # the executor's parent stops its workers on SIGTERM (SIGINT may be ignored here)
        )
        self._wait_ready(api)

    def _wait_ready(self, api: Child, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if api.process.poll() is not None:
                raise RuntimeError(f"the API exited with code {api.process.returncode}:\n{api.log_tail()}")
            try:
                if self._http.get(f"{self.base_url}/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the API was not ready on {self.base_url} within {timeout:.0f} s:\n{api.log_tail()}")

    def check_children(self) -> None:
        """RuntimeError naming a child that exited on its own (with the end of its log)."""
        for child in self.children:
            if child.process.poll() is not None:
                raise RuntimeError(
                    f"the {child.name} process exited with code {child.process.returncode} "
                    f"(log {child.log_path}):\n{child.log_tail()}"
                )

    # ----------------------------------------------------------------------------------------- driver

    def post(self, events: list[dict[str, Any]]) -> None:
        """Post the failed payments, as each merchant's switch would (with that merchant's demo API key)."""
        for event in events:
            response = self._http.post(
                f"{self.base_url}/v1/events/payment-failed",
                json=event,
                headers={"Authorization": f"Bearer wb_demo_{event['merchant_id']}"},
            )
            if response.status_code != 202:
                raise RuntimeError(
                    f"posting order {event['order_id']} answered HTTP {response.status_code}: {response.text[:300]}"
                )
            self.posted.append(event)

    def captured(self) -> dict[str, list[dict[str, Any]]]:
        """Messages captured by the fakes, by channel."""
        found: dict[str, list[dict[str, Any]]] = {}
        if self._gupshup is not None:
            for message in self._gupshup.state.snapshot():
                found.setdefault(str(message.get("channel")), []).append(message)
        if self._push is not None:
            found.setdefault("push", []).extend(self._push.state.snapshot())
        if self._smtp is not None:
            with self._smtp._lock:
                found.setdefault("email", []).extend(dict(m) for m in self._smtp.messages)
        return {channel: messages for channel, messages in found.items() if messages}

    def _choice(self, token: str) -> str:
        # The same customer behaves the same in every run: key the draw on the order's number in the batch
        # and on how many links that order got before (tokens and order ids differ from run to run).
        order_id = _order_of(token)
        nth = self._links_per_order[order_id]
        self._links_per_order[order_id] += 1
        key = f"{self.options.seed}:{order_id.rsplit('_', 1)[-1]}:{nth}"
        draw = random.Random(hashlib.sha256(key.encode()).digest()).random()
        if draw < self.options.pay_share:
            return "pay"
        return "look" if draw < self.options.pay_share + self.options.look_share else "ignore"

    def play_customers(self) -> None:
        """Every new link in a captured message: the customer pays it, only looks, or ignores it."""
        for messages in self.captured().values():
            for message in messages:
                for token in _links_in(message):
                    if token in self.links:
                        continue
                    choice = self.links[token] = self._choice(token)
                    if choice == "ignore":
                        continue
                    page = self._http.get(f"{self.base_url}/pay/{token}")
                    self.outcomes["opened" if page.status_code == 200 else f"page {page.status_code}"] += 1
                    if choice == "pay" and page.status_code == 200:
                        paid = self._http.post(f"{self.base_url}/pay/{token}")
                        outcome = {200: "paid", 402: "declined", 202: "processing"}.get(paid.status_code)
                        self.outcomes[outcome or f"pay {paid.status_code}"] += 1

    # ---------------------------------------------------------------------------------------- summary

    def _db(self) -> sa.Engine:
        if self._engine is None:
            self._engine = sa.create_engine(self.options.database_url)
        return self._engine

    def summary(self) -> LiveSummary:
        """What happened so far (from the database, the fakes and the receiver)."""
        states: dict[str, int] = {}
        other_orders = 0
        terminal: list[str] = []
        retries = retries_succeeded = links_opened = 0
        try:
            with self._db().connect() as conn:
                # The demo's own orders by state: an order posted by hand to the running API made the states add up
                # to 41 beside "40 posted". Those are counted apart.
                own = {(str(event["merchant_id"]), str(event["order_id"])) for event in self.posted}
                by_state = sa.select(orders.c.merchant_id, orders.c.order_id, orders.c.state)
                for merchant_id, order_id, state in conn.execute(by_state):
                    if (merchant_id, order_id) in own:
                        states[str(state)] = states.get(str(state), 0) + 1
                    else:
                        other_orders += 1
                terminal = sorted(
                    conn.scalars(sa.select(orders.c.order_id).where(orders.c.state.in_(["SUCCEEDED", "FAILED"])))
                )
                retry_rows = conn.execute(
                    sa.select(transactions.c.status, sa.func.count())
                    .where(transactions.c.strategy.not_in(NOT_RETRIES))
                    .group_by(transactions.c.status)
                ).all()
                retries = sum(int(count) for _, count in retry_rows)
                retries_succeeded = sum(int(count) for status, count in retry_rows if status == "success")
                links_opened = int(
                    conn.scalar(
                        sa.select(sa.func.count())
                        .select_from(payment_links)
                        .where(payment_links.c.opened_at.is_not(None))
                    )
                    or 0
                )
        except sa.exc.OperationalError:
            pass  # the API has not created the tables yet
        received = self.receiver.snapshot()
        per_order = Counter(str(entry["order_id"]) for entry in received if entry["signature_valid"])
        return LiveSummary(
            demo_time=self.now().strftime("%Y-%m-%d %H:%M UTC"),
            real_seconds=round(time.monotonic() - self.started, 1),
            clock_speed=self.options.clock_speed,
            posted=len(self.posted),
            states=states,
            retries=retries,
            retries_succeeded=retries_succeeded,
            sandbox_calls=int(self._sandbox_state.calls) if self._sandbox_state is not None else 0,
            messages={channel: len(messages) for channel, messages in self.captured().items()},
            links_found=len(self.links),
            links_opened=links_opened,
            links_paid=self.outcomes["paid"],
            links_declined=self.outcomes["declined"],
            webhooks=len(received),
            webhooks_verified=sum(1 for entry in received if entry["signature_valid"]),
            webhook_events=dict(Counter(str(entry["event"]) for entry in received if entry["signature_valid"])),
            terminal_orders=terminal,
            webhooks_per_order=dict(per_order),
            processes={child.name: child.pid for child in self.children},
            other_orders=other_orders,
        )

    def settle(self, timeout: float = 15.0) -> LiveSummary:
        """Wait (bounded) until every terminal order's webhook has arrived; the summary then."""
        deadline = time.monotonic() + timeout
        summary = self.summary()
        while summary.webhook_pending and time.monotonic() < deadline:
            time.sleep(0.5)
            summary = self.summary()
        return summary

    def _live_orders_entries(self) -> list[tuple[str, str, str]]:
        """Where an order's state is read: before the orders are posted, the pattern; after, a real order with its
        merchant's key (the ids were printed nowhere, so ``<order_id>`` left the reader guessing)."""
        if not self.posted:
            return [
                ("live orders", f"{self.base_url}/v1/orders/<order_id>", "Authorization: Bearer wb_demo_<merchant_id>")
            ]
        first, last = self.posted[0], self.posted[-1]
        return [
            (
                "live orders",
                f"{self.base_url}/v1/orders/{first['order_id']}",
                f"Authorization: Bearer wb_demo_{first['merchant_id']}",
            ),
            ("", f"ids {first['order_id']} ... {last['order_id']}", "each with its merchant's key"),
        ]

    def where_to_look(self, endpoints: FakeEndpoints) -> list[str]:
        """The live part's addresses and files."""
        messages = endpoints.push_url.rsplit("/", 1)[0]
        entries = [
            ("agent console", f"{self.base_url}/console/", f"{ASSISTED_DEMO_MERCHANT} is in assisted mode"),
            *(
                ("" if index else "sign in as", f"{name} / {password}", "")
                for index, (name, password) in enumerate(self.agents.values())
            ),
            *self._live_orders_entries(),
            ("captured nudges", f"{endpoints.gupshup_url}/_messages", "WhatsApp, SMS"),
            ("", f"{messages}/_messages", "push"),
            ("", f"e-mail: fake SMTP on port {endpoints.smtp_port}", "counted in the summary"),
            ("webhooks", f"{endpoints.webhook_url.rsplit('/', 1)[0]}/_webhooks", "what the merchants received"),
            ("sandbox", f"{endpoints.sandbox_url}/v1/stats", "charges made by silent retries and links"),
            ("database", self.options.database_url, ""),
            ("API log", str(self.live_dir / "api.log"), ""),
            ("executor log", str(self.live_dir / "executor.log"), ""),
            ("demo config", str(self.config_path), "secrets: made up for this run, in the children's env only"),
        ]
        return [line for label, value, note in entries for line in labelled_lines(label, value, note)]

    # ------------------------------------------------------------------------------------------- stop

    def stop(self) -> list[int]:
        """Stop the children (executor first, then the API) and the in-process servers; pids still alive."""
        for child in reversed(self.children):
            child.stop()
        left = [pid for child in self.children for pid in group_members(child.pid)]
        for server in self._servers:
            server.stop()
        for fake in self._fakes:
            fake.__exit__(None, None, None)
        if self._smtp is not None:
            self._smtp.__exit__(None, None, None)
        self._http.close()
        if self._engine is not None:
            self._engine.dispose()
        return left


def _links_in(message: Mapping[str, Any]) -> list[str]:
    """Link tokens in a captured message: in its text, or (a WhatsApp template) as the URL button's suffix."""
    found = _LINK.findall(json.dumps(message))
    template = message.get("template")
    if isinstance(template, dict) and template.get("params"):
        suffix = str(template["params"][-1])
        if _TOKEN.fullmatch(suffix):
            found.append(suffix)
    return found


def _order_of(token: str) -> str:
    # A link token's payload (before the signature) is base64url JSON naming its order: public, not secret.
    head = token.split(".", 1)[0]
    try:
        return str(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))).get("o", ""))
    except (ValueError, AttributeError):
        return ""


def _fresh_database(database_url: str) -> None:
    # Each demo run starts a fresh order book (the history and the model stay).
    if database_url.startswith("sqlite:///"):
        path = Path(database_url.removeprefix("sqlite:///"))
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def run_live(
    options: LiveOptions,
    events: EventSource,
    winback: Sequence[str],
    console: Console,
    where_to_look: Sequence[str] = (),
) -> LiveSummary:
    """Run the loop: start everything, post the failed payments, play the customers and show the summary;
    until Ctrl-C (``options.serve``) or for ``options.seconds``. Everything started is stopped on the way out.
    The final summary is also written to ``<workdir>/live/summary.json``."""
    if taken := port_taken(options.host, options.port):
        raise RuntimeError(taken)
    demo = LiveDemo(options, winback, console)
    demo.live_dir.mkdir(parents=True, exist_ok=True)
    _fresh_database(options.database_url)
    summary: LiveSummary | None = None
    try:
        # A SIGTERM to the demo (a supervisor, a test timeout) stops the children as Ctrl-C does.
        with sigterm_raises(lambda _signum: KeyboardInterrupt()):
            try:
                endpoints = demo.start_fakes()
                write_demo_config(demo.config_path, endpoints)
                console.print(f"starting the API on {demo.base_url} and an executor worker ...", highlight=False)
                demo.start_services(endpoints)
                lines = [*where_to_look, *demo.where_to_look(endpoints)]
                console.print("\n".join(lines), highlight=False, soft_wrap=True)
                batch = events(demo.now())
                demo.post(batch)
                console.print(
                    f"posted {count_noun(len(batch), 'failed payment')}; the demo clock runs x{options.clock_speed:g} "
                    f"(1 real second = {demo_clock_span(options.clock_speed)})"
                    + ("; Ctrl-C stops everything" if options.serve else f"; running {options.seconds:g} s"),
                    highlight=False,
                    soft_wrap=True,
                )
                begun = time.monotonic()
                deadline = None if options.serve else begun + options.seconds
                status, recapped = StatusLines(), False
                while deadline is None or time.monotonic() < deadline:
                    demo.check_children()
                    demo.play_customers()
                    if status.due(time.monotonic()) and (line := status.line(demo.summary())) is not None:
                        console.print(line, highlight=False, soft_wrap=True)
                    if options.serve and not recapped and time.monotonic() - begun >= options.seconds:
                        # Serving on: the summary so far and where to look once more, then quieter status lines.
                        console.print(demo.summary().table())
                        lines = [*where_to_look, *demo.where_to_look(endpoints)]  # now with a posted order
                        console.print("\n".join(lines), highlight=False, soft_wrap=True)
                        console.print("still serving; Ctrl-C stops everything", highlight=False)
                        recapped, status.every = True, 30.0
                    time.sleep(1.0)
                summary = demo.settle()
            except KeyboardInterrupt:
                console.print("stopping ...")
                summary = demo.summary()
    finally:
        left = demo.stop()
        if summary is None:
            summary = demo.summary()
        summary.processes_left = left
        (demo.live_dir / "summary.json").write_text(json.dumps(summary.as_dict(), indent=1), encoding="utf-8")
    console.print(summary.table())
    stopped = ", ".join(f"{name} (pid {pid})" for name, pid in summary.processes.items())
    console.print(
        f"stopped: {stopped}, sandbox, fake providers, webhook receiver" + (f"; still running: {left}" if left else ""),
        highlight=False,
    )
    return summary
