"""One registry client per server: the champion mirrored to a local folder that the workers read.

``winback serve`` with several workers used to have every worker ask MLflow for ``winback@champion`` and
download each new version itself. Each worker then held MLflow's client, its tracking store (SQLAlchemy, Alembic,
a few hundred modules) and the download's leftovers: about 70 MB of a worker's RSS, times the workers, and one
registry poll and one download per worker and version.

Now the serving command runs one ``RegistryMirror`` (a thread of the process that starts uvicorn): it polls the
alias, downloads each new champion once into ``folder/version-N`` (complete before it is renamed into place), and
publishes what it found in ``folder/champion.json`` (replaced atomically): the version, when it checked, and
the error of its last check, if any. Each worker's ``ModelHolder`` reads that file through ``MirrorSource`` —
a small read every second — and loads the version from the folder with the bundle reader alone: MLflow is never
imported by a worker.

What a worker sees is what it saw when it asked the registry itself:

- no champion yet: rules-only, ``/readyz`` false;
- the registry down, or a version that cannot be downloaded: the error, while the serving model stays (the mirror
  keeps the last version it published);
- the mirror itself silent for longer than ``STALE_AFTER_POLLS`` polls (its thread hung or gone): an error naming
  how long ago its last check was, and the serving model stays.

A worker that starts while there is no fresh answer (uvicorn replacing a worker that died during an outage) loads
the last version the mirror published and still holds (``MirrorSource.last_known_version``), as its siblings
serve, and reports the same error; it does not answer rules-only beside them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.policy import Scorer
from service.api.accept import try_flock, unheld_lock
from service.api.model_holder import START_WAIT_SECONDS, VersionedScorer, first_line
from service.api.poller import Poller, RetryWait

log = logging.getLogger("winback.api")

STATE_FILE = "champion.json"
_STATE_KEYS = frozenset({"version", "checked_at", "error"})
#: A mirror's folder in the temp folder: ``winback-models-<random>``, locked by its command through this file.
FOLDER_PREFIX = "winback-models-"
OWNER_LOCK = ".owner.lock"
#: A worker reads the mirror's state this often at most: a file read, so the swap waits on the mirror's poll.
READ_SECONDS = 1.0
#: The mirror's state is stale (its thread hung or gone) after this many of its polls without a check.
STALE_AFTER_POLLS = 3
#: ... and never before this many seconds: a slow registry answer (the MLflow client retries) is not a hang.
STALE_AFTER_SECONDS = 60.0
#: Longest a stopping server waits for a check in progress.
STOP_WAIT_SECONDS = 2.0
#: Versions kept in the folder: the champion and the ones before it, which a worker may still be loading.
KEEP_VERSIONS = 3
#: The workers take turns to load a new version (``MirrorSource.load_turn``) by holding this file's ``flock``.
LOAD_TURN_LOCK = ".load-turn.lock"
#: Longest a worker waits for a sibling's turn before it loads anyway (a sibling stopped in the middle of a load).
LOAD_TURN_WAIT_SECONDS = 10.0
#: How often a waiting worker tries the turn's lock again.
LOAD_TURN_RETRY_SECONDS = 0.005
#: In a version's folder: the text features its first loading worker warmed up (``WarmedTextFile``).
WARMED_TEXT_FILE = ".warmed-text-features.json"
#: The text model file those features were computed with (its identity on disk, checked by ``WarmedTextFile``).
_TEXT_MODEL_FILE = "text_model.pkl"


class MirrorError(RuntimeError):
    """The mirror has no fresh answer: the registry's error, or the mirror's own silence."""


def version_folder(folder: Path, version: str) -> Path:
    """Where the mirror puts the bundle of ``version``."""
    return folder / f"version-{version}"


class RegistryMirror:
    """Polls ``winback@champion`` every ``poll_seconds`` and mirrors it into ``folder`` (see the module's text)."""

    def __init__(self, folder: Path, tracking_uri: str, poll_seconds: float) -> None:
        self.folder = folder
        self.tracking_uri = tracking_uri
        self.poll_seconds = poll_seconds
        self.version: str | None = None  # the version published (downloaded and in place)
        self._failed_downloads = RetryWait(poll_seconds)
        self._poller = Poller(self.check, poll_seconds, name="winback-registry-mirror")

    def check(self) -> None:
        """Ask the registry once, download a new champion, publish the state. Never raises."""
        try:
            from model import registry_client as registry  # MLflow alone (not the bundle), in the mirror only

            version = registry.get_alias_version(registry.CHAMPION, tracking_uri=self.tracking_uri)
        except Exception as exc:  # the registry down: the workers keep what they serve
            self._failed(first_line(exc))
            return
        # A new champion, or one whose folder went (a temp-folder cleaner), is downloaded; one that failed lately is
        # not downloaded again before its wait is over, as a worker waited for a version it could not load.
        if version is not None and (version != self.version or not version_folder(self.folder, version).is_dir()):
            if (waiting := self._failed_downloads.waiting(version)) is not None:
                self._failed(waiting)
                return
            try:
                self._download(version, registry)
            except Exception as exc:  # the last version published stays, and is still served
                why = f"champion version {version} could not be downloaded ({first_line(exc)})"
                self._failed_downloads.failed(version, why)
                self._failed(why)
                return
        self.version = version
        self._failed_downloads.succeeded()
        self._publish(error=None)

    def _failed(self, error: str) -> None:
        # Said "workers keep their model" before any model was loaded: `--tracking-uri databricks` without
        # credentials served rules-only while the only line said a model was kept.
        if self.version is None:
            message = "no model: the model registry did not answer; decisions are rules-only until it does"
        else:
            message = f"could not check the champion; workers keep version {self.version}"
        log.warning(message, extra={"error": error})
        self._publish(error=error)

    def _download(self, version: str, registry: Any) -> None:
        target = version_folder(self.folder, version)
        if not target.is_dir():
            with tempfile.TemporaryDirectory(prefix=".incoming-", dir=self.folder) as incoming:
                bundle = registry.download_bundle(version, incoming, tracking_uri=self.tracking_uri)
                os.rename(bundle, target)  # complete, then in place: a worker never sees half a version
        self._forget_old(keep=version)

    def _forget_old(self, keep: str) -> None:
        """Keep ``keep`` and the newest others, ``KEEP_VERSIONS`` in all; remove the rest."""
        champion = version_folder(self.folder, keep)
        others = [path for path in self.folder.glob("version-*") if path != champion]
        others.sort(key=lambda path: path.stat().st_mtime, reverse=True)
        for old in others[KEEP_VERSIONS - 1 :]:
            shutil.rmtree(old, ignore_errors=True)

    def _publish(self, *, error: str | None) -> None:
        """Write the state, stamped now: a check's end, so a long download does not publish a stale state."""
        if self._poller.stopping:  # the server is stopping and the folder going: nothing is left to tell
            return
        # Stamped on the monotonic clock, which every process of the machine reads alike: it tells a new check
        # apart and the state's age, and a step of the wall clock (NTP) changes neither.
        state = {"version": self.version, "checked_at": time.monotonic(), "error": error}
        pending = None
        try:
            with tempfile.NamedTemporaryFile("w", dir=self.folder, prefix=".state-", delete=False) as pending:
                json.dump(state, pending)
            os.replace(pending.name, self.folder / STATE_FILE)
        except OSError as exc:  # a full disk: the workers see a stale state, then an error, and keep their model
            log.error("could not publish the mirrored champion", extra={"error": f"{type(exc).__name__}: {exc}"})
            if pending is not None:
                Path(pending.name).unlink(missing_ok=True)

    def start(self, wait_seconds: float = START_WAIT_SECONDS) -> None:
        """Check once (waiting up to ``wait_seconds``, so the workers start with the champion in place), then
        keep polling in a daemon thread."""
        if not self._poller.start(wait_seconds):
            log.warning("the model registry has not answered in %g s; workers serve rules-only meanwhile", wait_seconds)

    def stop(self) -> None:
        """Stop polling. A check still waiting on the registry (its client retries for minutes) is not waited
        for long: the thread is a daemon and publishes nothing once stopped."""
        self._poller.stop(STOP_WAIT_SECONDS)


@contextlib.contextmanager
def mirrored_registry(tracking_uri: str, poll_seconds: float) -> Iterator[Path]:
    """A running mirror of ``tracking_uri``'s champion in a fresh folder (removed at the end); yields the folder.

    The folder's ``OWNER_LOCK`` is locked (``flock``) while the mirror lives: the next start anywhere on the
    machine removes the folders whose lock nobody holds (a command killed outright). A lock, not a process id,
    because a temp folder shared between containers sees process ids of other namespaces (review)."""
    _remove_orphans()
    folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))
    owner = try_flock(folder / OWNER_LOCK, create=True)
    mirror = RegistryMirror(folder, tracking_uri, poll_seconds)
    try:
        mirror.start()
        yield folder
    finally:
        mirror.stop()
        shutil.rmtree(folder, ignore_errors=True)
        if owner is not None:
            os.close(owner)


def _remove_orphans() -> None:
    """Remove the folders of mirrors whose lock nobody holds (their command killed outright, the machine stopped).
    A folder without a lock (being made) is left alone."""
    for folder in Path(tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*"):
        owner = unheld_lock(folder / OWNER_LOCK)
        if owner is None:  # its command is alive, or it has no lock yet (being made, or not a mirror's)
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(owner)


class MirrorSource:
    """A worker's ``ModelSource``: the champion as the mirror in ``folder`` last published it.

    The worker's holder looks every ``READ_SECONDS`` but acts (``has_news``) only on a check the mirror made since
    its last look, and otherwise every ``poll_seconds``, as when it asked the registry itself: a registry that is
    down is reported once per check, not once a second."""

    def __init__(self, folder: Path, poll_seconds: float, between_steps: Callable[[], object] | None = None) -> None:
        self.folder = folder
        self.poll_seconds = poll_seconds
        self.between_steps = between_steps  # called between a load's files (ModelBundle.load)
        self.stale_after = max(STALE_AFTER_POLLS * poll_seconds, STALE_AFTER_SECONDS)
        self._seen_check: float | None = None  # ``checked_at`` (time.monotonic) of the state champion_version read
        self._read_at = -math.inf  # when that was (time.monotonic)

    def _state(self) -> dict[str, Any] | None:
        """The mirror's state; None before its first; MirrorError naming the problem when it cannot be read."""
        path = self.folder / STATE_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(state, dict) or not state.keys() >= _STATE_KEYS:
                raise ValueError(f"not a mirror state: {str(state)[:80]}")
            state["checked_at"] = float(state["checked_at"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise MirrorError(f"the registry mirror's state {path} cannot be read ({first_line(exc)})") from None
        return state  # type: ignore[no-any-return]  # a JSON object with the keys checked above

    def has_news(self) -> bool:
        """True when the mirror checked since the last ``champion_version``, or ``poll_seconds`` have passed."""
        poll_due = time.monotonic() - self._read_at >= self.poll_seconds
        try:
            state = self._state()
        except MirrorError:  # champion_version says why, once per poll (not once a second)
            return poll_due
        return (None if state is None else state["checked_at"]) != self._seen_check or poll_due

    def champion_version(self) -> str | None:
        """The mirrored champion's version, None when nothing is promoted; MirrorError when the mirror has no
        fresh answer (its error, or its silence)."""
        self._read_at = time.monotonic()
        self._seen_check = None
        state = self._state()
        self._seen_check = None if state is None else state["checked_at"]
        if state is None:
            raise MirrorError("the model registry has not answered yet")
        age = time.monotonic() - state["checked_at"]
        if age > self.stale_after:
            raise MirrorError(
                f"the registry mirror's last check was {age:.0f} s ago; it checks every {self.poll_seconds:g} s"
            )
        if state["error"] is not None:
            raise MirrorError(state["error"])
        version = state["version"]
        return None if version is None else str(version)

    def last_known_version(self) -> str | None:
        """The version the mirror last published and still holds on disk, whatever its error or age: what the
        other workers serve while the registry (or the mirror) has no answer. None when there is none."""
        try:
            state = self._state()
        except MirrorError:
            return None
        if state is None or state["version"] is None:
            return None
        version = str(state["version"])
        return version if version_folder(self.folder, version).is_dir() else None

    @contextlib.contextmanager
    def load_turn(self) -> Iterator[None]:
        """Within the block, this worker is the only one of the server loading a version (or has waited
        ``LOAD_TURN_WAIT_SECONDS`` for it, and says so). The workers notice a new champion within the same second
        (they read the mirror's state on timers started together), and a load (the bundle, its warm-up, the canary
        decisions) is tens of milliseconds of CPU: all at once, they would take every core of a small machine from
        the requests in flight. One at a time, the other cores keep serving, and the swap ends a load later."""
        path = self.folder / LOAD_TURN_LOCK
        deadline = time.monotonic() + LOAD_TURN_WAIT_SECONDS
        fd = try_flock(path, create=True)
        while fd is None and time.monotonic() < deadline:
            time.sleep(LOAD_TURN_RETRY_SECONDS)
            fd = try_flock(path, create=True)
        if fd is None:
            log.warning("another worker has been loading a model for %g s; loading beside it", LOAD_TURN_WAIT_SECONDS)
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)  # the kernel drops the lock with the descriptor (or with a worker that dies)

    def load(self, version: str) -> Scorer:
        """Load the mirrored bundle of ``version``; its warm-up shares its text features with the server's other
        workers (``WarmedTextFile``)."""
        from model.bundle import ModelBundle

        folder = version_folder(self.folder, version)
        bundle = ModelBundle.load(folder, between_steps=self.between_steps)
        return MirroredScorer(bundle, version, WarmedTextFile(folder))


@dataclass(frozen=True)
class SharedWarmUp:
    """A sibling worker's warm-up of a version: text features by error digest, and whether it checked the text
    model's direct form against scikit-learn with the libraries installed here (``TextModel.warm``)."""

    rows: dict[str, list[float]]
    direct_form_checked: bool


class WarmedTextFile:
    """The text features of a version the server's workers warmed up, shared through its folder.

    Warming a new version up on the errors the serving one has seen (``ModelBundle.warm_up``) computes each error's
    text features again with the new text model: ~0.2-0.3 ms of Python an error, ~30 ms for the ~120 distinct
    errors of the swap bench's traffic, about half of a swap's CPU in a worker, beside its requests. The workers
    load a version one after the other (``MirrorSource.load_turn``) and have seen mostly the same errors, so the
    first writes what it computed here and the next ones take those rows instead of computing them again: the
    same floats (JSON keeps a float exactly), for the errors they cover. The first also says whether it checked the
    text model's direct form against scikit-learn (~5 ms of scikit-learn's Python a load) and with which library
    versions: a worker of the same installation does not check it again. The rows are keyed by a digest of the
    error, not its text: request messages are not written to disk. A file that cannot be read, or was written for
    another text model file (a folder downloaded again), is left aside with a warning and the features computed."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / WARMED_TEXT_FILE
        self.model_file = folder / _TEXT_MODEL_FILE

    def _model_identity(self) -> list[int] | None:
        try:
            stat = self.model_file.stat()
        except OSError:  # a bundle with text_model.joblib only (an older release's): nothing is shared
            return None
        return [stat.st_ino, stat.st_size, stat.st_mtime_ns]

    def read(self) -> SharedWarmUp:
        """What was written for this folder's text model (nothing when there is none or it cannot be used)."""
        from model.textmodel import direct_form_libraries

        identity = self._model_identity()
        if identity is None or not self.path.is_file():
            return SharedWarmUp({}, direct_form_checked=False)
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            if saved["text_model_file"] != identity:
                raise ValueError("it was written for another text_model.pkl")
            rows = saved["rows"]
            if not isinstance(rows, dict) or not all(
                isinstance(row, list) and all(isinstance(value, float) for value in row) for row in rows.values()
            ):
                raise ValueError("its rows are not lists of numbers")
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("%s is not used (%s); the text features are computed", self.path, first_line(exc))
            return SharedWarmUp({}, direct_form_checked=False)
        return SharedWarmUp(rows, direct_form_checked=saved.get("direct_form_checked_with") == direct_form_libraries())

    def write(self, rows: dict[str, list[float]], *, direct_form_checked: bool) -> None:
        """Replace the file with ``rows`` (atomically), and whether the text model's direct form was checked, with
        which libraries; a failure is a warning: the next worker computes them."""
        from model.textmodel import direct_form_libraries

        identity = self._model_identity()
        if identity is None:
            return
        # One process writes one pending file at a time (its holder's lock); json.dumps's one C call, not dump's
        # writes: a few Python calls, which a swap's loading thread pays for (``at_each_call``).
        pending = self.path.with_name(f"{self.path.name}.{os.getpid()}.pending")
        try:
            checked_with = direct_form_libraries() if direct_form_checked else None
            saved = {"text_model_file": identity, "rows": rows, "direct_form_checked_with": checked_with}
            pending.write_text(json.dumps(saved), encoding="utf-8")
            os.replace(pending, self.path)
        except (OSError, ValueError) as exc:
            log.warning("could not share the warmed text features in %s (%s)", self.path, first_line(exc))
            pending.unlink(missing_ok=True)


class MirroredScorer(VersionedScorer):
    """A mirrored version: its warm-up takes the text features a sibling worker warmed, then shares its own."""

    def __init__(self, inner: Any, version: str, warmed_text: WarmedTextFile) -> None:
        super().__init__(inner, version)
        self.warmed_text = warmed_text

    def warm_up(
        self,
        errors: Sequence[tuple[str | None, str | None, str | None]] = (),
        *,
        between_steps: Callable[[], object] | None = None,
    ) -> None:
        """The bundle's warm-up, with the rows of ``WarmedTextFile``; rewrites the file when it computed more."""
        shared = self.warmed_text.read()
        self.inner.warm_up(
            errors,
            between_steps=between_steps,
            known_text=shared.rows,
            direct_text_checked=shared.direct_form_checked,
        )
        rows = self.inner.text_model.warmed_rows()
        checked = self.inner.text_model.has_direct_form()
        if not rows.keys() <= shared.rows.keys() or checked > shared.direct_form_checked:
            self.warmed_text.write(shared.rows | rows, direct_form_checked=checked)
