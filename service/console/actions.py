"""What an agent can do to an order waiting for it, each carried out by the executor and written to the audit log.

Every action is judged first by the hard rules (``model.rules.check``) on the order's decision request as of now;
an action a rule forbids is refused with the rule's name, and nothing is carried out. A permitted action goes
through ``Executor.act_on_queued``: the recommendation itself is approved (or rejected, to stop); an action of the
agent's own choosing (a link on another channel, another retry, an override) is recorded as a decision of model
``agent`` that supersedes the queued one, then approved, so the executor carries it out like any decision.
The audit row is written before the executor acts (``requested``) and settled after (``done`` or ``failed``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal

import orjson
import sqlalchemy as sa

from model.catalog import ErrorCatalog
from model.merchant_config import QuietHours
from model.policy import new_decision_id
from model.requests import Alternative, Decision, DecisionRequest
from model.rules import Candidate, Rule, RuleContext, RuleInputError, build_context, check, quiet_hours_end
from model.vocab import Action, Channel
from service.api.store import decision_row, decisions
from service.console.auth import Agent
from service.console.store import audit_log
from service.console.views import ORDERS_A_STATEMENT, channel_name, describe_decision, local_time, merchant_zone
from service.executor.by_hand import CaseResolutionError, CaseT, Marked, already_done, mark_cases_done
from service.executor.core import (
    CHARGE_KIND_VALUES,
    AgentQueueError,
    ChargeDispute,
    ChargeResolutionError,
    DisputeResolutionError,
    Executor,
    OrderNotFoundError,
    resolve_charge_disputes,
)
from service.executor.store import OPEN_ORDER_STATES, ActionState, OrderState, actions, agent_queue, orders

log = logging.getLogger("winback.console")

AgentAction = Literal["approve", "send_link", "retry", "stop", "override"]
AGENT_ACTIONS: tuple[str, ...] = ("approve", "send_link", "retry", "stop", "override")
#: Recorded in the audit log when an agent answers for a charge that was sent and never answered.
RESOLVE_CHARGE = "resolve_charge"
#: Recorded in the audit log when an agent marks a charge dispute as dealt with.
RESOLVE_DISPUTE = "resolve_dispute"
#: Recorded in the audit log when an agent marks a refund by hand or a possible double payment as dealt with.
RESOLVE_BY_HAND = "resolve_by_hand"
#: What the audit log names an agent's action by (anything else is ``unknown``).
AUDITED_ACTIONS = (*AGENT_ACTIONS, RESOLVE_CHARGE, RESOLVE_DISPUTE, RESOLVE_BY_HAND)
AGENT_MODEL_VERSION = "agent"
MAX_REASON_LENGTH = 1000


@dataclass(frozen=True)
class ActionRequest:
    """What the agent asked for: the action, and the channel, alternative or reason it needs; ``decision_id``:
    the recommendation the agent's page showed (the action is refused when another one waits now)."""

    action: str
    channel: str | None = None
    alternative: int | None = None
    reason: str = ""
    decision_id: str | None = None


#: The result of a mark as dealt with of what was dealt with before: nothing changed, shown as information (not a
#: refusal: it is dealt with, as the agent wanted), the try kept in the audit log.
UNCHANGED: Literal["unchanged"] = "unchanged"


@dataclass(frozen=True)
class ActionResult:
    """How it went: ``done``, ``refused`` (a hard rule or the order's state forbids it), ``failed``, or
    ``unchanged`` (what it asked for was so already: a case marked dealt with before; nothing written)."""

    result: Literal["done", "refused", "failed", "unchanged"]
    message: str
    rules: list[str] = field(default_factory=list)
    state: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the action was carried out."""
        return self.result == "done"


@dataclass(frozen=True)
class ForbiddenOptions:
    """The hard rules that forbid a waiting recommendation now (empty: permitted) and each of its alternatives',
    in the recommendation's order."""

    recommendation: list[str] = field(default_factory=list)
    alternatives: list[list[str]] = field(default_factory=list)
    #: A payment link sent now by each of the merchant's channels (opted out, quiet hours, no nudge left ...).
    links: dict[str, list[str]] = field(default_factory=dict)

    @property
    def no_link(self) -> bool:
        """Whether the hard rules forbid a link by every channel now."""
        return bool(self.links) and all(self.links.values())

    def of(self, option: Decision | Alternative | None, pending: Decision) -> list[str]:
        """The rules forbidding ``option``, the recommendation or one of its alternatives (none for None)."""
        if option is pending:
            return self.recommendation
        index = next((i for i, alt in enumerate(pending.alternatives) if alt is option), None)
        return [] if index is None or index >= len(self.alternatives) else self.alternatives[index]


class UnknownOrderError(LookupError):
    """The agent's merchant has no such order."""


@dataclass(frozen=True)
class _Plan:
    candidate: Candidate
    detail: str
    via_queue: Literal["approve", "reject"] | None  # the queued decision as it is, or None: the agent's own
    p_success: float


def _rules_forbidding(context: RuleContext, candidate: Candidate) -> list[str]:
    """The names of the hard rules that forbid ``candidate`` (empty: permitted)."""
    return [str(rule) for rule in check(context, candidate).broken]


def _candidate_of(decision: Decision | Alternative, now: datetime) -> Candidate:
    return Candidate(
        action=decision.action,
        execute_at=max(decision.execute_at.astimezone(UTC), now),
        strategy=decision.strategy,
        connector=decision.connector,
        channel=decision.channel,
    )


def _same(candidate: Candidate, decision: Decision | Alternative) -> bool:
    return (candidate.action, candidate.strategy, candidate.connector, candidate.channel) == (
        decision.action,
        decision.strategy,
        decision.connector,
        decision.channel,
    )


def _quiet_hours_note(context: RuleContext, candidate: Candidate, quiet: QuietHours) -> str:
    """What a refusal by the quiet hours adds: when they are and the earliest moment they allow (the rules' own end
    of them, in the customer's zones too), in the merchant's zone and UTC; and the rules that forbid it even then.
    "" when the rules see no quiet hours at the candidate's time (nothing to add)."""
    end = quiet_hours_end(context, candidate.execute_at)
    if end is None:
        return ""
    zone = context.merchant_timezone
    local = end.astimezone(zone)
    where = f"{quiet.start}-{quiet.end} {quiet.timezone}"
    if context.customer_zones:
        where += f", and in the customer's zone{'s' if len(context.customer_zones) > 1 else ''} "
        where += ", ".join(str(customer_zone) for customer_zone in context.customer_zones)
    sent = candidate.execute_at.astimezone(zone)
    note = (
        f"; its send time, {sent:%H:%M} on {sent.day} {sent:%b} {quiet.timezone}, falls in the quiet hours "
        f"({where}): the earliest it may go is {local:%H:%M} on {local.day} {local:%b} "
        f"({end.astimezone(UTC):%H:%M} UTC)"
    )
    later = check(context, replace(candidate, execute_at=end))
    if not later.allowed:
        note += f", but then it is refused by: {', '.join(str(rule) for rule in later.broken)}"
    return note


class ActionRefusedError(Exception):
    """The action cannot be planned (bad input or nothing to act on); the message says why."""


def _plan(ask: ActionRequest, pending: Decision, now: datetime) -> _Plan:
    if ask.action == "approve":
        return _Plan(
            _candidate_of(pending, now),
            f"carry out the recommendation: {describe_decision(pending)}",
            "approve",
            pending.expected_success,
        )
    if ask.action == "stop":
        return _Plan(Candidate(Action.STOP, now), "stop recovering this order", "reject", 0.0)
    if ask.action == "send_link":
        try:
            channel = Channel(ask.channel or "")
        except ValueError:
            raise ActionRefusedError(
                f"unknown channel {ask.channel!r}: choose one of {', '.join(c.value for c in Channel)}"
            ) from None
        candidate = Candidate(Action.RETARGET, now, channel=channel)
        options: list[Decision | Alternative] = [pending, *pending.alternatives]
        p = next(
            (
                option.p_success if isinstance(option, Alternative) else option.expected_success
                for option in options
                if _same(candidate, option)
            ),
            0.0,
        )
        return _Plan(candidate, f"send a payment link by {channel_name(channel.value)} now", None, p)
    if ask.action == "retry":
        if pending.action == Action.RETRY:
            return _Plan(
                _candidate_of(pending, now),
                f"schedule the recommended retry: {describe_decision(pending)}",
                "approve",
                pending.expected_success,
            )
        retry = next((alt for alt in pending.alternatives if alt.action == Action.RETRY), None)
        if retry is None:
            raise ActionRefusedError(
                "no silent retry is permitted for this order (none among the recommendation's alternatives)"
            )
        return _Plan(
            _candidate_of(retry, now), f"schedule the best retry: {describe_decision(retry)}", None, retry.p_success
        )
    if ask.action == "override":
        if not ask.reason.strip():
            raise ActionRefusedError("an override needs a reason: say why the recommendation is not followed")
        if ask.alternative is None or not 0 <= ask.alternative < len(pending.alternatives):
            raise ActionRefusedError("choose one of the listed alternatives to override the recommendation with")
        chosen = pending.alternatives[ask.alternative]
        via: Literal["reject"] | None = "reject" if chosen.action == Action.STOP else None
        return _Plan(_candidate_of(chosen, now), f"override with: {describe_decision(chosen)}", via, chosen.p_success)
    raise ActionRefusedError(f"unknown action {ask.action!r}: use one of {', '.join(AGENT_ACTIONS)}")


class AgentDesk:
    """Agents' actions on their merchant's orders, through the executor."""

    def __init__(self, executor: Executor, catalog: ErrorCatalog, clock: Callable[[], datetime] | None = None) -> None:
        self.executor = executor
        self.catalog = catalog
        self.clock = clock or executor.clock

    def _audit(
        self,
        conn: sa.Connection,
        agent: Agent,
        order_id: str,
        ask: ActionRequest,
        detail: str,
        result: str,
        now: datetime,
        *,
        rules: list[str] | None = None,
        message: str | None = None,
        decision_id: str | None = None,
    ) -> int:
        inserted = conn.execute(
            audit_log.insert().values(
                merchant_id=agent.merchant_id,
                order_id=order_id,
                agent_id=agent.agent_id,
                agent_name=agent.name,
                action=ask.action if ask.action in AUDITED_ACTIONS else "unknown",
                detail=detail[:2000],
                reason=ask.reason.strip()[:MAX_REASON_LENGTH] or None,
                result=result,
                rules=",".join(rules or []) or None,
                message=message,
                decision_id=decision_id,
                created_at=now,
            )
        )
        key = inserted.inserted_primary_key
        assert key is not None
        return int(key[0])

    def perform(self, agent: Agent, order_id: str, ask: ActionRequest) -> ActionResult:
        """Judge ``ask`` by the hard rules and, if permitted, carry it out; always leaves an audit row.

        UnknownOrderError when the agent's merchant has no such order (another merchant's order included).
        """
        now = self.clock()
        merchant = self.executor.merchant(agent.merchant_id)
        with self.executor.engine.begin() as conn:
            # Locked (PostgreSQL): two agents planning actions on one order plan one after the other.
            order = self.executor.lock_order(conn, agent.merchant_id, order_id)
            if order is None:
                raise UnknownOrderError(f"order {order_id!r} is not known")
            item = (
                conn.execute(
                    sa.select(agent_queue)
                    .where(
                        agent_queue.c.merchant_id == agent.merchant_id,
                        agent_queue.c.order_id == order_id,
                        agent_queue.c.state == "pending",
                    )
                    .order_by(agent_queue.c.item_id.desc())
                    .limit(1)
                )
                .mappings()
                .first()
            )
            held = self._held(conn, order, merchant.mode, agent, waiting=item is not None)
            if held is not None or item is None:
                message = held or "no recommendation is waiting for an agent"
                self._audit(
                    conn, agent, order_id, ask, f"{ask.action} (not possible now)", "refused", now, message=message
                )
                return ActionResult("refused", message, state=order["state"])
            pending = Decision.model_validate_json(item["decision_json"])
            if ask.decision_id is not None and ask.decision_id != pending.decision_id:
                # The page showed another recommendation (the order was decided again since): an alternative's
                # number, or "carry it out", would act on one the agent never saw.
                message = (
                    f"the recommendation changed since this page was loaded (it showed {ask.decision_id}, "
                    f"{pending.decision_id} waits now): review the order again"
                )
                self._audit(conn, agent, order_id, ask, f"{ask.action} (stale page)", "refused", now, message=message)
                return ActionResult("refused", message, state=order["state"])
            try:
                plan = _plan(ask, pending, now)
                request = self.executor.request_for(conn, order, now)
                context = build_context(request, merchant, self.catalog)
                verdict = check(context, plan.candidate)
            except (ActionRefusedError, RuleInputError) as exc:
                self._audit(conn, agent, order_id, ask, ask.action, "refused", now, message=str(exc))
                return ActionResult("refused", str(exc), state=order["state"])
            if not verdict.allowed:
                rules = [str(rule) for rule in verdict.broken]
                message = f"refused by the hard rules: {', '.join(rules)}"
                if Rule.QUIET_HOURS in verdict.broken:
                    message += _quiet_hours_note(context, plan.candidate, merchant.retarget.quiet_hours)
                self._audit(conn, agent, order_id, ask, plan.detail, "refused", now, rules=rules, message=message)
                return ActionResult("refused", message, rules=rules, state=order["state"])
            decision_id: str | None = pending.decision_id
            item_id = int(item["item_id"])
            if plan.via_queue is None:
                decision = self._agent_decision(
                    agent,
                    ask,
                    pending,
                    plan,
                    request_rules=build_context(request, merchant, self.catalog).rules_applied,
                )
                decision_id = decision.decision_id
                conn.execute(decisions.insert().values(**decision_row(request, decision, created_at=now)))
                conn.execute(
                    agent_queue.update()
                    .where(agent_queue.c.item_id == item["item_id"])
                    .values(
                        state="superseded", agent=agent.name, reason=ask.reason.strip() or plan.detail, acted_at=now
                    )
                )
                inserted = conn.execute(
                    agent_queue.insert().values(
                        merchant_id=agent.merchant_id,
                        order_id=order_id,
                        decision_id=decision.decision_id,
                        decision_json=decision.model_dump_json(),
                        request_json=request.model_dump_json(),
                        state="pending",
                        created_at=now,
                    )
                )
                key = inserted.inserted_primary_key
                assert key is not None
                item_id = int(key[0])
            audit_id = self._audit(conn, agent, order_id, ask, plan.detail, "requested", now, decision_id=decision_id)
        verb = plan.via_queue or "approve"
        try:
            # This very queued decision: if another agent acted on the order meanwhile, it is not waiting any more.
            state = self.executor.act_on_queued(
                order_id, verb, agent.name, ask.reason.strip() or plan.detail, agent.merchant_id, item_id
            )
        except (AgentQueueError, OrderNotFoundError) as exc:
            message = f"the order changed meanwhile: {self._what_happened(agent, order_id, merchant.mode) or exc}"
            self._settle(audit_id, "failed", message)
            return ActionResult("failed", message)
        except Exception as exc:
            self._settle(audit_id, "failed", _unexpected(exc))
            raise
        message = f"{plan.detail[0].upper()}{plan.detail[1:]}: done; the order is {state}"
        self._settle(audit_id, "done", message)
        log.info(
            "agent action",
            extra={"merchant_id": agent.merchant_id, "order_id": order_id, "agent": agent.name, "action": ask.action},
        )
        return ActionResult("done", message, state=state)

    def forbidden_now(self, merchant_id: str, order_id: str, pending: Decision) -> ForbiddenOptions:
        """The hard rules that forbid, as of now, what the order page offers of ``pending``: the recommendation
        itself, each alternative and a link by each channel (``perform`` would refuse it with them). A
        recommendation waits until an agent acts, and a rule may forbid it meanwhile (a one-off payment's retry an
        hour after the customer left: the page offered "Carry it out" as its first action, refused at every
        click)."""
        now = self.clock()
        with self.executor.engine.connect() as conn:
            order = _order_row(conn, merchant_id, order_id)
            if order is None:
                return ForbiddenOptions()
            request = self.executor.request_for(conn, order, now)
        merchant = self.executor.merchant(merchant_id)
        try:
            context = build_context(request, merchant, self.catalog)
        except RuleInputError:
            return ForbiddenOptions()  # an action is refused with the reason itself

        def broken(option: Decision | Alternative) -> list[str]:
            return _rules_forbidding(context, _candidate_of(option, now))

        links = {
            channel.value: _rules_forbidding(context, Candidate(Action.RETARGET, now, channel=channel))
            for channel in merchant.retarget.channels
        }
        return ForbiddenOptions(
            recommendation=broken(pending),
            alternatives=[broken(option) for option in pending.alternatives],
            links=links,
        )

    def forbidden_recommendations(self, merchant_id: str, pending: Mapping[str, Decision]) -> dict[str, list[str]]:
        """The hard rules that forbid, as of now, each recommendation of ``pending`` (order id: the decision
        waiting for an agent), for the queue's rows: the orders without any are left out. The queue listed a
        recommendation the rules forbid by now (a one-off payment's retry after the customer left) as if it could
        be carried out.

        Cheap, for hundreds of rows: no order's history is read again (``forbidden_now`` reads it, six statements
        an order: 0.6 s for the queue's 200 rows, where the page took 20 ms). The rules are checked against the
        request the recommendation was decided on, stored with it, at the time it would go now: what time alone
        forbade since (the customer left the session, the retry window closed). What happened to the order since
        is the order page's to say, and the executor's to refuse."""
        if not pending:
            return {}
        now = self.clock()
        merchant = self.executor.merchant(merchant_id)
        found: dict[str, list[str]] = {}
        names = sorted(pending)
        with self.executor.engine.connect() as conn:
            stored = [
                row
                for start in range(0, len(names), ORDERS_A_STATEMENT)
                for row in conn.execute(
                    sa.select(agent_queue.c.order_id, agent_queue.c.decision_id, agent_queue.c.request_json).where(
                        agent_queue.c.merchant_id == merchant_id,
                        agent_queue.c.state == "pending",
                        agent_queue.c.order_id.in_(names[start : start + ORDERS_A_STATEMENT]),
                    )
                )
            ]
        for order_id, decision_id, request_json in stored:
            decision = pending[order_id]
            if decision.decision_id != decision_id:
                continue
            try:
                context = build_context(DecisionRequest.model_validate_json(request_json), merchant, self.catalog)
            except (RuleInputError, ValueError):
                continue  # an action is refused with the reason itself
            broken = _rules_forbidding(context, _candidate_of(decision, now))
            if broken:
                found[order_id] = broken
        return found

    def _held(self, conn: sa.Connection, order: sa.RowMapping, mode: str, agent: Agent, *, waiting: bool) -> str | None:
        """Why ``agent`` cannot act on ``order`` now (None: they can); ``mode``: its merchant's; ``waiting``: a
        recommendation waits."""
        if order["state"] != OrderState.AWAITING_AGENT or not waiting:
            return _not_waiting(conn, order, mode, agent)
        unknown = self.executor.unknown_charge(conn, order)
        if unknown is not None:
            return (
                f"a charge of order {order['order_id']} (action {unknown}) was sent and never answered: record what "
                "its connector says first; until then nothing else is done to the order"
            )
        return None

    def _what_happened(self, agent: Agent, order_id: str, mode: str) -> str | None:
        """What another agent (or the customer) did to an order ``agent`` planned an action on at the same moment
        (None: it still waits for an agent): told "order 'X' is PENDING: it does not wait for an agent", the agent
        did not learn that a colleague's action had been carried out, nor which."""
        with self.executor.engine.connect() as conn:
            order = _order_row(conn, agent.merchant_id, order_id)
            if order is None or order["state"] == OrderState.AWAITING_AGENT:
                return None
            return _not_waiting(conn, order, mode, agent)

    def resolve_charge(self, agent: Agent, order_id: str, action_id: int, charged: bool, reason: str) -> ActionResult:
        """Record what the connector says about a charge of ``order_id`` that was sent and never answered
        (``Executor.resolve_charge``): ``charged`` makes it the order's success (one webhook); otherwise the order
        is decided again. The agent must say how they know (``reason``: who at the connector, which reference).
        Refused, with an audit row, when the action is not such a charge of this order; UnknownOrderError when the
        agent's merchant has no such order."""
        now = self.clock()
        verdict = "charged" if charged else "not charged"
        ask = ActionRequest(action=RESOLVE_CHARGE, reason=reason)
        with self.executor.engine.begin() as conn:
            order = _order_state(conn, agent, order_id)
            in_range = 0 < action_id < 2**63  # a larger id is no action (and no database takes it)
            row = conn.execute(
                sa.select(actions.c.kind, actions.c.payload_json, actions.c.state, actions.c.unanswered_since).where(
                    actions.c.action_id == (action_id if in_range else 0),
                    actions.c.merchant_id == agent.merchant_id,
                    actions.c.order_id == order_id,
                )
            ).first()
            payload = orjson.loads(row.payload_json or "{}") if row is not None else {}
            connector = payload.get("connector") or "its connector"
            detail = (
                f"charge {order_id}_{payload.get('attempt_number')} via {connector} "
                f"(action {action_id}): the connector says {verdict}"
            )
            message = None
            if (
                row is None
                or row.kind not in CHARGE_KIND_VALUES
                or row.state != ActionState.DEAD.value
                or row.unanswered_since is None
            ):
                message = (
                    f"action {action_id} of order {order_id} is not a charge waiting for an answer from its connector"
                )
            elif not ask.reason.strip():
                message = "say how you know (who at the connector answered, or its reference for the payment)"
            if message is not None:
                self._audit(conn, agent, order_id, ask, detail, "refused", now, message=message)
                return ActionResult("refused", message, state=order)
            audit_id = self._audit(conn, agent, order_id, ask, detail, "requested", now)
        try:
            state = self.executor.resolve_charge(action_id, charged)
        except ChargeResolutionError as exc:
            message = f"the charge changed meanwhile: {exc}"
            self._settle(audit_id, "failed", message)
            return ActionResult("failed", message)
        except Exception as exc:
            self._settle(audit_id, "failed", _unexpected(exc))
            raise
        message = f"Recorded: the connector says {verdict}; the order is {state}"
        if charged and order not in OPEN_ORDER_STATES:
            message += f" and was already before: the customer paid twice, refund this payment with {connector}"
        self._settle(audit_id, "done", message)
        log.warning(
            "agent answered for a charge",
            extra={"merchant_id": agent.merchant_id, "order_id": order_id, "agent": agent.name, "action": verdict},
        )
        return ActionResult("done", message, state=state)

    def resolve_dispute(self, agent: Agent, order_id: str, check_action_id: int, note: str) -> ActionResult:
        """Mark the charge dispute flagged on status check ``check_action_id`` of ``order_id`` as dealt with, with
        the agent's ``note`` saying what was done (``resolve_charge_disputes``): the order leaves the queue's first
        place and the open count on /metrics, and keeps the dispute on its page with who, when and the note. The
        resolution and its audit row are written in one transaction; a refusal (no note, no such dispute on this
        order) or a dispute dealt with already (nothing changed, said so: ``unchanged``, not a refusal) writes the
        audit row alone. UnknownOrderError when the agent's merchant has no such order."""

        def marked_words(dispute: ChargeDispute) -> tuple[str, str]:
            return (
                f"charge dispute of payment {dispute.payment_id} via {dispute.connector} (the switch says "
                f"{dispute.switch_said})",
                f"the dispute of payment {dispute.payment_id}",
            )

        return self._mark_dealt_with(
            agent,
            order_id,
            RESOLVE_DISPUTE,
            note,
            asked=f"charge dispute on status check {check_action_id}",
            mark=lambda conn, by, now: resolve_charge_disputes(
                conn, agent.merchant_id, order_id, by, note, now, check_action_id=check_action_id
            ),
            refusal=DisputeResolutionError,
            marked_words=marked_words,
            logged="agent marked a charge dispute as dealt with",
        )

    def resolve_by_hand(self, agent: Agent, order_id: str, case_id: int, note: str) -> ActionResult:
        """Mark case ``case_id`` of ``order_id`` (a refund by hand, a possible double payment, or a charge taken as
        never charged whose switch went silent) as dealt with, with the agent's ``note`` saying what was done
        (``mark_cases_done``): it leaves ``winback executor refunds-by-hand``'s list and the open gauge on /metrics,
        and stays on the order's page with who, when and the note. The mark and its audit row are written in one
        transaction; a refusal (no note, no such case on this order) or a case dealt with already (nothing changed,
        said so) writes the audit row alone. UnknownOrderError when the agent's merchant has no such order."""
        return self._mark_dealt_with(
            agent,
            order_id,
            RESOLVE_BY_HAND,
            note,
            asked=f"case {case_id}",
            mark=lambda conn, by, now: mark_cases_done(
                conn, agent.merchant_id, order_id, by, note, now, case_id=case_id
            ),
            refusal=CaseResolutionError,
            marked_words=lambda case: (case.described(), case.described()),
            logged="agent marked a case handed to a person as dealt with",
        )

    def _mark_dealt_with(
        self,
        agent: Agent,
        order_id: str,
        action: str,
        note: str,
        *,
        asked: str,
        mark: Callable[[sa.Connection, str, datetime], Marked[CaseT]],
        refusal: type[Exception],
        marked_words: Callable[[CaseT], tuple[str, str]],
        logged: str,
    ) -> ActionResult:
        """One thing of ``order_id`` marked dealt with by ``agent`` (audited as ``action``, ``note`` its reason):
        ``mark(conn, by, now)`` marks it in the audit row's transaction, raising ``refusal`` (audited ``refused``,
        nothing marked) or returning what it marked now and what was dealt with before (``unchanged``, said so).
        ``asked``: what the agent asked to mark, in the audit row of a refusal or a no-op; ``marked_words``: the
        audit row's and the message's words for what was marked."""
        now = self.clock()
        ask = ActionRequest(action=action, reason=note)
        with self.executor.engine.begin() as conn:
            state = _order_state(conn, agent, order_id)
            detail = f"{asked}: marked as dealt with"
            try:
                marked = mark(conn, f"agent {agent.name}", now)
            except refusal as exc:
                self._audit(conn, agent, order_id, ask, detail, "refused", now, message=str(exc))
                return ActionResult("refused", str(exc), state=state)
            if not marked.now:
                zone = merchant_zone(self.executor.merchant(agent.merchant_id))
                said = already_done(marked.before, order_id, lambda at: local_time(at, zone))
                self._audit(conn, agent, order_id, ask, detail, UNCHANGED, now, message=said)
                return ActionResult(UNCHANGED, said, state=state)
            [done] = marked.now
            what, gone = marked_words(done)
            message = f"Marked as dealt with: {gone} is no longer open"
            self._audit(conn, agent, order_id, ask, f"{what}: marked as dealt with", "done", now, message=message)
        log.warning(logged, extra={"merchant_id": agent.merchant_id, "order_id": order_id, "agent": agent.name})
        return ActionResult("done", message, state=state)

    def _settle(self, audit_id: int, result: str, message: str) -> None:
        with self.executor.engine.begin() as conn:
            conn.execute(
                audit_log.update().where(audit_log.c.audit_id == audit_id).values(result=result, message=message)
            )

    @staticmethod
    def _agent_decision(
        agent: Agent, ask: ActionRequest, pending: Decision, plan: _Plan, request_rules: tuple[str, ...]
    ) -> Decision:
        candidate = plan.candidate
        recommendation = Alternative(
            action=pending.action,
            strategy=pending.strategy,
            connector=pending.connector,
            channel=pending.channel,
            execute_at=pending.execute_at,
            p_success=pending.expected_success,
        )
        reason = ask.reason.strip()
        return Decision(
            decision_id=new_decision_id(None),
            model_version=AGENT_MODEL_VERSION,
            action=candidate.action,
            strategy=candidate.strategy if candidate.action == Action.RETRY else None,
            connector=candidate.connector if candidate.action == Action.RETRY else None,
            channel=candidate.channel if candidate.action == Action.RETARGET else None,
            execute_at=candidate.execute_at,
            retryable=pending.retryable,
            retry_probability=pending.retry_probability,
            expected_success=round(plan.p_success, 6),
            propensity=1.0,
            alternatives=[recommendation],
            reasons=[
                f"chosen by agent {agent.name}" + (f": {reason}" if reason else ""),
                f"instead of model {pending.model_version}: {describe_decision(pending)}",
            ],
            rules_applied=list(request_rules),
        )


def _order_state(conn: sa.Connection, agent: Agent, order_id: str) -> str:
    """The state of the agent's merchant's order ``order_id``; UnknownOrderError when it has no such order."""
    state = conn.scalar(
        sa.select(orders.c.state).where(orders.c.merchant_id == agent.merchant_id, orders.c.order_id == order_id)
    )
    if state is None:
        raise UnknownOrderError(f"order {order_id!r} is not known")
    return str(state)


def _order_row(conn: sa.Connection, merchant_id: str, order_id: str) -> sa.RowMapping | None:
    """The order's row as it is (unlocked: to show or explain, not to act on)."""
    query = sa.select(orders).where(orders.c.merchant_id == merchant_id, orders.c.order_id == order_id)
    return conn.execute(query).mappings().first()


def _not_waiting(conn: sa.Connection, order: sa.RowMapping, mode: str, agent: Agent) -> str:
    """Why no recommendation of ``order`` waits for ``agent``, in the words of what happened to it: an agent who
    loaded the order before another one acted on it (or before it settled), or whose second click of a double
    click arrived after the first was carried out, was told "winback runs this one by itself", true of
    autonomous merchants only."""
    order_id, state = order["order_id"], order["state"]
    if mode != "assisted":
        return (
            f"order {order_id} is {state}: agents act only on orders waiting for them (assisted mode); "
            "winback runs this one by itself"
        )
    if state == OrderState.SUCCEEDED:
        return f"order {order_id} is already recovered (SUCCEEDED): nothing is left to do"
    latest = conn.execute(
        sa.select(agent_queue.c.state, agent_queue.c.agent, agent_queue.c.reason)
        .where(agent_queue.c.merchant_id == order["merchant_id"], agent_queue.c.order_id == order_id)
        .order_by(agent_queue.c.item_id.desc())
        .limit(1)
    ).first()
    if latest is not None and latest.agent and latest.state in ("approved", "rejected", "agreed"):
        who = "you" if latest.agent == agent.name else latest.agent
        return (
            f"{who} already acted on order {order_id} ({latest.reason}): it is {state} now; "
            "reload the order to see what happens next"
        )
    if state == OrderState.FAILED:
        return f"order {order_id} is closed unrecovered (FAILED): nothing is left to do"
    return f"no recommendation of order {order_id} waits for an agent now (it is {state}): reload the order"


def _unexpected(exc: Exception) -> str:
    """The audit's message for an action that raised unexpectedly: left "requested", it read as still under way."""
    return f"failed with an unexpected error ({type(exc).__name__}): check the order before acting again"
