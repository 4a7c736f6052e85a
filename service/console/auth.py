"""Agents, passwords, sessions, CSRF tokens and sign-in throttling of the console.

Passwords are hashed with scrypt (a memory-hard KDF from the standard library) and a per-agent random salt.
A session is a random token: the cookie carries it with an HMAC signature made with ``WINBACK_CONSOLE_SECRET``
and the database keeps only its SHA-256, so sign-out (and expiry) really ends it. Each session has its own CSRF
token, which every POST must echo in a form field or the ``X-CSRF-Token`` header.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from service.console.store import agents, sessions, sign_in_failures
from service.executor.store import as_utc

#: scrypt cost: 2**14 x 8 x 128 B = 16 MiB of memory per hash, about 50 ms on one core.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024
_NAME_OK = set("abcdefghijklmnopqrstuvwxyz0123456789._@-+")


class AgentError(ValueError):
    """An agent cannot be created as asked (bad name or password, name taken); the message says which."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$n$r$p$salt$key`` for ``password`` with a fresh random salt."""
    salt = secrets.token_bytes(_SALT_BYTES)
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=_KEY_BYTES)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches a ``hash_password`` string (constant-time compare; False if malformed)."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(key)
        actual = hashlib.scrypt(
            password.encode(),
            salt=_unb64(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=256 * 1024 * 1024,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


_DUMMY_HASH: list[str] = []


def _dummy_hash() -> str:
    # Verifying against a real hash for unknown names keeps their sign-in as slow as a wrong password.
    if not _DUMMY_HASH:
        _DUMMY_HASH.append(hash_password(secrets.token_urlsafe(16)))
    return _DUMMY_HASH[0]


def check_new_password(password: str) -> None:
    """AgentError unless ``password`` is acceptable for a new agent."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AgentError(f"password must be at least {MIN_PASSWORD_LENGTH} characters long")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise AgentError(f"password must be at most {MAX_PASSWORD_LENGTH} characters long")


def normalise_name(name: str) -> str:
    """The stored form of an agent's sign-in name (trimmed, lower case)."""
    return name.strip().lower()


@dataclass(frozen=True)
class Agent:
    """A signed-in (or stored) agent: who acts, for which merchant."""

    agent_id: int
    name: str
    merchant_id: str


def add_agent(engine: Engine, merchant_id: str, name: str, password: str, now: datetime | None = None) -> Agent:
    """Store a new agent of ``merchant_id``; AgentError when the name is taken or the password too weak."""
    clean = normalise_name(name)
    if not clean or not set(clean) <= _NAME_OK or len(clean) > 128:
        raise AgentError(
            f"agent name {name!r} must be 1-128 characters of letters, digits and . _ @ - + (e.g. asha@m_demo)"
        )
    if not merchant_id.strip():
        raise AgentError("merchant_id must not be empty")
    check_new_password(password)
    now = now or datetime.now(UTC)
    try:
        with engine.begin() as conn:
            inserted = conn.execute(
                agents.insert().values(
                    name=clean,
                    merchant_id=merchant_id,
                    password_hash=hash_password(password),
                    active=True,
                    created_at=now,
                    password_changed_at=now,
                )
            )
            key = inserted.inserted_primary_key
            assert key is not None
            agent_id = key[0]
    except IntegrityError:
        raise AgentError(f"an agent named {clean!r} exists already") from None
    return Agent(agent_id=int(agent_id), name=clean, merchant_id=merchant_id)


def ensure_agent(engine: Engine, merchant_id: str, name: str, password: str) -> Agent:
    """``add_agent`` unless an agent of that name exists (then its password is set to ``password``).

    For demos and tests: makes ``name``/``password`` work whatever the database held before.
    """
    clean = normalise_name(name)
    with engine.connect() as conn:
        row = conn.execute(sa.select(agents).where(agents.c.name == clean)).mappings().first()
    if row is None:
        return add_agent(engine, merchant_id, name, password)
    if row["merchant_id"] != merchant_id:
        raise AgentError(f"agent {clean!r} exists already for merchant {row['merchant_id']!r}")
    check_new_password(password)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(
            agents.update()
            .where(agents.c.agent_id == row["agent_id"])
            .values(password_hash=hash_password(password), active=True, password_changed_at=now)
        )
        # A new password ends the sessions signed in with the old one (whoever knew it is signed out too).
        conn.execute(
            sessions.update()
            .where(sessions.c.agent_id == row["agent_id"], sessions.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
    return Agent(agent_id=int(row["agent_id"]), name=clean, merchant_id=merchant_id)


@dataclass(frozen=True)
class SignIn:
    """What one sign-in found: the agent it signs in (None: refused) and whether the name is an agent's (active or
    not): a failed sign-in logs the names it was tried with only when they are one, since what is typed into the
    name field is sometimes the password."""

    agent: Agent | None
    known_name: bool


def sign_in(engine: Engine, name: str, password: str) -> SignIn:
    """Check ``name`` and ``password`` with one look-up of the name (the same work is done for unknown names)."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(agents).where(agents.c.name == normalise_name(name))).mappings().first()
    if row is None or len(password) > MAX_PASSWORD_LENGTH:
        verify_password(password[:MAX_PASSWORD_LENGTH], _dummy_hash())
        return SignIn(None, known_name=row is not None)
    if not verify_password(password, row["password_hash"]) or not row["active"]:
        return SignIn(None, known_name=True)
    return SignIn(Agent(agent_id=int(row["agent_id"]), name=row["name"], merchant_id=row["merchant_id"]), True)


def authenticate(engine: Engine, name: str, password: str) -> Agent | None:
    """The active agent with this name and password, else None (the same work is done for unknown names)."""
    return sign_in(engine, name, password).agent


# ------------------------------------------------------------------------------------------------- cookies


class Signer:
    """HMAC-SHA256 signatures of cookie values with the console secret."""

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(b"winback-console\x00" + secret.encode()).digest()

    def sign(self, value: str) -> str:
        """``value.signature``."""
        mac = hmac.new(self._key, value.encode(), hashlib.sha256).digest()
        return f"{value}.{_b64(mac)}"

    def unsign(self, signed: str | None) -> str | None:
        """The value of a signed string, or None when missing or tampered with."""
        if not signed or "." not in signed:
            return None
        value, _, signature = signed.rpartition(".")
        expected = self.sign(value).rpartition(".")[2]
        return value if hmac.compare_digest(signature.encode(), expected.encode()) else None


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    """A live session: the agent and the CSRF token its POSTs must carry."""

    token: str
    agent: Agent
    csrf_token: str
    expires_at: datetime


class SessionStore:
    """Sessions in the ``console_sessions`` table, with absolute and idle expiry."""

    def __init__(
        self,
        engine: Engine,
        lifetime: timedelta,
        idle: timedelta,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self.lifetime = lifetime
        self.idle = idle
        self.clock = clock

    def create(self, agent: Agent) -> Session:
        """A new session for ``agent``."""
        now = self.clock()
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        expires_at = now + self.lifetime
        with self.engine.begin() as conn:
            conn.execute(
                sessions.insert().values(
                    token_sha256=_token_hash(token),
                    agent_id=agent.agent_id,
                    merchant_id=agent.merchant_id,
                    csrf_token=csrf,
                    created_at=now,
                    last_seen_at=now,
                    expires_at=expires_at,
                )
            )
        return Session(token=token, agent=agent, csrf_token=csrf, expires_at=expires_at)

    def load(self, token: str) -> Session | None:
        """The live session of ``token`` (its last use noted), or None when unknown, ended or expired."""
        now = self.clock()
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    sa.select(sessions, agents.c.name, agents.c.active, agents.c.merchant_id.label("agent_merchant"))
                    .join(agents, agents.c.agent_id == sessions.c.agent_id)
                    .where(sessions.c.token_sha256 == _token_hash(token))
                )
                .mappings()
                .first()
            )
        if row is None or row["revoked_at"] is not None or not row["active"]:
            return None
        if row["agent_merchant"] != row["merchant_id"]:
            return None
        last_seen = as_utc(row["last_seen_at"])
        if now >= as_utc(row["expires_at"]) or now - last_seen >= self.idle:
            return None
        if now - last_seen >= timedelta(minutes=1):  # note use at most once a minute: reads stay reads
            with self.engine.begin() as conn:
                conn.execute(
                    sessions.update().where(sessions.c.token_sha256 == _token_hash(token)).values(last_seen_at=now)
                )
        agent = Agent(agent_id=int(row["agent_id"]), name=row["name"], merchant_id=row["merchant_id"])
        return Session(token=token, agent=agent, csrf_token=row["csrf_token"], expires_at=as_utc(row["expires_at"]))

    def revoke(self, token: str) -> None:
        """End the session of ``token`` (sign-out)."""
        with self.engine.begin() as conn:
            conn.execute(
                sessions.update()
                .where(sessions.c.token_sha256 == _token_hash(token), sessions.c.revoked_at.is_(None))
                .values(revoked_at=self.clock())
            )


def csrf_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a submitted CSRF token with the session's."""
    return bool(given) and hmac.compare_digest(expected.encode(), str(given).encode())


# ------------------------------------------------------------------------------------------- throttling


class LoginLimiter:
    """Counts failed sign-ins per agent name and per client address in a sliding window, in the database.

    In the database rather than in each process, so the limits hold for the whole server: with ``--workers N`` a
    per-process count let N times as many guesses through, and a restart forgot them all. Rows older than the
    window are deleted as failures are noted, so sprayed names cannot grow the table without bound."""

    def __init__(
        self,
        engine: Engine,
        max_per_name: int,
        max_per_client: int,
        window_seconds: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self.max_per_name = max_per_name
        self.max_per_client = max_per_client
        self.window = timedelta(seconds=window_seconds)
        self.clock = clock

    def begin(self, name: str, client: str) -> SignInTry:
        """Count a sign-in try against the name's and the client's limits, before its password is checked.

        The try is written first, in its own transaction, and only then are the tries in the window counted, so
        guesses sent in parallel each see the others: at most the limit of them get their password checked (a
        check, then a count after the password, let a burst of parallel guesses all through). A try over a limit is
        taken back and gets ``wait`` > 0; one within the limits stays counted as a failure unless ``succeeded``
        takes it back."""
        now = self.clock()
        keyed = (
            (_throttle_key("name", normalise_name(name)), self.max_per_name),
            (_throttle_key("ip", client), self.max_per_client),
        )
        ids: list[int] = []
        with self.engine.begin() as conn:
            conn.execute(sign_in_failures.delete().where(sign_in_failures.c.failed_at <= now - self.window))
            for key, _ in keyed:
                inserted = conn.execute(sign_in_failures.insert().values(key_sha256=key, failed_at=now))
                primary = inserted.inserted_primary_key
                assert primary is not None
                ids.append(int(primary[0]))
        waits = [0.0]
        with self.engine.connect() as conn:
            for key, limit in keyed:
                recent = conn.scalars(
                    sa.select(sign_in_failures.c.failed_at)
                    .where(sign_in_failures.c.key_sha256 == key, sign_in_failures.c.failed_at > now - self.window)
                    .order_by(sign_in_failures.c.failed_at.desc())
                    .limit(limit + 1)
                ).all()
                if len(recent) > limit:  # this try is one too many
                    waits.append(max((as_utc(recent[limit]) + self.window - now).total_seconds(), 1.0))
        wait = max(waits)
        if wait > 0:
            self._forget(ids)
        return SignInTry(wait=wait, row_ids=tuple(ids))

    def succeeded(self, name: str, attempt: SignInTry) -> None:
        """A correct password clears the name's failures and takes this try back from the client's (the client's
        earlier failures stay)."""
        with self.engine.begin() as conn:
            conn.execute(
                sign_in_failures.delete().where(
                    sa.or_(
                        sign_in_failures.c.key_sha256 == _throttle_key("name", normalise_name(name)),
                        sign_in_failures.c.failure_id.in_(attempt.row_ids),
                    )
                )
            )

    def _forget(self, ids: list[int]) -> None:
        with self.engine.begin() as conn:
            conn.execute(sign_in_failures.delete().where(sign_in_failures.c.failure_id.in_(ids)))


@dataclass(frozen=True)
class SignInTry:
    """A sign-in try as ``LoginLimiter.begin`` counted it: ``wait`` seconds when over a limit (0: go ahead)."""

    wait: float
    row_ids: tuple[int, ...]


def _throttle_key(kind: str, value: str) -> str:
    return hashlib.sha256(f"{kind}:{value}".encode()).hexdigest()
