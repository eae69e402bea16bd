"""Exceptions raised by dali_arb, and the one table that turns other libraries' failures into them.

Every error a user can cause says what was wrong, echoes the offending value or file, and says
what to do. The CLI prints ``str(error)`` as one line and exits non-zero. Besides its line, an error carries
keyword-only fields set where it is raised (``key``, ``source``, ``epoch``, ``step``, ``cause``, ``kind``; a
:class:`StorageError` also ``status`` and ``code``): :meth:`DaliArbError.fields` gives the ones set.

Hierarchy::

    DaliArbError                 base of everything raised on purpose
    ├── ConfigError              a bad option value (also a ValueError)
    ├── ManifestError            a manifest that is missing, unreadable or malformed
    ├── IndexingError            a source that cannot be indexed (missing path, empty folder)
    ├── PlanError                data and options that cannot make a plan (too few images)
    ├── StateError               a state_dict that does not fit this loader
    ├── DataError                the data cannot be served at run time (a bucket with no readable image left)
    ├── StorageError             a store, its credentials or the OS failed (5xx after retries, 401/403, no
    │   │                        answer before the deadline, a server that ignores Range, EMFILE, EIO): the
    │   │                        run stops and nothing is blocklisted; its subclasses are a sample's own
    │   ├── ObjectMissing        the object is not there (deleted after indexing)
    │   ├── ObjectChanged        the object's size is not the indexed one
    │   └── ObjectTooLarge       the object is larger than one sample may be (``DALI_ARB_MAX_SAMPLE_BYTES``)
    └── DeviceError              a device that is not there (``--device gpu`` without a GPU)
        └── ResourceError        a device or shared memory that ran out (GPU memory, ``/dev/shm``)

Translation: :data:`TABLE` is the one list of the failures of a store's request (obstore's, the OS's) and of a
DALI pipeline's run that we recognise, what each becomes and its message; :func:`translate` reads a failure's
facts (:class:`Facts`) and returns the first row that matches. Neither DALI nor obstore is imported: a failure
is read by its class's name and module and by its text. Imports: the standard library only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from operator import index
from typing import Any, ClassVar

__all__ = [
    "TABLE",
    "ConfigError",
    "DaliArbError",
    "DataError",
    "DeviceError",
    "Facts",
    "IndexingError",
    "ManifestError",
    "ObjectChanged",
    "ObjectMissing",
    "ObjectTooLarge",
    "PlanError",
    "ResourceError",
    "Rule",
    "StateError",
    "StorageError",
    "Translation",
    "dali_error_summary",
    "is_out_of_memory",
    "pipeline_facts",
    "raised_by_dali_arb",
    "redact",
    "request_facts",
    "translate",
]


def _one_line(value: object) -> str | None:
    """``value`` (a text, or an exception: ``Type: first line``) as one line of at most 200 characters."""
    if value is None:
        return None
    if isinstance(value, BaseException):
        first = _first_line(str(value), "")
        value = f"{type(value).__name__}: {first}" if first else type(value).__name__
    return _first_line(str(value), "") or None


def _count(name: str, value: object) -> int | None:
    """``value`` as an int (a NumPy integer too), None as None; a TypeError echoing anything else."""
    if value is None:
        return None
    try:
        return index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer or None, got {value!r}") from None


#: How a worker process's error carries its fields through DALI, which hands on only the traceback's text: a note
#: line (printed by the traceback, Python 3.11+) of this prefix and the fields as JSON.
FIELDS_NOTE = "dali_arb fields: "


#: ``scheme://user:password@host``: the password part of a URL's user information.
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*):[^@\s/]*@")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (``https://user:***@host/...``): a URL's
    credentials never reach a message, a log line or the loader's ``failed`` list."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


class DaliArbError(Exception):
    """Base class of every error dali_arb raises on purpose.

    ``str(error)`` is its one line (the message); the keyword-only fields say where: ``key`` (the manifest key),
    ``source`` (the file or URL), ``epoch`` and ``step``, ``cause`` (the underlying failure, one line: an
    exception given is summarised), ``kind`` (a short name of what happened: the :data:`TABLE` row that made it,
    or one its raise site gives, such as ``"too_large"``)."""

    FIELDS: ClassVar[tuple[str, ...]] = ("key", "source", "epoch", "step", "cause", "kind")

    def __init__(
        self,
        *args: object,
        key: str | None = None,
        source: str | None = None,
        epoch: int | None = None,
        step: int | None = None,
        cause: BaseException | str | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))
        self.key = None if key is None else str(key)
        self.source = None if source is None else redact(str(source))
        self.epoch = _count("epoch", epoch)
        self.step = _count("step", step)
        cause_line = _one_line(cause)
        self.cause = None if cause_line is None else redact(cause_line)
        self.kind = kind

    @property
    def __notes__(self) -> list[str]:  # type: ignore[override]
        """Notes a traceback prints: any added, then the fields as one :data:`FIELDS_NOTE` line (Python 3.11+), so
        that a worker process's error keeps them through DALI, which hands on only the traceback's text."""
        fields = self.fields()
        line = [FIELDS_NOTE + json.dumps(fields, default=str)] if fields else []
        return [*self.__dict__.get("_notes", []), *line]

    @__notes__.setter
    def __notes__(self, notes: list[str]) -> None:
        self.__dict__["_notes"] = [n for n in notes if not str(n).startswith(FIELDS_NOTE)]

    def add_note(self, note: str) -> None:
        self.__dict__.setdefault("_notes", []).append(str(note))

    def fields(self) -> dict[str, Any]:
        """The fields that are set (not None), by name, in :attr:`FIELDS` order."""
        return {name: getattr(self, name) for name in self.FIELDS if getattr(self, name, None) is not None}

    def to_dict(self) -> dict[str, Any]:
        """``{"error": class name, "message": str(self), **fields()}``: plain values, ready for JSON."""
        return {"error": type(self).__name__, "message": str(self), **self.fields()}

    def copy(self) -> DaliArbError:
        """A new error of this class with the same message and fields (its ``__cause__`` is the caller's to set:
        ``raise error.copy() from error.__cause__``)."""
        return type(self)(*self.args, **self.fields())


class ConfigError(DaliArbError, ValueError):
    """An option has a value that cannot work."""


class ManifestError(DaliArbError):
    """A manifest is missing, unreadable, or lacks what it must hold."""


class IndexingError(DaliArbError):
    """A source given to the indexer cannot be indexed."""


class PlanError(DaliArbError):
    """The data and options cannot make a plan (for example, fewer images than one batch)."""


class StateError(DaliArbError):
    """A ``state_dict`` does not fit the loader it is loaded into."""


class DeviceError(DaliArbError):
    """A requested device is not available."""


class DataError(DaliArbError):
    """The data cannot be served at run time (for example, every image of a bucket became unreadable)."""


class StorageError(DaliArbError):
    """A store, its credentials or the OS failed (not the sample): the message names the URL or file, the store's
    own words and what to do. Raised out of the loader; never a reason to blocklist a sample. Besides the base
    fields: ``status`` (the HTTP status the store answered) and ``code`` (its error code, ``SlowDown``...)."""

    FIELDS: ClassVar[tuple[str, ...]] = (*DaliArbError.FIELDS, "status", "code")

    def __init__(self, *args: object, status: int | None = None, code: str | None = None, **fields: Any) -> None:
        super().__init__(*args, **fields)
        self.status = _count("status", status)
        self.code = None if code is None else str(code)


class ObjectMissing(StorageError):
    """The object is not in the store (a sample deleted after indexing)."""


class ObjectChanged(StorageError):
    """The object's size differs from the indexed one (a sample rewritten after indexing)."""


class ObjectTooLarge(StorageError):
    """The object is larger than one sample may cost (``DALI_ARB_MAX_SAMPLE_BYTES``); its body is not read."""


class ResourceError(DeviceError):
    """A device or shared-memory resource ran out (GPU memory, ``/dev/shm``); the message says what to lower."""


# -- reading a failure's facts (no DALI, no obstore: class names, modules, text) -------------------------------
_ANY_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+")
_STATUS = re.compile(r"status code: (\d{3})([^:\n]*)|\bstatus: (\d{3}),")
_NETWORK = re.compile(r"HttpError \{\s*kind: (\w+)")
_OS_MESSAGE = re.compile(r'message: "([^"]+)"')
_CODE = re.compile(r"<Code>(\w+)</Code>")
#: Words of a failed request (its URLs removed) that say the network or the server failed, not the request.
_TRANSIENT = re.compile(
    r"\b(SlowDown|Slow Down|RequestTimeout|InternalError|ServiceUnavailable|timed? ?out|connection (reset|refused|"
    r"closed|aborted)|broken pipe|error sending request|incomplete ?message|unexpected eof)\b",
    re.IGNORECASE,
)
_TRANSIENT_CODES = ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable")
#: Store error codes that mean the credentials were refused (whatever the status).
REJECTED = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired")
#: Classes (``module.name``, a base class matches too) of failures that are the request's own, never retried.
_FINAL = frozenset({"obstore.exceptions.NotFoundError", "obstore.exceptions.PermissionDeniedError",
                    "obstore.exceptions.UnauthenticatedError", "obstore.exceptions.PreconditionError",
                    "builtins.FileNotFoundError", "builtins.PermissionError"})  # fmt: skip
_NOT_FOUND = frozenset({"obstore.exceptions.NotFoundError", "builtins.FileNotFoundError"})
_DENIED = frozenset({"obstore.exceptions.PermissionDeniedError", "builtins.PermissionError"})
_UNAUTHENTICATED = frozenset({"obstore.exceptions.UnauthenticatedError"})
_PRECONDITION = frozenset({"obstore.exceptions.PreconditionError"})
_NETWORK_CLASSES = frozenset({"builtins.ConnectionError", "builtins.TimeoutError"})
_OUT_OF_MEMORY = ("out of memory", "cudaerrormemoryallocation", "allocator_failure", "std::bad_alloc",
                  "cuda_error_out_of_memory")  # fmt: skip


def _first_line(text: str, default: str = "unknown error") -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else default)[:200]


def _classes(error: BaseException) -> frozenset[str]:
    """``module.name`` of the class of ``error`` and of each of its bases."""
    return frozenset(f"{c.__module__}.{c.__qualname__}" for c in type(error).__mro__)


@dataclass(frozen=True)
class Facts:
    """What a failure says, read from its class and the structured parts of its text (URLs removed first: a key
    such as ``img-503.jpg`` says nothing). A store's request: the HTTP ``status``, the store's error ``code``
    (``SlowDown``, ``InvalidAccessKeyId``), the ``network`` error's kind (reqwest's ``Connect``, ``Timeout``...),
    ``cause`` (a short phrase for the user), whether it is ``transient`` (worth retrying), and the ``version`` (ETag)
    the request asked for (``If-Match``; None: any). A pipeline's run:
    the dali_arb error it carries (``ours``), ``out_of_memory`` and DALI's ``summary``."""

    classes: frozenset[str]
    status: int | None = None
    code: str | None = None
    network: str | None = None
    cause: str = ""
    redirected: bool = False
    ignores_range: bool = False
    missing: bool = False
    precondition: bool = False
    transient: bool = False
    version: str | None = None
    ours: DaliArbError | None = None
    out_of_memory: bool = False
    summary: str = ""

    def named(self, names: frozenset[str]) -> bool:
        """Whether the failure's class (or a base) is one of ``names``."""
        return not self.classes.isdisjoint(names)


def request_facts(error: BaseException, *, refused_at: str | None = None, version: str | None = None) -> Facts:
    """The :class:`Facts` of a failed request to a store for the object's ``version`` (None: any). ``refused_at``:
    the ``host:port`` that refuses every connection (where storage routes redirects to other hosts), if any."""
    raw = str(error)
    text = _ANY_URL.sub("<url>", raw)
    found = _STATUS.search(text)
    status = int(found.group(1) or found.group(3)) if found else None
    code = (_CODE.search(text) or [None, None])[1]
    network = (_NETWORK.search(text) or [None, None])[1]
    classes = _classes(error)
    redirected = refused_at is not None and f"{refused_at}," in raw
    ignores_range = any(
        words in text for words in ("NotPartial", "non-partial response when range", "Range request not supported")
    )
    if redirected:
        cause = "redirected to another host"
    elif ignores_range:
        cause = "the server ignores Range requests: it answered 200 with the whole object"
    elif status is not None:
        reason = found.group(2).strip() if found.group(1) else ""
        cause = " ".join(filter(None, [str(status), reason])) + (f", {code}" if code else "")
    elif network is not None:
        os_message = _OS_MESSAGE.search(text)
        detail = os_message.group(1).lower() if os_message else {"Timeout": "timed out"}.get(network, "")
        cause = {"Connect": "cannot connect", "Timeout": "no answer"}.get(network, "connection dropped") + (
            f": {detail}" if detail else ""
        )
    else:
        cause = _first_line(text)
    facts = Facts(
        classes, status, code, network, cause, redirected, ignores_range,
        missing=not classes.isdisjoint(_NOT_FOUND) or status == 404,
        precondition=not classes.isdisjoint(_PRECONDITION), version=version,
    )  # fmt: skip
    return _with_transient(facts, text)


def _with_transient(facts: Facts, text: str) -> Facts:
    """``facts`` with ``transient`` set: the server or the network failed, not the request."""
    if facts.named(_FINAL):
        transient = False
    elif facts.named(_NETWORK_CLASSES):
        transient = True
    elif facts.redirected or facts.ignores_range:
        transient = False
    elif facts.status is not None:
        transient = facts.status in (408, 429) or facts.status >= 500
    elif facts.network is not None or facts.code in _TRANSIENT_CODES:
        transient = True
    else:
        transient = bool(_TRANSIENT.search(text))
    return replace(facts, transient=transient)


def pipeline_facts(error: BaseException) -> Facts:
    """The :class:`Facts` of a failed run of a DALI pipeline."""
    summary = dali_error_summary(error)
    return Facts(
        _classes(error), cause=summary, ours=_ours(error), out_of_memory=is_out_of_memory(error), summary=summary
    )


# -- the table ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """One row of :data:`TABLE`: a failure ``during`` a store's ``"request"`` or a DALI ``"pipeline"`` run that
    ``when`` matches becomes a ``becomes`` error with ``message`` (a ``str.format`` template over the failure's
    words and the caller's fields: ``url``, ``store``, ``tries``, ``cause``, ``code``, ``status``, ``version``,
    ``said`` (the code, else the cause), ``device``, ``epoch``, ``step``, ``summary``). ``kind`` names it."""

    during: str
    kind: str
    when: Callable[[Facts], bool]
    becomes: type[DaliArbError]
    message: str


_RESUME = "then run again (a loader resumes from its last checkpoint)"
#: Every failure we recognise, first match wins, per ``during``.
TABLE: tuple[Rule, ...] = (
    # a request to a store (dali_arb.data.storage retries it while the facts say transient, then raises this)
    Rule("request", "version_changed", lambda f: f.precondition and f.version is not None, ObjectChanged,
         "{url} changed since indexing: its ETag is no longer {version}"),
    Rule("request", "no_such_bucket", lambda f: f.code == "NoSuchBucket", StorageError,
         "bucket of {url} does not exist (NoSuchBucket); check the URL (and AWS_ENDPOINT_URL, AWS_REGION)"),
    Rule("request", "missing", lambda f: f.missing, ObjectMissing, "not found: {url}"),
    Rule("request", "short", lambda f: f.status == 416, ObjectChanged,
         "{url} is shorter than indexed (416 Range Not Satisfiable)"),
    Rule("request", "redirected", lambda f: f.redirected, StorageError,
         "{url}: the store redirected the request to another host, which is not followed (it would carry the "
         "request's credentials there); use the URL (or AWS_ENDPOINT_URL) of the host that serves the data, or "
         "set DALI_ARB_FOLLOW_REDIRECTS=1 to follow redirects"),
    Rule("request", "ignores_range", lambda f: f.ignores_range, StorageError,
         "{url}: the server ignores Range requests (it answered 200 with the whole object to a ranged GET); "
         "serve the shards from a server with byte ranges (HTTP 206), or copy them here and index the copies"),
    Rule("request", "credentials",
         lambda f: f.named(_UNAUTHENTICATED) or f.status == 401 or f.code in REJECTED, StorageError,
         "credentials rejected for {url} ({said}): check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and "
         "AWS_SESSION_TOKEN (or GOOGLE_APPLICATION_CREDENTIALS), " + _RESUME),
    Rule("request", "denied", lambda f: f.named(_DENIED) or f.status == 403, StorageError,
         "access denied to {url} (403): the credentials lack permission to read it"),
    Rule("request", "unavailable", lambda f: f.transient, StorageError,
         "{url}: the store {store} kept failing{tries} ({cause}); check its status and the network, " + _RESUME),
    Rule("request", "failed", lambda f: True, StorageError, "cannot read {url}: {cause}"),
    # a run of a DALI pipeline (the loader raises the error, or recovers from "undecodable" by probing its samples)
    Rule("pipeline", "ours", lambda f: f.ours is not None, DaliArbError, ""),  # (the error itself)
    Rule("pipeline", "out_of_memory", lambda f: f.out_of_memory, ResourceError,
         "the {device} ran out of memory in batch {step} of epoch {epoch} ({summary}); lower batch_size, "
         "--max-area or prefetch, or give the loader a GPU with more free memory"),
    Rule("pipeline", "undecodable", lambda f: True, DeviceError,
         "the DALI pipeline failed in batch {step} of epoch {epoch}: {summary}"),
)  # fmt: skip
DURINGS = ("request", "pipeline")


@dataclass(frozen=True)
class Translation:
    """What :func:`translate` made of a failure: the ``rule`` that matched (``kind`` is its name), the ``error``
    to raise (its ``__cause__`` the failure), the failure's ``facts``, and whether it is ``transient`` (a request
    worth retrying)."""

    rule: Rule
    error: DaliArbError
    facts: Facts

    @property
    def kind(self) -> str:
        return self.rule.kind

    @property
    def transient(self) -> bool:
        return self.facts.transient


class _Words(dict):
    def __missing__(self, name: str) -> str:
        raise TypeError(f"translate() needs {name}= to word this failure")


def translate(
    error: BaseException,
    *,
    during: str,
    url: str | None = None,
    store: str | None = None,
    retried: int = 0,
    version: str | None = None,
    refused_at: str | None = None,
    device: str | None = None,
    epoch: int | None = None,
    step: int | None = None,
    key: str | None = None,
) -> Translation:
    """The first :data:`TABLE` row of ``during`` (``"request"``: a store's request for ``url`` of the store named
    ``store``, after ``retried`` retries, of the object's ``version``; ``"pipeline"``: a DALI run of batch ``step``
    of ``epoch`` on ``device``) that ``error`` matches, and the error it becomes, its fields set."""
    if during not in DURINGS:
        raise ValueError(f"during must be one of {DURINGS}, got {during!r}")
    if during == "request":
        facts = request_facts(error, refused_at=refused_at, version=version)
    else:
        facts = pipeline_facts(error)
    rule = next(r for r in TABLE if r.during == during and r.when(facts))
    fields = {"key": key, "source": url, "epoch": epoch, "step": step, "cause": facts.cause or None}
    if rule.kind == "ours":  # raised by our own code: where it was is all that is added
        for name in ("key", "source", "epoch", "step"):
            if getattr(facts.ours, name, None) is None and fields[name] is not None:
                setattr(facts.ours, name, fields[name])
        return Translation(rule, facts.ours, facts)
    words = _Words(
        url=url, store=store, tries=f" after {retried} retries" if retried else "", cause=facts.cause,
        code=facts.code, status=facts.status, version=version, said=facts.code or facts.cause,
        device=device.upper() if device else None, epoch=epoch, step=step, summary=facts.summary,
    )  # fmt: skip
    words = _Words({name: value for name, value in words.items() if value is not None})
    extra = {"status": facts.status, "code": facts.code} if issubclass(rule.becomes, StorageError) else {}
    made = rule.becomes(rule.message.format_map(words), kind=rule.kind, **fields, **extra)
    made.__cause__ = error
    return Translation(rule, made, facts)


# -- reading DALI's failures (DALI is not imported: its errors are read by their text) --------------------


def _ours(error: BaseException | None) -> DaliArbError | None:
    """The dali_arb error in ``error`` or its causes: itself, or rebuilt from a worker's traceback text (its class,
    its message, and its fields from the :data:`FIELDS_NOTE` line that follows)."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, DaliArbError):
            return error
        lines = [line.strip() for line in str(error).splitlines()]
        for at in range(len(lines) - 1, -1, -1):
            name, colon, message = lines[at].partition(": ")
            kind = globals().get(name.removeprefix("dali_arb.errors.")) if name.startswith("dali_arb.") else None
            if colon and isinstance(kind, type) and issubclass(kind, DaliArbError):
                return kind(message, **_noted_fields(lines[at + 1 : at + 2], kind))
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _noted_fields(lines: list[str], kind: type[DaliArbError]) -> dict[str, Any]:
    """The fields of a :data:`FIELDS_NOTE` line among ``lines`` that ``kind`` takes, else ``{}``."""
    for line in lines:
        if line.startswith(FIELDS_NOTE):
            try:
                fields = json.loads(line[len(FIELDS_NOTE) :])
            except ValueError:
                return {}
            return {k: v for k, v in fields.items() if k in kind.FIELDS} if isinstance(fields, dict) else {}
    return {}


def raised_by_dali_arb(error: BaseException) -> DaliArbError | None:
    """The dali_arb error (a DataError, a ManifestError...) that the source raised: itself (worker threads, no
    workers), or, from a worker process, rebuilt from the traceback DALI hands on as the text of its own
    ``Exception("Exception traceback received from worker thread ...")`` (its cause keeps the message only).
    The ``"ours"`` row of :data:`TABLE`."""
    return pipeline_facts(error).ours


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error``'s text says a device or the host ran out of memory (the ``"out_of_memory"`` row)."""
    text = str(error).lower()
    return any(marker in text for marker in _OUT_OF_MEMORY)


def dali_error_summary(error: BaseException) -> str:
    """The informative part of a DALI pipeline error: the operator and what it encountered."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    operator = next((line.split("`")[1] for line in lines if line.startswith("Error in") and "`" in line), "")
    after = lines.index("encountered:") + 1 if "encountered:" in lines else None
    what = lines[after] if after is not None and after < len(lines) else (lines[0] if lines else type(error).__name__)
    return f"{operator.removeprefix('nvidia.dali.fn.')}: {what}"[:200] if operator else what[:200]
