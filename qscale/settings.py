"""Settings, each defined once: a field of a frozen :class:`Settings` model declared with
:func:`setting`, with its docstring as its description. From that one definition come its
``QSCALE_*`` environment variable, its command-line flag, its ``--help`` text and its checks::

    class NodeConfig(Settings):
        env_prefix: ClassVar[str] = "QSCALE_NODE_"

        drain_grace_s: float = setting(30.0, ge=0)
        \"\"\"On SIGTERM, how long running shards may go on before they are handed back.\"\"\"

gives ``$QSCALE_NODE_DRAIN_GRACE`` (the prefix, then the name in capitals less a trailing
``_S``), ``--drain-grace`` and the help "On SIGTERM, ... (default 30; $QSCALE_NODE_DRAIN_GRACE)".
Values come from the defaults, then the variables (:meth:`Settings.from_env`), then the flags
(:func:`add_flags` adds them to an argparse parser, :func:`flag_values` collects them). A secret
(``secret=True``) comes only from its variable: it never gets a flag and is never printed.

Counts and byte sizes (:data:`Size` fields) are read by :func:`parse_size`, the one grammar
of every such variable and flag. This module is light (pydantic, no qiskit): the node's daemon
parent imports it.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import types
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from fractions import Fraction
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from typing_extensions import Self

from qscale.errors import InvalidArgumentError

__all__ = ["Settings", "Spec", "setting", "Size", "LogLevel", "parse_size", "add_flags", "flag_values",
           "Connection", "ClientSettings", "DEFAULT_ADDRESS"]

DEFAULT_ADDRESS = "127.0.0.1:50051"
"""Where a coordinator listens, and nodes and clients look for it, unless told otherwise."""

_SOURCES: ContextVar[Mapping[str, str]] = ContextVar("_SOURCES", default={})
"""While :meth:`Settings.from_env` builds a model: ``"QSCALE_X='raw'"`` by field read from a variable."""
_SIZE = re.compile(r"(\d+(?:_\d+)*)(?:\.(\d+))?\s*(?:([KMGTP])(?:I?B|I)?|B)?", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """A count or a byte size, in the one grammar of every such setting and flag.

    Digits, optionally grouped by ``_`` (``1_000_000``) and optionally with a decimal fraction,
    then optionally a binary unit: ``K``, ``M``, ``G``, ``T``, ``P`` (powers of 1024, alone or
    followed by ``B``, ``iB`` or ``i``: ``2G`` = ``2GB`` = ``2GiB`` = ``2Gi``), or ``B`` alone for
    bytes. Case and spaces around are ignored. The value must come out whole and not negative: ``512M``,
    ``1.5G``, ``2GiB``, ``100B``, ``1_000_000`` are fine; ``1.5``, ``0.3K``, ``-1``, ``1e3`` are
    not. An int is taken as it is (when not negative).

    Raises:
        InvalidArgumentError: anything else.
    """
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    match = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match:
        whole, fraction, unit = match.groups()
        value = Fraction(f"{whole.replace('_', '')}.{fraction or 0}") * 1024 ** " KMGTP".index((unit or " ").upper())
        if value.denominator == 1:
            return int(value)
    raise InvalidArgumentError(
        f"not a byte count or whole number: {text!r} (write e.g. 1000000, 1_000_000, 512M, 1.5G or 2GiB)")


def _size(value: Any) -> Any:
    return parse_size(value) if isinstance(value, str) else value


def _log_level(value: str) -> str:
    if not isinstance(logging.getLevelName(value.upper()), int):
        raise InvalidArgumentError(f"unknown log level {value!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return value.upper()


Size = Annotated[int, BeforeValidator(_size)]
"""An int setting that may also be written as :func:`parse_size` reads it (``"512M"``)."""
LogLevel = Annotated[str, AfterValidator(_log_level)]
"""A logging level name, any case; stored in capitals."""


def setting(default: Any = None, *, factory: Callable[[], Any] | None = None, env: str | None = None,
            metavar: str | None = None, shown: str | None = None, secret: bool = False, **constraints: Any) -> Any:
    """Declare a field of a :class:`Settings` model as a setting.

    Args:
        default: its default (or ``factory``, called for each new model).
        env: its variable, when not the model's ``env_prefix`` + the name in capitals less ``_S``.
            Its flag is always ``--`` + the name less ``_s``, with ``-`` for ``_``.
        metavar: the flag's value in ``--help``, when not guessed from the name and type.
        shown: the default as ``--help`` words it (needed with ``factory``, and for a None default
            that means something).
        secret: read from its variable only: no flag, hidden from ``repr`` and :meth:`Settings.to_dict`.
        constraints: pydantic's (``ge=1``, ``le=65535``, ``gt=0``); broken ones read
            "<name> must be >= 1, got 0".
    """
    extra = {k: v for k, v in {"env": env, "metavar": metavar, "shown": shown, "secret": secret}.items() if v}
    kwargs: dict[str, Any] = {"repr": not secret, "json_schema_extra": {"setting": extra}, **constraints}
    return Field(default_factory=factory, **kwargs) if factory else Field(default, **kwargs)


@dataclass(frozen=True)
class Spec:
    """One setting as the environment and the command line see it."""

    name: str
    """Field name."""
    env: str
    """Its ``QSCALE_*`` variable."""
    flag: str | None
    """Its flag; None for a secret."""
    help: str
    """``--help`` text: "<description> (default X; $VAR)" (``%`` doubled, for argparse)."""
    parse: Callable[[str], Any]
    """Reads the variable's or the flag's text (ValueError with a short reason)."""
    metavar: str | None
    choices: tuple[str, ...] | None
    switch: bool
    """A bool: the flag takes no value and turns the setting on."""
    secret: bool


class Settings(BaseModel):
    """Base of the settings models: frozen, strictly typed, and built from defaults, then
    ``QSCALE_*`` variables, then flags (:meth:`from_env`). Every broken rule is an
    :class:`~qscale.errors.InvalidArgumentError` (an unknown name a TypeError)."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", allow_inf_nan=False,
                              use_attribute_docstrings=True)
    env_prefix: ClassVar[str] = "QSCALE_"
    """Start of the variable of every setting that names none itself."""
    what: ClassVar[str] = "qscale"
    """What these settings configure, for "unknown ... settings" errors."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _error(type(self), exc, _SOURCES.get()) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen; use with_() for a changed copy")

    @classmethod
    def settings(cls) -> dict[str, Spec]:
        """Every setting of this model by field name (nested models are not settings)."""
        return _specs(cls)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Defaults, then the variables of ``environ`` (default ``os.environ``; empty ones are
        ignored), then the ``overrides`` that are not None (the flags).

        Raises:
            InvalidArgumentError: a value that does not parse or breaks a rule; a value from a
                variable is named by it: ``QSCALE_HEARTBEAT_TIMEOUT='x': not a number``.
            TypeError: an override that names no field.
        """
        unknown = sorted(set(overrides) - set(cls.model_fields))
        if unknown:
            raise TypeError(f"unknown {cls.what} settings: {unknown}")
        env = os.environ if environ is None else environ
        values = {k: v for k, v in overrides.items() if v is not None}
        sources: dict[str, str] = {}
        for name, spec in cls.settings().items():
            raw = env.get(spec.env, "")
            if name in values or not raw.strip():
                continue
            sources[name] = f"{spec.env}={raw!r}"
            try:
                values[name] = spec.parse(raw.strip())
            except ValueError as exc:
                raise InvalidArgumentError(f"{sources[name]}: {exc}") from None
        reset = _SOURCES.set(sources)
        try:
            return cls(**values)
        finally:
            _SOURCES.reset(reset)

    def with_(self, **changes: Any) -> Self:
        """A copy with some fields changed (and checked again)."""
        return type(self)(**{**dict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-friendly values, a secret that is set as ``"<hidden>"``."""
        out = self.model_dump(mode="json")
        for name, spec in self.settings().items():
            if spec.secret and out[name] is not None:
                out[name] = "<hidden>"
        return out


def add_flags(parser: argparse.ArgumentParser, *models: type[Settings]) -> None:
    """Add to ``parser`` a flag for every setting of ``models`` except secrets. A flag not
    given leaves None, so that :meth:`Settings.from_env` keeps the variable or the default."""
    for model in models:
        for spec in model.settings().values():
            if spec.flag is None:
                continue
            if spec.switch:
                parser.add_argument(spec.flag, dest=spec.name, action="store_const", const=True, help=spec.help)
            else:
                parser.add_argument(spec.flag, dest=spec.name, type=_flag_type(spec), metavar=spec.metavar,
                                    choices=spec.choices, help=spec.help)


def flag_values(args: argparse.Namespace, *models: type[Settings]) -> dict[str, Any]:
    """The settings of ``models`` as parsed by flags from :func:`add_flags` (None: not given),
    for ``from_env(**...)``."""
    return {name: getattr(args, name) for model in models for name in model.settings() if hasattr(args, name)}


# ------------------------------------------------------------------ building the specs

def _flag_type(spec: Spec) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return spec.parse(text.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = spec.name
    return convert


def _reader(convert: Callable[[str], Any], reason: str) -> Callable[[str], Any]:
    """``convert``, with ``reason`` as its one error message."""
    def read(text: str) -> Any:
        try:
            return convert(text)
        except (ValueError, KeyError):
            raise ValueError(reason) from None

    return read


_BOOLS = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}
_int = _reader(int, "not an integer")
_float = _reader(float, "not a number")
_bool = _reader(lambda text: _BOOLS[text.lower()], "not a boolean (true/false, 1/0, yes/no, on/off)")


def _base_type(field: FieldInfo) -> Any:
    """The field's type, without ``| None``."""
    ann = field.annotation
    if get_origin(ann) in (Union, types.UnionType):
        ann = next(a for a in get_args(ann) if a is not type(None))
    return ann


def _show(value: Any, size: bool, metavar: str | None) -> str:
    """A default as --help shows it (sizes as parse_size reads them: ``256M``, ``100_000``)."""
    if value is None or isinstance(value, (bool, float)):
        return "none" if value is None else str(value).lower() if isinstance(value, bool) else f"{value:g}"
    if size and metavar == "BYTES":
        unit = next((u for u in range(5, 0, -1) if value and value % (1024 ** u) == 0), 0)
        return f"{value // 1024 ** unit:_}{' KMGTP'[unit].strip()}"
    return f"{value:_}" if size and value >= 10_000 else str(value)


def _metavar(name: str, ann: Any, size: bool) -> str:
    for suffix, metavar in (("_s", "SECONDS"), ("_port", "PORT"), ("_file", "FILE"), ("_dir", "DIR"),
                            ("_bytes", "BYTES"), ("_budget", "BYTES")):
        if name.endswith(suffix):
            return metavar
    return "N" if ann is int or size else "X" if ann is float else name.upper()


@functools.cache
def _specs(model: type[Settings]) -> dict[str, Spec]:
    specs = {}
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra
        meta = extra.get("setting") if isinstance(extra, dict) else None
        if not isinstance(meta, dict):
            continue
        ann = _base_type(field)
        size = any(getattr(m, "func", None) is _size for m in field.metadata)
        parse: Callable[[str], Any] = (parse_size if size else _int if ann is int else _float if ann is float
                                       else _bool if ann is bool else str)
        choices = get_args(ann) if get_origin(ann) is Literal else None
        env = str(meta.get("env") or model.env_prefix + name.upper().removesuffix("_S"))
        metavar = None if choices else str(meta.get("metavar") or _metavar(name, ann, size))
        default = meta.get("shown") or _show(field.get_default(call_default_factory=False), size, metavar)
        description = " ".join((field.description or "").replace("``", "").split()).rstrip(".")
        assert description, f"{model.__name__}.{name} needs a docstring: it is the setting's --help"
        secret = bool(meta.get("secret"))
        flag = None if secret else "--" + name.removesuffix("_s").replace("_", "-")
        help_text = f"{description} (default {default}; ${env})".replace("%", "%%")
        specs[name] = Spec(name=name, env=env, flag=flag, help=help_text, parse=parse, metavar=metavar,
                           choices=choices, switch=ann is bool, secret=secret)
    return specs


# ------------------------------------------------------------------ errors

_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}
_KINDS = {"int": "an integer", "float": "a number", "finite_number": "a finite number", "bool": "true or false",
          "string": "a string"}


def _error(model: type[Settings], exc: ValidationError, sources: Mapping[str, str]) -> Exception:
    """pydantic's errors in qscale's words, each value from a variable named by it."""
    errors = exc.errors()
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return TypeError(f"unknown {model.what} settings: {unknown}")
    messages = []
    for e in errors:
        name = str(e["loc"][0]) if e["loc"] else ""
        what, kind, ctx, got = name.removesuffix("_s").replace("_", " "), e["type"], e.get("ctx", {}), e.get("input")
        if kind == "value_error":
            text = str(ctx["error"])
        elif kind in _BOUNDS:
            key, op = _BOUNDS[kind]
            text = f"{what} must be {op} {ctx[key]}, got {got!r}"
        elif kind == "literal_error":
            text = f"{what} must be {ctx['expected']}, got {got!r}"
        else:
            noun = next((v for k, v in _KINDS.items() if kind.startswith(k)), None)
            text = f"{what} must be {noun}, got {got!r}" if noun else f"{what}: {e['msg']}"
        messages.append(f"{sources[name]}: {text}" if name in sources else text)
    return InvalidArgumentError("; ".join(messages))


# ------------------------------------------------------------------ reaching the coordinator

class Connection(Settings):
    """How a node or a client reaches the coordinator: the settings nodes and clients share."""

    coordinator: str = setting(DEFAULT_ADDRESS, env="QSCALE_COORDINATOR", metavar="HOST:PORT")
    """HOST:PORT (any gRPC target) of the coordinator."""
    tls_ca: str | None = setting(env="QSCALE_TLS_CA", metavar="PEM")
    """CA that signed the coordinator's certificate; any TLS setting turns TLS on."""
    tls_cert: str | None = setting(env="QSCALE_TLS_CERT", metavar="PEM")
    """Certificate presented to a mutual-TLS coordinator; needs --tls-key."""
    tls_key: str | None = setting(env="QSCALE_TLS_KEY", metavar="PEM")
    """Private key of --tls-cert."""

    @model_validator(mode="after")
    def _check_connection(self) -> Connection:
        if not self.coordinator.strip() or any(ch.isspace() for ch in self.coordinator):
            raise InvalidArgumentError(f"coordinator address must be HOST:PORT, got {self.coordinator!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgumentError("a TLS client certificate needs its key: give --tls-cert and --tls-key together")
        return self

    def tls_config(self) -> Any:
        """A :class:`qscale.security.TLSConfig` when any TLS setting is given, else None (plain)."""
        from qscale.security import TLSConfig

        tls = TLSConfig(self.tls_cert, self.tls_key, self.tls_ca)
        return tls if tls.enabled else None


class ClientSettings(Connection):
    """How every client command (``submit``, ``watch``, ``jobs`` ...) reaches the coordinator."""

    what: ClassVar[str] = "client"

    token_file: str | None = setting(env="QSCALE_CLIENT_TOKEN_FILE")
    """File holding the API token (or the token itself in $QSCALE_CLIENT_TOKEN, never on a command line)."""
    token: str | None = setting(env="QSCALE_CLIENT_TOKEN", secret=True)
    """The API token itself (never a flag)."""
    connect_timeout_s: float | None = setting(None, gt=0, le=86_400, shown="5")
    """Seconds to wait for a coordinator that does not answer (packets dropped, not gRPC, restarting) before
    giving up with exit 3; a wrong address (a refused connection) fails sooner"""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """As :meth:`Settings.from_env`; a ``token_file`` override (``--token-file``) also wins
        over ``$QSCALE_CLIENT_TOKEN``, which wins over ``$QSCALE_CLIENT_TOKEN_FILE`` (as in
        :class:`qscale.Client`)."""
        settings = super().from_env(environ, **overrides)
        return settings.with_(token=None) if overrides.get("token_file") else settings

    def resolved_token(self) -> str | None:
        """The API token: ``$QSCALE_CLIENT_TOKEN``, else read from :attr:`token_file`; None
        when neither is set.

        Raises:
            InvalidArgumentError, FailedPreconditionError: a bad token or an unreadable file.
        """
        from qscale.security import check_token, read_token

        if self.token:
            return check_token(self.token, "$QSCALE_CLIENT_TOKEN")
        return read_token(self.token_file) if self.token_file else None
