"""Certificates for TLS and mutual TLS: a private CA, the coordinator's certificate, and
certificates for nodes and clients (``qscale-coordinator tls-init``).

:func:`write_tls_files` writes, into one directory::

    ca.pem          the CA certificate: every node and client verifies the coordinator with it
                    (--tls-ca), and a coordinator given it (--tls-ca) accepts only callers
                    presenting a certificate it signed (mutual TLS)
    ca-key.pem      the CA's private key (mode 600): keep it offline, it signs certificates
    server.pem      the coordinator's certificate, naming every host nodes and clients dial
    server-key.pem  its private key (mode 600)
    NAME.pem        one client certificate per client and per node (mutual TLS)
    NAME-key.pem    its private key (mode 600)

Keys are ECDSA P-256, certificates are signed with SHA-256. Existing files are never
overwritten unless asked (``force=True``, ``--force``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qscale.errors import FailedPreconditionError, InvalidArgumentError

__all__ = [
    "CA_FILE",
    "CA_KEY_FILE",
    "SERVER_FILE",
    "SERVER_KEY_FILE",
    "DEFAULT_DAYS",
    "DEFAULT_CLIENTS",
    "DEFAULT_NODES",
    "TLSFiles",
    "parse_host",
    "write_tls_files",
    "usage_text",
]

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
SERVER_FILE = "server.pem"
SERVER_KEY_FILE = "server-key.pem"
DEFAULT_DAYS = 365
"""Validity of every certificate written, in days, unless told otherwise."""
MAX_DAYS = 36500
DEFAULT_CLIENTS: tuple[str, ...] = ("client",)
DEFAULT_NODES: tuple[str, ...] = ("node",)
DEFAULT_PORT = 50051

_KEY_MODE = 0o600
_CERT_MODE = 0o644
_CLOCK_SKEW = datetime.timedelta(minutes=5)
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RESERVED = {"ca", "ca-key", "server", "server-key"}


@dataclass(frozen=True)
class TLSFiles:
    """The files :func:`write_tls_files` wrote (absolute paths)."""

    directory: Path
    ca: Path
    """CA certificate (``--tls-ca`` everywhere)."""
    ca_key: Path
    """CA private key; needed only to sign more certificates."""
    server_cert: Path
    """The coordinator's certificate (``serve --tls-cert``)."""
    server_key: Path
    """Its private key (``serve --tls-key``)."""
    hosts: tuple[str, ...]
    """The names and addresses the server certificate is valid for, as given."""
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    """Client name -> (certificate, key)."""
    nodes: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    """Node name -> (certificate, key)."""

    def paths(self) -> list[Path]:
        """Every file, in the order they were written."""
        out = [self.ca, self.ca_key, self.server_cert, self.server_key]
        for cert, key in (*self.clients.values(), *self.nodes.values()):
            out += [cert, key]
        return out


# -------------------------------------------------------------------------------- checks

def parse_host(text: str) -> x509.GeneralName:
    """A subject alternative name for ``text``: an IP address (IPv4, IPv6, or IPv6 in
    brackets) or a DNS name (``coordinator.example``, ``qscale-coordinator``, ``*.example``).

    Raises:
        InvalidArgumentError: neither (with the reason: a port, a bad label, non-ASCII ...).
    """
    host = text.strip() if isinstance(text, str) else ""
    if not host:
        raise InvalidArgumentError("--host: an empty host name")
    bracketed = host.startswith("[") and host.endswith("]")
    candidate = host[1:-1] if bracketed else host
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        address = None
    if address is not None:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise InvalidArgumentError(f"--host {text!r}: an IPv6 scope (%{address.scope_id}) cannot be in a "
                                       "certificate; give the address without it")
        return x509.IPAddress(address)
    if bracketed:
        raise InvalidArgumentError(f"--host {text!r}: brackets hold an IPv6 address, and this is none")
    if ":" in host or "/" in host:
        raise InvalidArgumentError(f"--host {text!r}: give a host name or an IP address alone, without a port, "
                                   "scheme or path (e.g. --host coordinator.example)")
    if not host.isascii():
        raise InvalidArgumentError(f"--host {text!r}: not ASCII; give an internationalised name in its "
                                   "xn-- (punycode) form")
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253:
        raise InvalidArgumentError(f"--host {text[:40]!r}...: a DNS name has at most 253 characters")
    labels = name.split(".")
    for index, label in enumerate(labels):
        if index == 0 and label == "*" and len(labels) > 1:
            continue
        if not _LABEL.match(label):
            raise InvalidArgumentError(
                f"--host {text!r}: {label!r} is not a DNS label (1 to 63 letters, digits and hyphens, not "
                "starting or ending with a hyphen; '*' only as the whole first label)")
    if labels[-1].isdigit():
        raise InvalidArgumentError(f"--host {text!r}: neither an IP address nor a DNS name (a name cannot end "
                                   "in a number)")
    return x509.DNSName(name)


def _check_names(clients: Sequence[str], nodes: Sequence[str]) -> None:
    seen: set[str] = set()
    for role, names in (("--client", clients), ("--node", nodes)):
        for name in names:
            if not isinstance(name, str) or not _NAME.match(name) or name.endswith(".pem"):
                raise InvalidArgumentError(
                    f"{role} {name!r}: a name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
                    "or digit (it names the files NAME.pem and NAME-key.pem)")
            if name.lower() in _RESERVED:
                raise InvalidArgumentError(f"{role} {name!r}: that name is taken by the CA or server files")
            if name.lower() in seen:
                raise InvalidArgumentError(f"{role} {name!r}: given twice (clients and nodes need distinct names)")
            seen.add(name.lower())


# ---------------------------------------------------------------------------- building

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qscale"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])


def _key_usage(*, sign_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=sign_certificates,
                         crl_sign=sign_certificates, encipher_only=False, decipher_only=False)


def _make_ca(days: int, now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(f"qscale CA {secrets.token_hex(4)}")  # distinct CAs have distinct names
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(sign_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str, *, server: bool,
           sans: Sequence[x509.GeneralName], days: int,
           now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(sign_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write ``data`` to ``path`` with exactly ``mode``. Without ``force`` the file must not
    exist (``O_EXCL``: not even as a symbolic link); with it, a new file replaces the old one
    in one rename, so a reader never sees half a key and a link is replaced, not followed."""
    target = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp" if force else path
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags, mode)
    except FileExistsError:
        raise FailedPreconditionError(f"{path} already exists; pass --force to replace it") from None
    except OSError as exc:
        raise FailedPreconditionError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # exactly ``mode``, whatever the umask
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if target != path:
            os.replace(target, path)
    except BaseException as exc:
        target.unlink(missing_ok=True)  # never leave half a file behind
        if isinstance(exc, OSError):
            raise FailedPreconditionError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


# ------------------------------------------------------------------------------- writing

def write_tls_files(
    directory: str | os.PathLike[str],
    hosts: Iterable[str],
    *,
    clients: Sequence[str] = DEFAULT_CLIENTS,
    nodes: Sequence[str] = DEFAULT_NODES,
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> TLSFiles:
    """Make a new CA and write it with a coordinator certificate and client certificates.

    Args:
        directory: where to write; created (mode 700) when missing.
        hosts: every DNS name and IP address nodes and clients use to reach the coordinator
            (``coordinator``, ``qscale-coordinator.qscale.svc``, ``10.0.0.5``, ``localhost``,
            ``127.0.0.1`` ...); the server certificate names exactly these, and nothing else.
            A caller that dials a name missing here fails the TLS handshake.
        clients: names of client certificates (``NAME.pem``, ``NAME-key.pem``); may be empty.
        nodes: names of node certificates, written the same way; a node presents one to a
            mutual-TLS coordinator. Clients and nodes need distinct names.
        days: validity of every certificate, from now (1 to 36500).
        force: replace files that already exist; otherwise nothing is written when any of
            the files is already there.

    Returns:
        The paths written (see :class:`TLSFiles`). Keys are mode 600, certificates 644.

    Raises:
        InvalidArgumentError: no host, a host that is neither a DNS name nor an IP address, a
            bad client or node name, or ``days`` out of range.
        FailedPreconditionError: a file exists (without ``force``), or the directory cannot be
            made or written.
    """
    if isinstance(hosts, str):  # one host, not its characters
        hosts = [hosts]
    host_list = list(dict.fromkeys(h.strip() for h in hosts if isinstance(h, str)))
    if not host_list:
        raise InvalidArgumentError("give at least one --host: the DNS name or IP address nodes and clients dial "
                                   "to reach the coordinator (repeat --host for each)")
    sans = list(dict.fromkeys(parse_host(h) for h in host_list))
    clients = [clients] if isinstance(clients, str) else list(clients)
    nodes = [nodes] if isinstance(nodes, str) else list(nodes)
    _check_names(clients, nodes)
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise InvalidArgumentError(f"--days must be a whole number from 1 to {MAX_DAYS}, not {days!r}")

    root = Path(directory).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise FailedPreconditionError(f"{root} exists and is not a directory")
    files = TLSFiles(
        directory=root, ca=root / CA_FILE, ca_key=root / CA_KEY_FILE, server_cert=root / SERVER_FILE,
        server_key=root / SERVER_KEY_FILE, hosts=tuple(host_list),
        clients={n: (root / f"{n}.pem", root / f"{n}-key.pem") for n in clients},
        nodes={n: (root / f"{n}.pem", root / f"{n}-key.pem") for n in nodes},
    )
    present = [p.name for p in files.paths() if p.exists() or p.is_symlink()]
    if present and not force:
        raise FailedPreconditionError(
            f"{root} already holds {', '.join(present)}; nothing was written. Pass --force to replace "
            "them (certificates signed by the old CA then stop working), or choose another directory")
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise FailedPreconditionError(f"cannot create {root}: {exc.strerror or exc}") from exc

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, ca_cert = _make_ca(days, now)
    first = sans[0]
    server_cn = str(first.value) if isinstance(first, x509.DNSName) else host_list[0]
    outputs: list[tuple[Path, bytes, int]] = [(files.ca, _cert_pem(ca_cert), _CERT_MODE),
                                              (files.ca_key, _key_pem(ca_key), _KEY_MODE)]
    key, cert = _issue(ca_key, ca_cert, server_cn, server=True, sans=sans, days=days, now=now)
    outputs += [(files.server_cert, _cert_pem(cert), _CERT_MODE), (files.server_key, _key_pem(key), _KEY_MODE)]
    for role, named in (("client", files.clients), ("node", files.nodes)):
        for name, (cert_path, key_path) in named.items():
            key, cert = _issue(ca_key, ca_cert, f"{role} {name}", server=False, sans=(), days=days, now=now)
            outputs += [(cert_path, _cert_pem(cert), _CERT_MODE), (key_path, _key_pem(key), _KEY_MODE)]
    for path, data, mode in outputs:
        _write(path, data, mode, force)
    return files


# --------------------------------------------------------------------------------- usage

def _dial_address(host: str, port: int = DEFAULT_PORT) -> str:
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        is_v6 = isinstance(ipaddress.ip_address(bare), ipaddress.IPv6Address)
    except ValueError:
        is_v6 = False
    if bare.startswith("*."):
        bare = "HOST" + bare[1:]
    return f"[{bare}]:{port}" if is_v6 else f"{bare}:{port}"


def _flags(ca: Path, cert: Path | None = None, key: Path | None = None) -> str:
    parts = ["--tls-ca", shlex.quote(str(ca))]
    if cert is not None and key is not None:
        parts += ["--tls-cert", shlex.quote(str(cert)), "--tls-key", shlex.quote(str(key))]
    return " ".join(parts)


def _env(ca: Path | None, cert: Path, key: Path) -> str:
    parts = [f"QSCALE_TLS_CA={shlex.quote(str(ca))}"] if ca is not None else []
    parts += [f"QSCALE_TLS_CERT={shlex.quote(str(cert))}", f"QSCALE_TLS_KEY={shlex.quote(str(key))}"]
    return " ".join(parts)


def usage_text(files: TLSFiles) -> str:
    """What ``tls-init`` prints: the files written, and the exact flags and variables that use
    them for ``serve``, ``qscale-node``, the client commands and ``qscale-healthcheck``."""
    address = _dial_address(files.hosts[0])
    width = max(len(p.name) for p in files.paths())
    lines = [f"wrote into {files.directory}:"]

    def row(path: Path, text: str) -> None:
        lines.append(f"  {path.name:<{width}}  {text}")

    row(files.ca, "CA certificate: nodes and clients verify the coordinator with it; the coordinator "
                  "accepts callers it signed")
    row(files.ca_key, "CA private key (mode 600): keep it offline; only needed to sign more certificates")
    row(files.server_cert, "coordinator certificate for " + ", ".join(files.hosts))
    row(files.server_key, "coordinator private key (mode 600)")
    for role, named in (("client", files.clients), ("node", files.nodes)):
        for name, (cert, key) in named.items():
            row(cert, f"{role} certificate {name!r}, for mutual TLS")
            row(key, f"{role} private key (mode 600)")

    lines += [
        "",
        "coordinator (--tls-ca: mutual TLS, every caller needs a certificate from this CA; leave it out for "
        "TLS only):",
        f"  qscale-coordinator serve --tls-cert {shlex.quote(str(files.server_cert))} "
        f"--tls-key {shlex.quote(str(files.server_key))} --tls-ca {shlex.quote(str(files.ca))} "
        "[--listen ... and the token files]",
        f"  or: {_env(files.ca, files.server_cert, files.server_key)}",
    ]
    for name, (cert, key) in files.nodes.items():
        lines += [
            f"node {name!r} (copy ca.pem, {cert.name} and {key.name} to its machine):",
            f"  qscale-node --coordinator {address} {_flags(files.ca, cert, key)}",
            f"  or: {_env(files.ca, cert, key)}",
        ]
    if not files.nodes:
        lines += ["nodes (copy ca.pem to their machines):",
                  f"  qscale-node --coordinator {address} {_flags(files.ca)}"]
    for name, (cert, key) in files.clients.items():
        lines += [
            f"client {name!r} (every client command: submit, watch, status, result, nodes, jobs ...):",
            f"  qscale-coordinator nodes --coordinator {address} {_flags(files.ca, cert, key)}",
            f"  or: export {_env(files.ca, cert, key)}",
            f"  Python: qscale.TLSConfig(ca={str(files.ca)!r}, cert={str(cert)!r}, key={str(key)!r})",
        ]
    probe = next(iter(files.clients.values()), None) or next(iter(files.nodes.values()), None)
    lines += ["health probe:",
              f"  qscale-healthcheck {address} {_flags(files.ca, *(probe or (None, None)))}"]
    if len(files.hosts) > 1 or files.hosts[0].startswith("*."):
        lines.append(f"  (the certificate also names {', '.join(files.hosts[1:]) or files.hosts[0]}: dial any of "
                     "them, or add --server-name NAME when probing another address)")
    lines += ["", "A caller must dial one of the names above. A coordinator on an address other than loopback also "
                  "needs tokens (--node-tokens-file, --client-tokens-file): TLS protects them on the wire."]
    return "\n".join(lines)
