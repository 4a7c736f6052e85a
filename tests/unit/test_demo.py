"""The demo's pure parts: its config, its failed payments, the executor's demo clock."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from model.merchant_config import parse_config
from pipelines.demo import failed_payment_events
from service.demo import (
    FakeEndpoints,
    LiveSummary,
    StatusLines,
    WebhookReceiver,
    _links_in,
    demo_config,
    webhook_secret_env,
)
from service.executor.schemas import PaymentFailedEvent
from service.executor.settings import ExecutorSettings
from service.executor.webhooks import signature

ENDPOINTS = FakeEndpoints(
    sandbox_url="http://127.0.0.1:9001",
    gupshup_url="http://127.0.0.1:9002",
    smtp_port=9003,
    push_url="http://127.0.0.1:9004/push",
    webhook_url="http://127.0.0.1:9005/webhooks",
)


def test_demo_config_points_every_merchant_at_the_local_fakes() -> None:
    config = parse_config(demo_config(ENDPOINTS))
    assert len(config.merchants) >= 5
    for merchant_id, merchant in config.merchants.items():
        assert set(merchant.providers) == set(merchant.retarget.channels), merchant_id
        assert merchant.webhook is not None
        assert merchant.webhook.url == f"http://127.0.0.1:9005/webhooks/{merchant_id}"
        assert merchant.webhook.secret_env == webhook_secret_env(merchant_id)
        endpoints = {c: (e.kind, e.base_url) for c, e in merchant.connector_endpoints.items()}
        assert endpoints == dict.fromkeys(merchant.connectors, ("sandbox", "http://127.0.0.1:9001"))
        for provider in merchant.providers.values():
            assert provider.base_url is None or provider.base_url.startswith("http://127.0.0.1:")
            assert provider.host in (None, "127.0.0.1")


def test_failed_payment_events_are_valid_events_with_addresses_for_the_channels_the_customer_has() -> None:
    now = datetime(2026, 11, 22, 6, 0, tzinfo=UTC)
    events = failed_payment_events(seed=1, count=12, first_index=300, now=now, run="t")
    assert len({e["order_id"] for e in events}) == 12
    for event in events:
        parsed = PaymentFailedEvent.model_validate(event)
        assert parsed.event_time == now
        assert [a.created_at for a in parsed.history.attempts] == [now]
        customer = event["customer"]
        assert ("phone" in customer) == customer["phone_present"]
        assert ("email" in customer) == customer["email_present"]
        assert ("device_token" in customer) == customer["app_present"]
    assert failed_payment_events(1, 12, 300, now, "t") == events  # the same seed gives the same payments


def test_demo_clock_runs_faster_from_its_origin_and_only_in_dev() -> None:
    started = datetime.now(UTC).timestamp()
    origin = started - 10.0
    clock = ExecutorSettings(clock_speed=3600, clock_origin=origin).clock()
    ahead = clock() - datetime.fromtimestamp(origin, UTC)
    # Bounded by the wall time that really passed, so a slow machine (settings built in a second) does not fail it.
    passed = datetime.now(UTC).timestamp() - origin
    assert timedelta(hours=10) - timedelta(seconds=1) <= ahead <= timedelta(seconds=passed * 3600 + 1)
    wall = ExecutorSettings().clock()()
    assert abs(wall - datetime.now(UTC)) < timedelta(seconds=5)
    with pytest.raises(ValidationError, match=r"WINBACK_CLOCK_SPEED=3600\.0 .* only with WINBACK_ENV=dev"):
        ExecutorSettings(env="test", link_secret="x" * 40, clock_speed=3600)


def test_links_are_found_in_texts_and_in_whatsapp_url_buttons() -> None:
    token = "eyJ0IjoibG5rXzEyMyJ9abc.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    assert _links_in({"text": f"Pay here: http://127.0.0.1:8000/pay/{token} (valid 24 h)"}) == [token]
    assert _links_in({"template": {"id": "payment_link", "params": ["there", "m", "INR 10", "x", token]}}) == [token]
    assert _links_in({"template": {"id": "payment_link", "params": ["there", "m", "INR 10.00", "x"]}}) == []


def test_webhook_receiver_accepts_only_valid_signatures() -> None:
    import httpx

    from service.executor.sandbox import serve_in_thread

    receiver = WebhookReceiver({"m_a": "secret-a"})
    body = b'{"event":"order.failed","order_id":"o1"}'
    now = int(datetime.now(UTC).timestamp())
    server = serve_in_thread(receiver.app())
    try:
        codes = [
            httpx.post(
                f"{server.url}/webhooks/m_a", content=body, headers={"Winback-Signature": signature(secret, now, body)}
            ).status_code
            for secret in ("secret-a", "other")
        ]
    finally:
        server.stop()
    assert codes == [200, 401]
    assert [(e["order_id"], e["signature_valid"]) for e in receiver.snapshot()] == [("o1", True), ("o1", False)]


def _summary(demo_time: str, succeeded: int) -> LiveSummary:
    return LiveSummary(
        demo_time=demo_time, real_seconds=0.0, clock_speed=3600.0, posted=40,
        states={"AWAITING_AGENT": 6, "PENDING": 34 - succeeded, "SUCCEEDED": succeeded}, retries=19,
        retries_succeeded=3, sandbox_calls=20, messages={"sms": 15}, links_found=9, links_opened=5, links_paid=3,
        links_declined=1, webhooks=succeeded, webhooks_verified=succeeded, webhook_events={},
    )  # fmt: skip


def test_the_status_line_comes_when_a_count_changed_not_every_time_the_clock_moved() -> None:
    # A `make demo` run printed "orders: AWAITING_AGENT 6, PENDING 25, SUCCEEDED 9 | retries 19 | ..." five times
    # in a row, 5 s apart, each with only the demo time in front of it changed.
    status = StatusLines(every=5.0)
    printed = []
    for second, (demo_time, succeeded) in enumerate(
        [("09:10", 9), ("10:10", 9), ("11:10", 9), ("12:10", 9), ("13:10", 14), ("14:10", 14)]
    ):
        for tick in range(5):  # the loop looks every second
            now = second * 5.0 + tick
            if status.due(now) and (line := status.line(_summary(f"2026-12-07 {demo_time} UTC", succeeded))):
                printed.append(line)
    assert printed == [
        "[2026-12-07 09:10 UTC] AWAITING_AGENT 6, PENDING 25, SUCCEEDED 9\n"
        "  retries 19 | messages 15 | links paid 3 | webhooks 9/9 verified",
        "[2026-12-07 13:10 UTC] AWAITING_AGENT 6, PENDING 20, SUCCEEDED 14\n"
        "  retries 19 | messages 15 | links paid 3 | webhooks 14/14 verified",
    ]


def test_where_to_look_fits_80_columns_and_keeps_every_address_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # `make demo` printed its "where to look" lines 84 to 140 characters wide (the agent sign-ins, the captured
    # messages' three addresses, the MLflow store beside its `mlflow ui` command), folded mid-URL by a terminal.
    from rich.console import Console

    import pipelines.demo
    from pipelines.demo import demo_paths, where_to_look
    from service.demo import LiveDemo, LiveOptions

    workdir = Path("/home/newcomer/winback/demo")  # as a clone in a home folder has it
    report = workdir / "mlruns/artifacts/ea64075e353c49a38a6f8dff64df23ca/artifacts/evaluation/evaluation.md"
    monkeypatch.setattr(pipelines.demo, "evaluation_report", lambda _paths: str(report))
    options = LiveOptions(
        workdir=workdir, database_url=f"sqlite:///{workdir}/winback.db",
        tracking_uri=f"sqlite:///{workdir}/mlruns/mlflow.db", host="127.0.0.1", port=8000, seed=1,
        clock_speed=3600.0, serve=False, seconds=60.0, pay_share=0.6,
    )  # fmt: skip
    demo = LiveDemo(options, ["winback"], Console())
    live = demo.where_to_look(ENDPOINTS)
    before = where_to_look(demo_paths(workdir), "127.0.0.1", 8000).splitlines()
    for line in [*before, *live]:
        # Only a value wider than a line by itself (a run's evaluation report under a deep folder) may be wider.
        assert len(line) <= 80 or line == f"    {report}", line
    shown = "\n".join(live)
    for agent, password in demo.agents.values():
        assert any(line.endswith(f" {agent} / {password}") for line in live), shown
    for address in (
        "http://127.0.0.1:8000/console/", "http://127.0.0.1:9002/_messages", "http://127.0.0.1:9004/_messages",
        "port 9003", "http://127.0.0.1:9005/_webhooks", "http://127.0.0.1:9001/v1/stats",
        f"{workdir}/live/api.log", f"{workdir}/live/executor.log", f"{workdir}/demo-merchants.yaml",
        "Authorization: Bearer wb_demo_<merchant_id>",
    ):  # fmt: skip
        assert address in shown, (address, shown)
    assert f"    {report}" in before
    assert f"      sqlite:///{workdir}/mlruns/mlflow.db" in before  # under `mlflow ui --backend-store-uri \\`
    # Once the orders are posted, the recap names a real one and its merchant's key: `<order_id>` was all a newcomer
    # had, and no order id was printed anywhere.
    demo.posted.extend(
        {"order_id": f"live_ab12cd_{n:03d}", "merchant_id": merchant}
        for n, merchant in enumerate(["m_in_stream", "m_us_saas", "m_uk_retail"])
    )
    recap = "\n".join(demo.where_to_look(ENDPOINTS))
    assert "http://127.0.0.1:8000/v1/orders/live_ab12cd_000" in recap, recap
    assert "Authorization: Bearer wb_demo_m_in_stream" in recap
    assert "live_ab12cd_000 ... live_ab12cd_002" in " ".join(recap.split())
    assert all(len(line) <= 80 for line in recap.splitlines()), recap


def test_a_second_demo_says_it_reuses_the_history_and_the_champion_and_how_to_start_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second `make demo DEMO_ARGS="--orders 2000"` said "using the history already in ..." and "a champion is
    # already registered in ...": not that --orders was not applied, which champion it was, or how to start afresh.
    import io

    from rich.console import Console

    import pipelines.demo

    history = tmp_path / "demo" / "history"
    history.mkdir(parents=True)
    (history / "attempts.parquet").touch()
    (history / "nudges.parquet").touch()
    monkeypatch.setattr(pipelines.demo, "get_alias_version", lambda alias, tracking_uri: "4")
    printed = io.StringIO()
    pipelines.demo.prepare(
        tmp_path / "demo", orders=2000, seed=1, episodes=0, console=Console(file=printed, width=1000)
    )
    lines = printed.getvalue().splitlines()
    assert lines == [
        f"using the history already in {history}, not simulated again (--orders and --seed apply to a new one: "
        "`make clean`, or another --workdir)",
        f"using version 4, the champion already registered in sqlite:///{tmp_path / 'demo' / 'mlruns' / 'mlflow.db'}, "
        "not trained again",
    ]


def test_the_status_and_the_summary_fit_80_columns() -> None:
    # The status line was 113-140 characters wide ("... | webhooks 17/17 verified"), folded anywhere by an
    # 80-column terminal, and the summary's title wrapped to "... demo time 2026-12-10 16:29" over "UTC)".
    import io

    from rich.console import Console

    busy = _summary("2026-12-10 09:12 UTC", 150)
    busy.states = {"AWAITING_AGENT": 60, "FAILED": 120, "PENDING": 170, "SUCCEEDED": 150}
    busy.retries, busy.messages, busy.links_paid, busy.webhooks, busy.webhooks_verified = (
        430,
        {"sms": 330},
        80,
        270,
        270,
    )
    lines = busy.line().splitlines()
    assert lines == [
        "[2026-12-10 09:12 UTC] AWAITING_AGENT 60, FAILED 120, PENDING 170, SUCCEEDED 150",
        "  retries 430 | messages 330 | links paid 80 | webhooks 270/270 verified",
    ]
    assert all(len(line) <= 80 for line in lines)
    printed = io.StringIO()
    Console(file=printed, width=80).print(busy.table())
    table = printed.getvalue().splitlines()
    assert table[0].strip() == "winback demo: the recovery loop", printed.getvalue()
    demo_time = next(line for line in table if "demo time" in line)
    assert "2026-12-10 09:12 UTC (demo clock x3600)" in demo_time, printed.getvalue()


def test_where_to_look_gives_an_mlflow_ui_command_that_runs_in_a_fresh_clone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `make demo` said to run `mlflow ui --backend-store-uri ...`: after `make demo` in a fresh clone only
    # .venv/bin/mlflow exists, and a shell without .venv/bin on its PATH answered "mlflow: command not found".
    from pipelines.demo import demo_paths, where_to_look

    clone = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(clone)  # where `make demo` runs
    lines = where_to_look(demo_paths(tmp_path / "demo"), "127.0.0.1", 8000).splitlines()
    first = next(index for index, line in enumerate(lines) if " ui --backend-store-uri \\" in line)
    command = lines[first].removesuffix("\\").split() + lines[first + 1].split()
    assert command[0] == ".venv/bin/mlflow", lines[first]

    bare_path = {"PATH": "/usr/local/bin:/usr/bin:/bin", "MLFLOW_DISABLE_TELEMETRY": "true"}
    result = subprocess.run([*command, "--help"], cwd=clone, env=bare_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--backend-store-uri" in result.stdout


@pytest.mark.parametrize(
    ("speed", "span"),
    [
        (3600.0, "1 demo hour"),
        (7200.0, "2 demo hours"),
        (60.0, "1 demo minute"),
        (90.0, "1.5 demo minutes"),
        (30.0, "30 demo seconds"),
        (1.0, "1 demo second"),
    ],
)
def test_the_demo_clock_is_said_in_its_largest_whole_unit(speed: float, span: str) -> None:
    # `make demo DEMO_ARGS="--clock-speed 60"` printed "(1 real second = 1 demo minutes)", and the default
    # "60 demo minutes" where the README says "one real second is one demo hour".
    from service.demo import demo_clock_span

    assert demo_clock_span(speed) == span


def test_the_summary_counts_the_demos_own_orders_not_one_posted_by_hand(tmp_path: Path) -> None:
    # (Newcomer walk.) After posting an order of their own to the running demo's API, the summary read "failed
    # payments posted: 2 (orders by state: AWAITING_AGENT 3)": every order in the database, beside the demo's count.
    import json

    from rich.console import Console

    from service.api.app import create_app
    from service.demo import LiveDemo, LiveOptions
    from tests.factories import make_request, write_console_config
    from tests.unit.test_api import Api, settings_for

    settings = settings_for(tmp_path, config_path=write_console_config(tmp_path / "console-merchants.yaml"))
    api = Api(create_app(settings))
    try:
        for order_id in ("demo_1", "demo_2", "by_hand"):
            request = make_request(merchant_id="m_a", order_id=order_id, event_time=datetime.now(UTC).isoformat())
            body = json.loads(request.model_dump_json()) | {"idempotency_key": f"evt_{order_id}"}
            answer = api.post("/v1/events/payment-failed", body, key="wb_demo_m_a")
            assert answer.status_code == 202, answer.text
    finally:
        api.close()
    options = LiveOptions(
        workdir=tmp_path, database_url=settings.database_url, tracking_uri="", host="127.0.0.1", port=8000, seed=1,
        clock_speed=3600.0, serve=False, seconds=60.0, pay_share=0.6,
    )  # fmt: skip
    demo = LiveDemo(options, ["winback"], Console())
    demo.posted.extend({"merchant_id": "m_a", "order_id": order_id} for order_id in ("demo_1", "demo_2"))
    summary = demo.summary()
    assert (summary.posted, summary.states) == (2, {"AWAITING_AGENT": 2})
    assert summary.other_orders == 1
    shown = Console(width=200, record=True)
    shown.print(summary.table())
    assert "2 (orders by state: AWAITING_AGENT 2; and 1 order the demo did not post)" in shown.export_text()
