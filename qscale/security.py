"""Authentication and transport security: bearer tokens per role, TLS and mutual TLS.

Two roles hold separate credentials::

    role     token                           may call
    node     a join token (QSCALE_NODE_*)    /qscale.v1.NodeService/*   (Register, Work)
    client   an API token (QSCALE_CLIENT_*)  /qscale.v1.JobService/*    (Submit, GetJob, Watch, ...)
    (none)   -                               /grpc.health.v1.Health/*   (probes)

The coordinator checks every call in :class:`AuthInterceptor` before any handler runs: no
token or an unknown one gets ``UNAUTHENTICATED``, a valid token of the other role
``PERMISSION_DENIED``. Callers attach ``authorization: Bearer <token>`` metadata to every call
of a channel made by :func:`make_channel`.

Tokens come from files or from environment variables, never from command-line arguments,
which any local user can read in ``ps``. They are compared in constant time. A token file has
one token per line, with ``#`` comments, so several may be valid at once while they are
rotated; each client token belongs to a user, named on its line with the user's options
(:func:`read_token_entries`)::

    # TOKEN                                                           USER   OPTIONS
    6f1c...e2a0                                                       alice  weight=2 max-jobs=50
    93ab...77d1                                                       alice
    0d4e...c915                                                       ops    admin
    b7c2...11fe                                                              # user "default"

:class:`TLSConfig` turns PEM file paths into gRPC credentials: a server with a CA requires
client certificates signed by it (mutual TLS); a client or node verifies the server with its
CA and, given a certificate and key, presents them.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import re
import stat
import types
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from qscale.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    QScaleError,
    UnauthenticatedError,
)
from qscale.rpc import CLIENT_RECONNECT_BACKOFF_S, DEFAULT_CONNECT_TIMEOUT_S, channel_options
from qscale.rpc_status import status_for

__all__ = [
    "NODE",
    "CLIENT",
    "MIN_TOKEN_LENGTH",
    "Tokens",
    "TokenEntry",
    "UserOptions",
    "DEFAULT_USER",
    "USER_NAME",
    "check_user_name",
    "read_token_entries",
    "merge_user_options",
    "TLSConfig",
    "AuthInterceptor",
    "BearerTokenInterceptor",
    "check_token",
    "read_token_file",
    "read_token",
    "required_role",
    "make_channel",
    "is_loopback_address",
    "refuse_secret_options",
]

log = logging.getLogger(__name__)

NODE = "node"
CLIENT = "client"
MIN_TOKEN_LENGTH = 16
"""Shortest token accepted (``openssl rand -hex 32`` makes a good one)."""

AUTH_HEADER = "authorization"
_SCHEME = "bearer"
_ROLE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("/qscale.v1.NodeService/", NODE),
    ("/qscale.v1.JobService/", CLIENT),
)
_OPEN_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/",)
_OPEN = "open"

DEFAULT_USER = "default"
"""The user of a client token whose line names none, and of a token given by value
(``$QSCALE_CLIENT_TOKEN``); without authentication every caller is this user."""
USER_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
"""What a user name may be (see :func:`check_user_name`)."""
_OPTIONS = {"admin": "admin", "weight": "weight", "max-jobs": "max_jobs", "max-queued-shots": "max_queued_shots",
            "max-slots": "max_slots"}
"""Options of a client token line -> :class:`UserOptions` field."""
_OPTION_SYNTAX = ("admin", "weight=W", "max-jobs=N", "max-queued-shots=N", "max-slots=N")
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


# ------------------------------------------------------------------------------------- tokens

def check_token(token: str, source: str = "token") -> str:
    """``token`` if it is acceptable: at least :data:`MIN_TOKEN_LENGTH` printable ASCII
    characters without spaces (it travels in gRPC metadata).

    Raises:
        InvalidArgumentError: the token is too short or holds other characters; the message
            names ``source`` but never shows the token.
    """
    if not isinstance(token, str):
        raise InvalidArgumentError(f"{source}: a token must be a string")
    if len(token) < MIN_TOKEN_LENGTH:
        raise InvalidArgumentError(
            f"{source}: token too short ({len(token)} characters; at least {MIN_TOKEN_LENGTH} are needed, "
            "e.g. from `openssl rand -hex 32`)")
    if not all("!" <= ch <= "~" for ch in token):
        raise InvalidArgumentError(f"{source}: a token may only hold printable ASCII characters without spaces")
    return token


def check_user_name(name: str, source: str = "user name") -> str:
    """``name`` if it is a valid user name: 1-64 characters of letters, digits and ``_ . @ -``,
    and not the name of an option of token files (``admin``, ``weight``, ``max-jobs``, ...).

    Raises:
        InvalidArgumentError: anything else (the name is not quoted: it could be a misplaced token).
    """
    if not isinstance(name, str) or not USER_NAME.fullmatch(name) or name in _OPTIONS:
        raise InvalidArgumentError(f"{source}: a user name is 1-64 characters of letters, digits and _ . @ - "
                                   "(and not an option's name, such as admin)")
    return name


@dataclass(frozen=True)
class UserOptions:
    """What client token files say about one user; None (False for ``admin``): not said, so the
    coordinator's defaults apply (weight 1, the ``max_*_per_user`` settings)."""

    admin: bool = False
    """Sees and cancels every user's jobs, and lists every user."""
    weight: float | None = None
    """The user's share of the cluster relative to other users (``weight=``)."""
    max_jobs: int | None = None
    """Most unfinished jobs (``max-jobs=``; 0: no limit)."""
    max_queued_shots: int | None = None
    """Most shots queued (``max-queued-shots=``; 0: no limit)."""
    max_slots: int | None = None
    """Most node slots at once (``max-slots=``; 0: no limit)."""


@dataclass(frozen=True)
class TokenEntry:
    """One line of a token file (see :func:`read_token_entries`)."""

    token: str = field(repr=False)
    user: str
    """The user it belongs to (a label on a node token); :data:`DEFAULT_USER` when the line names none."""
    named: bool
    """Whether the line names the user."""
    options: Mapping[str, Any]
    """The options the line gives, by :class:`UserOptions` field name (``admin``, ``weight``,
    ``max_jobs``, ``max_queued_shots``, ``max_slots``)."""
    where: str
    """``token file PATH, line N``, for messages."""


def _read_text(path: str | os.PathLike[str], what: str) -> str:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise FailedPreconditionError(f"cannot read {what} {p}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"{what} {p} is not UTF-8 text") from exc
    try:
        mode = p.stat().st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s %s is readable by other users (mode %o); chmod 600 it", what, p, stat.S_IMODE(mode))
    return text


def _parse_token_line(fields: list[str], where: str, role: str) -> TokenEntry:
    """One line of a token file, split on whitespace: ``TOKEN [USER] [OPTION ...]``."""
    token = check_token(fields[0], where)
    rest = fields[1:]
    user, named = DEFAULT_USER, False
    if rest and not _is_option(rest[0]):
        if not USER_NAME.fullmatch(rest[0]):
            raise InvalidArgumentError(
                f"{where}: the second field is neither a user name (1-64 characters of letters, digits and "
                f"_ . @ -) nor an option; the format is TOKEN [USER] [OPTION ...]")
        user, named = rest[0], True
        rest = rest[1:]
    if rest and role == NODE:
        raise InvalidArgumentError(
            f"{where}: options ({', '.join(_OPTION_SYNTAX)}) are for client tokens only; a line of a node "
            "token file is TOKEN [NAME]")
    options: dict[str, Any] = {}
    for index, item in enumerate(rest, 3 if named else 2):
        key, eq, value = item.partition("=")
        name = _OPTIONS.get(key)
        if name is None:
            # A field shorter than a token may be quoted (a typo); a longer one could be a token.
            shown = f" {key!r}" if len(key) < MIN_TOKEN_LENGTH and key.replace("-", "").isalnum() else ""
            raise InvalidArgumentError(f"{where}: field {index} is no option{shown}; the options are "
                                       f"{', '.join(_OPTION_SYNTAX)}")
        if key == "admin" and eq:
            raise InvalidArgumentError(f"{where}: admin takes no value (write admin, or leave it out)")
        if key != "admin" and not eq:
            raise InvalidArgumentError(f"{where}: {key} needs a value ({_OPTION_SYNTAX[list(_OPTIONS).index(key)]})")
        if name in options:
            hint = f" (a user may not be named {key})" if index == 3 and not eq else ""
            raise InvalidArgumentError(f"{where}: {key} is given twice{hint}")
        options[name] = _option_value(key, value, where)
    return TokenEntry(token, user, named, types.MappingProxyType(options), where)


def _is_option(item: str) -> bool:
    return "=" in item or item in _OPTIONS


def _option_value(key: str, value: str, where: str) -> Any:
    """The value of option ``key`` (a field ``key=value``), checked; never quotes a value that
    could be a token."""
    if key == "admin":
        return True
    if key == "weight":
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise InvalidArgumentError(f"{where}: weight must be a positive number (e.g. weight=2 or weight=0.5)")
        return weight
    from qscale.settings import parse_size  # (a late import: the settings pull in pydantic)

    limit = _INT32_MAX if key in ("max-jobs", "max-slots") else _INT64_MAX
    try:
        number = parse_size(value)
    except InvalidArgumentError:
        number = -1
    if not 0 <= number <= limit:
        raise InvalidArgumentError(f"{where}: {key} must be a whole number from 0 (no limit) to {limit:,} "
                                   f"(e.g. {key}=100, {key}=10K)")
    return number


def read_token_entries(path: str | os.PathLike[str], role: str = CLIENT) -> tuple[TokenEntry, ...]:
    """Every line of a token file that holds a token, in order, as :class:`TokenEntry` (a token
    on several lines once per line).

    The one format of every token file (node and client, the coordinator's and a caller's)::

        # comment
        TOKEN [USER] [OPTION ...]      # whitespace separated; a comment may follow

    ``USER`` is 1-64 characters of letters, digits and ``_ . @ -`` (not ``admin``, nor another
    option's name: a second field that is an option means the line names no user); a token
    without one belongs to the user :data:`DEFAULT_USER`. Options, for client tokens only:
    ``admin`` (sees and cancels every user's jobs), ``weight=W`` (a positive number: the
    user's share of the cluster relative to other users, 1 by default), ``max-jobs=N``,
    ``max-queued-shots=N`` and ``max-slots=N`` (the user's quotas, in the size grammar of
    :func:`qscale.settings.parse_size`; 0: no limit). On a node token (``role`` :data:`NODE`)
    the name is only a label and options are refused. A token listed twice counts once (for the
    same user).

    Raises:
        FailedPreconditionError: the file cannot be read.
        InvalidArgumentError: it holds no token, a bad token, user name or option, or a token
            listed again for another user; the message gives the file and line, never a token.
    """
    text = _read_text(path, "token file")
    entries: list[TokenEntry] = []
    firsts: dict[str, TokenEntry] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        entry = _parse_token_line(fields, f"token file {path}, line {number}", role)
        first = firsts.setdefault(entry.token, entry)
        if first.user != entry.user:
            raise InvalidArgumentError(f"{entry.where}: this token is also on line {first.where.rsplit(' ', 1)[1]} "
                                       f"for user {first.user!r}; a token belongs to one user")
        entries.append(entry)
    if not entries:
        raise InvalidArgumentError(f"token file {path} holds no token")
    return tuple(entries)


def read_token_file(path: str | os.PathLike[str], role: str = CLIENT) -> tuple[str, ...]:
    """Every token of a token file (see :func:`read_token_entries` for the format), each once,
    in order. Several tokens let a new one be handed out before the old one is removed.

    Raises:
        FailedPreconditionError: the file cannot be read.
        InvalidArgumentError: it holds no token, or a line :func:`read_token_entries` refuses
            (the message gives the line number, never the token).
    """
    return tuple(dict.fromkeys(entry.token for entry in read_token_entries(path, role)))


def read_token(path: str | os.PathLike[str], role: str = CLIENT) -> str:
    """The one token of a caller's token file (same format as :func:`read_token_entries`; a
    user name and options on its line are allowed, and only the token is returned).

    Raises:
        InvalidArgumentError: the file holds no token or several.
    """
    tokens = read_token_file(path, role)
    if len(tokens) > 1:
        raise InvalidArgumentError(f"token file {path} holds {len(tokens)} tokens; a caller needs exactly one")
    return tokens[0]


def merge_user_options(entries: Iterable[TokenEntry]) -> dict[str, UserOptions]:
    """Per user named by ``entries`` (client tokens), the options its lines give. Several lines
    of one user (tokens being rotated) must agree on an option, or give it on one line only.

    Raises:
        InvalidArgumentError: two lines give a user different values of an option (the message
            names both lines and the user, never a token).
    """
    given: dict[str, dict[str, tuple[Any, str]]] = {}
    for entry in entries:
        mine = given.setdefault(entry.user, {})
        for name, value in entry.options.items():
            first = mine.setdefault(name, (value, entry.where))
            if first[0] != value:
                key = name.replace("_", "-")
                raise InvalidArgumentError(
                    f"{entry.where}: user {entry.user!r} has {key}={_shown(value)} here but {key}={_shown(first[0])} "
                    f"on {first[1]}; give a user's options on one of its lines, or the same on each")
    return {user: UserOptions(**{name: value for name, (value, _) in options.items()})
            for user, options in given.items()}


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class Tokens:
    """The tokens a coordinator accepts, per role, and the user each client token belongs to.
    Both roles or neither: a coordinator that checks only one side would leave the other open."""

    node: frozenset[str] = field(default=frozenset(), repr=False)
    """Join tokens: may call NodeService (register a node, hold a work stream and heartbeat on it)."""
    client: frozenset[str] = field(default=frozenset(), repr=False)
    """API tokens: may call JobService (submit, read, watch, cancel jobs; list nodes and users)."""
    users: Mapping[str, str] = field(default_factory=dict, repr=False, hash=False)
    """The user of a client token (token -> name); a client token not in it belongs to
    :data:`DEFAULT_USER`."""
    options: Mapping[str, UserOptions] = field(default_factory=dict, repr=False, hash=False)
    """What the client token files say about each user (name -> options); a user not in it has
    default options."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "node", frozenset(self.node))
        object.__setattr__(self, "client", frozenset(self.client))
        object.__setattr__(self, "users", types.MappingProxyType(dict(self.users)))
        object.__setattr__(self, "options", types.MappingProxyType(dict(self.options)))
        for role, tokens in ((NODE, self.node), (CLIENT, self.client)):
            for token in tokens:
                check_token(token, f"a {role} token")
        if bool(self.node) != bool(self.client):
            have, missing = (NODE, CLIENT) if self.node else (CLIENT, NODE)
            raise InvalidArgumentError(
                f"{have} tokens are configured but no {missing} tokens: configure both roles "
                f"(--node-tokens-file and --client-tokens-file, or $QSCALE_NODE_TOKEN and $QSCALE_CLIENT_TOKEN) "
                "or neither")
        if self.node & self.client:
            raise InvalidArgumentError("the same token is configured for nodes and for clients; "
                                       "give each role its own tokens")
        if not set(self.users) <= self.client:
            raise InvalidArgumentError("a token is given a user but is no client token")
        for name in {*self.users.values(), *self.options}:
            check_user_name(name)
        # (digest, role, user) of every token: what a presented token is compared against.
        known = tuple((_digest(t), NODE, "") for t in sorted(self.node)) + tuple(
            (_digest(t), CLIENT, self.users.get(t, DEFAULT_USER)) for t in sorted(self.client))
        object.__setattr__(self, "_known", known)

    def __repr__(self) -> str:
        return (f"Tokens(node=<{len(self.node)} token(s)>, client=<{len(self.client)} token(s)>, "
                f"users={list(self.user_names())!r})")

    @property
    def enabled(self) -> bool:
        """True when calls must carry a token."""
        return bool(self.node)

    @classmethod
    def load(
        cls,
        *,
        node_files: Iterable[str | os.PathLike[str] | None] = (),
        client_files: Iterable[str | os.PathLike[str] | None] = (),
        node_tokens: Iterable[str | None] = (),
        client_tokens: Iterable[str | None] = (),
    ) -> Tokens:
        """Tokens from files (see :func:`read_token_entries`) and literal tokens (such as
        ``$QSCALE_CLIENT_TOKEN``, which belong to :data:`DEFAULT_USER`); None entries are
        skipped.

        Raises:
            FailedPreconditionError: a file cannot be read.
            InvalidArgumentError: a bad line; a client token listed for two users; a user's
                options that disagree between lines (see :func:`merge_user_options`).
        """
        node = {e.token for f in node_files if f for e in read_token_entries(f, NODE)}
        node |= {check_token(t, "node token") for t in node_tokens if t}
        entries = [e for f in client_files if f for e in read_token_entries(f, CLIENT)]
        where: dict[str, TokenEntry] = {}
        for entry in entries:
            first = where.setdefault(entry.token, entry)
            if first.user != entry.user:
                raise InvalidArgumentError(f"{entry.where}: this token is also on {first.where} for user "
                                           f"{first.user!r}; a token belongs to one user")
        literal = {check_token(t, "client token") for t in client_tokens if t}
        for token in literal:
            entry = where.get(token)
            if entry is not None and entry.user != DEFAULT_USER:
                raise InvalidArgumentError(f"the client token given by value ($QSCALE_CLIENT_TOKEN), which belongs "
                                           f"to user {DEFAULT_USER!r}, is also on {entry.where} for user "
                                           f"{entry.user!r}; give it once")
        client = set(where) | literal
        users = {token: entry.user for token, entry in where.items() if entry.user != DEFAULT_USER}
        return cls(frozenset(node), frozenset(client), users, merge_user_options(entries))

    def _match(self, token: str | None) -> tuple[str, str] | None:
        """(role, user) of ``token``, None if it is none of ours. Compares digests with
        :func:`hmac.compare_digest` against every known token, so the time taken does not
        depend on which token (or how much of one) matched."""
        if not token:
            return None
        candidate = _digest(token)
        found: tuple[str, str] | None = None
        known: tuple[tuple[bytes, str, str], ...] = self._known  # type: ignore[attr-defined]
        for digest, role, user in known:
            if hmac.compare_digest(candidate, digest) and found is None:
                found = (role, user)
        return found

    def role_of(self, token: str | None) -> str | None:
        """The role of ``token`` (:data:`NODE` or :data:`CLIENT`), None if it is none of ours.
        Constant time in the token (see :meth:`_match`)."""
        found = self._match(token)
        return found[0] if found else None

    def user_of(self, token: str | None) -> str | None:
        """The user a client token belongs to, None if it is no client token of ours (a node
        token included). Constant time, as :meth:`role_of`."""
        found = self._match(token)
        return found[1] if found and found[0] == CLIENT else None

    def user_names(self) -> tuple[str, ...]:
        """Every user that holds a client token (:data:`DEFAULT_USER` when a token names
        none), sorted."""
        known: tuple[tuple[bytes, str, str], ...] = self._known  # type: ignore[attr-defined]
        return tuple(sorted({user for _, role, user in known if role == CLIENT}))

    def options_of(self, user: str) -> UserOptions:
        """What the client token files say about ``user`` (defaults for a user they do not name)."""
        return self.options.get(user) or UserOptions()


# ---------------------------------------------------------------------------------------- TLS

def _read_pem(path: str, what: str) -> bytes:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise FailedPreconditionError(f"cannot read the TLS {what} {p}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise InvalidArgumentError(f"the TLS {what} {p} is not a PEM file")
    return data


@dataclass(frozen=True)
class TLSConfig:
    """PEM files for TLS.

    On the coordinator, ``cert`` and ``key`` are its certificate chain and private key, and
    ``ca``, when given, turns on mutual TLS: every caller must present a certificate signed by
    it. On a node or client, ``ca`` verifies the coordinator's certificate (the system's roots
    when None) and ``cert`` + ``key`` are the caller's own certificate for mutual TLS.
    """

    cert: str | None = None
    """Certificate chain (PEM)."""
    key: str | None = None
    """Private key of ``cert`` (PEM)."""
    ca: str | None = None
    """CA certificate(s) (PEM) that the other side's certificate must be signed by."""

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            value = getattr(self, name)
            if value is not None:
                value = os.fspath(value)
                object.__setattr__(self, name, value or None)
        if (self.cert is None) != (self.key is None):
            given, missing = ("certificate", "key") if self.cert else ("key", "certificate")
            raise InvalidArgumentError(f"a TLS {given} was given without its {missing}: "
                                       "pass --tls-cert and --tls-key together")

    @property
    def enabled(self) -> bool:
        """True when any file is set."""
        return any((self.cert, self.key, self.ca))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TLSConfig | None:
        """From ``QSCALE_TLS_CERT``, ``QSCALE_TLS_KEY`` and ``QSCALE_TLS_CA``; None if none is set."""
        env = os.environ if environ is None else environ
        values = {name: env.get(f"QSCALE_TLS_{name.upper()}", "").strip() or None for name in ("cert", "key", "ca")}
        return cls(**values) if any(values.values()) else None

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``server.add_secure_port``; mutual TLS when ``ca`` is set.

        Raises:
            InvalidArgumentError: no certificate and key, or a file that is not PEM.
            FailedPreconditionError: a file cannot be read.
        """
        if self.cert is None or self.key is None:
            raise InvalidArgumentError("TLS on the coordinator needs its certificate and key "
                                       "(--tls-cert and --tls-key); --tls-ca alone only sets the client CA")
        pair = (_read_pem(self.key, "key"), _read_pem(self.cert, "certificate"))
        ca = _read_pem(self.ca, "CA") if self.ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for ``grpc.secure_channel``: verify the server with ``ca`` (or the
        system's roots) and present ``cert`` + ``key`` when given.

        Raises:
            InvalidArgumentError: a file that is not PEM.
            FailedPreconditionError: a file cannot be read.
        """
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca, "CA") if self.ca else None,
            private_key=_read_pem(self.key, "key") if self.key else None,
            certificate_chain=_read_pem(self.cert, "certificate") if self.cert else None,
        )


# ----------------------------------------------------------------------------- server side

def required_role(method: str) -> str | None:
    """The role a full method name (``/package.Service/Method``) needs: :data:`NODE`,
    :data:`CLIENT`, ``"open"`` for the health service, or None for a method no role may call."""
    if method.startswith(_OPEN_PREFIXES):
        return _OPEN
    for prefix, role in _ROLE_PREFIXES:
        if method.startswith(prefix):
            return role
    return None


def _bearer(metadata: Sequence[Any] | None) -> str | None:
    for item in metadata or ():
        key, value = item[0], item[1]
        if key.lower() == AUTH_HEADER:
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace")
            scheme, _, token = str(value).strip().partition(" ")
            if scheme.lower() == _SCHEME:
                return token.strip() or None
            return None
    return None


def _refusal(handler: grpc.RpcMethodHandler, error: QScaleError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only aborts with ``error``. It reads no
    request message (requests are left as raw bytes: nothing an unauthenticated caller sends is
    parsed) and never reaches the servicer."""
    code, details, trailing = status_for(error)

    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details, trailing)

    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, None, serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, None, serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, None, serializer)
    return grpc.unary_unary_rpc_method_handler(abort, None, serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token of every call against :class:`Tokens` before its handler runs.

    The health service is open; NodeService needs a node token, JobService a client token,
    anything else is refused. A refused call gets ``UNAUTHENTICATED`` (no token, or one we do
    not know) or ``PERMISSION_DENIED`` (a valid token of the other role) and changes nothing.
    """

    def __init__(self, tokens: Tokens) -> None:
        if not tokens.enabled:
            raise InvalidArgumentError("AuthInterceptor needs node and client tokens")
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        needed = required_role(method)
        if needed == _OPEN:
            return await continuation(handler_call_details)
        role = self.tokens.role_of(_bearer(handler_call_details.invocation_metadata))
        error: QScaleError | None = None
        if role is None:
            error = UnauthenticatedError(
                f"{method}: missing or invalid credentials; send 'authorization: Bearer <token>' with a "
                f"{needed or 'valid'} token")
        elif needed is None:
            error = PermissionDeniedError(f"{method}: no role may call this method")
        elif role != needed:
            error = PermissionDeniedError(f"{method} needs a {needed} token; this is a {role} token")
        handler = await continuation(handler_call_details)
        if error is None or handler is None:
            return handler
        log.info("refused %s: %s", method, error.code.name)
        return _refusal(handler, error)


# ----------------------------------------------------------------------------- client side

class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                            "compression")),
    grpc.ClientCallDetails,
):
    pass


class BearerTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a (sync) channel, plain or TLS
    (``grpc.metadata_call_credentials`` would only work over TLS)."""

    def __init__(self, token: str) -> None:
        self._header = (AUTH_HEADER, f"Bearer {check_token(token)}")

    def __repr__(self) -> str:
        return "BearerTokenInterceptor(<token>)"

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0].lower() != AUTH_HEADER]
        metadata.append(self._header)
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def is_loopback_address(address: str) -> bool:
    """True for a ``host:port`` (or gRPC target) that only this machine can reach:
    127.0.0.0/8, ::1, ``localhost`` or a unix socket. An empty host or a wildcard is not."""
    target = address.strip()
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("ipv4:", "ipv6:", "dns:///", "dns:"):
        if target.startswith(scheme):
            target = target[len(scheme):]
            break
    if target.startswith("["):
        host = target[1:].split("]", 1)[0]
    elif target.count(":") == 1:
        host = target.rsplit(":", 1)[0]
    else:
        host = target  # a bare host, or a bare IPv6 address
    host = host.strip().lower().rstrip(".")
    if host in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def refuse_secret_options(parser: argparse.ArgumentParser, *flags: str, hint: str) -> None:
    """Make ``flags`` (e.g. ``--token``) errors that point to ``hint``, without echoing the
    value. They are hidden from ``--help``; they exist so that argparse does not take them as
    abbreviations of a ``--token-file`` style option and read a file named like the secret."""

    class _Refuse(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                     option_string: str | None = None) -> None:
            parser.error(f"{option_string} is not accepted: a secret on the command line shows in `ps` and in "
                         f"shell history; {hint}")

    for flag in flags:
        parser.add_argument(flag, action=_Refuse, nargs="?", help=argparse.SUPPRESS, dest=f"_refused_{flag}")


def make_channel(
    address: str,
    *,
    token: str | None = None,
    tls: TLSConfig | None = None,
    options: Sequence[tuple[str, Any]] = (),
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    reconnect_backoff_s: tuple[float, float] = CLIENT_RECONNECT_BACKOFF_S,
) -> grpc.Channel:
    """A sync gRPC channel to ``address``, the way clients and nodes all build theirs: TLS when
    ``tls`` is given (even an empty :class:`TLSConfig`, which verifies the server with the
    system's roots), plain otherwise; every call carries ``token`` when one is given.

    The channel follows qscale's one connection policy (:func:`qscale.rpc.channel_options`):
    a connection attempt that gets no answer within ``connect_timeout`` seconds fails, calls
    that are safe to repeat are retried by gRPC on ``UNAVAILABLE``, and the channel reconnects
    with gRPC's backoff, from the first to the longest delay of ``reconnect_backoff_s``.
    ``options`` (message sizes, keepalive) are added after the policy's.

    Raises:
        InvalidArgumentError, FailedPreconditionError: a bad token or unreadable TLS file.
    """
    opts = channel_options(connect_timeout, reconnect_backoff_s=reconnect_backoff_s) + list(options)
    if tls is not None:
        channel = grpc.secure_channel(address, tls.channel_credentials(), options=opts)
    else:
        channel = grpc.insecure_channel(address, options=opts)
    if token:
        interceptor = BearerTokenInterceptor(token)
        if tls is None and not is_loopback_address(address):
            log.warning("sending a token to %s without TLS: anyone on the path can read it", address)
        channel = grpc.intercept_channel(channel, interceptor)
    return channel
