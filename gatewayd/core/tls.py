"""TLS on the LAN: the site CA, the gateway's certificate, and the listeners' contexts.

`gatewayd tls init` makes a site CA (once; it stays, so devices that pin it keep
trusting the gateway across renewals) and a server certificate for the gateway's names
and addresses, signed by it, under `<data_dir>/tls/`:

    ca.crt       the site CA: what devices pin (public)
    ca.key       its private key (0600; keep it on the box, back it up with the master key)
    server.crt   the gateway's certificate (server.key, 0600): links into `current`, the
                 pair served, which a renewal switches as one (tlspair.py)

`[tls]` says which listeners speak TLS (docs/configuration.md): the HTTP listeners
(hypercorn's TLS), and the MQTT edge's TLS listener (trio's SSLStream; mosquitto stays
private behind the edge, on its unix socket). The certificate's expiry is in /health
(`tls`, "expiring" within `tls.warn_days`) and /metrics, with the site CA's and the client
CA's (`tls.client_ca`, with client certificates).

Keys are ECDSA P-256 (every TLS stack of the last decade, ESP-IDF's mbedTLS included,
and small handshakes for microcontrollers).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from .health import ComponentState
from .logs import get_logger
from .schema import Address, ConfigError, ConfigErrors
from .tlspair import install_pair, key_matches, recover, served_pair

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = [
    "CertInfo",
    "SiteTls",
    "TlsError",
    "TlsSection",
    "certificate_info",
    "check_ca",
    "check_served",
    "client_name",
    "default_names",
    "dns_name",
    "init_site",
    "issue_client",
    "key_matches",
]

log = get_logger("gatewayd.tls")

CA_DAYS = 20 * 365
SERVER_DAYS = 825  # what browsers and most TLS stacks accept for a leaf
CLIENT_DAYS = 825


class TlsError(Exception):
    """A TLS file is missing or unusable; the message names the config key."""


@dataclass
class TlsSection:
    """`[tls]`: which listeners speak TLS, and with which certificate."""

    #: The HTTP listeners (`http.listen` and plugins' own) speak HTTPS only.
    http: bool = False
    #: The MQTT edge's TLS listener (conventionally port 8883); unset: none.
    mqtt_listen: Address | None = None
    #: Keep the plain MQTT listener on `mqtt.listen` too (false: MQTT over TLS only).
    mqtt_plain: bool = True
    #: The server certificate (PEM, chain allowed) and its key; "" = `<data_dir>/tls/server.crt|key`.
    cert: str = ""
    key: str = ""
    #: Client certificates (mutual TLS): "optional" asks for one and checks any that is
    #: sent, "required" refuses a connection without one.
    client_auth: Literal["none", "optional", "required"] = "none"
    #: CA that client certificates must chain to; "" = the site CA (`<data_dir>/tls/ca.crt`).
    client_ca: str = ""
    #: /health says "expiring" this many days before the certificate's end.
    warn_days: int = 30

    def validate(self) -> None:
        errors = []
        if not self.mqtt_plain and self.mqtt_listen is None:
            errors.append(ConfigError("mqtt_plain", "false needs tls.mqtt_listen (devices would have no MQTT "
                                                    "listener)"))
        if not 1 <= self.warn_days <= 365:
            errors.append(ConfigError("warn_days", f"must be 1 .. 365, got {self.warn_days}"))
        if self.client_auth != "none" and not (self.http or self.mqtt_listen):
            errors.append(ConfigError("client_auth", "client certificates need a TLS listener (tls.http or "
                                                     "tls.mqtt_listen)"))
        if errors:
            raise ConfigErrors(errors)

    @property
    def enabled(self) -> bool:
        return self.http or self.mqtt_listen is not None


# -- certificates --------------------------------------------------------------------


@dataclass(frozen=True)
class CertInfo:
    subject: str
    not_before: dt.datetime
    not_after: dt.datetime
    dns_names: list[str] = field(default_factory=list)
    ip_addresses: list[str] = field(default_factory=list)
    is_ca: bool = False

    def days_left(self, now: dt.datetime | None = None) -> float:
        now = now or dt.datetime.now(dt.timezone.utc)
        return (self.not_after - now).total_seconds() / 86400


def certificate_info(path: Path) -> CertInfo:
    """The first certificate of a PEM file. Raises TlsError."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as e:
        raise TlsError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise TlsError(f"{path} is not a PEM certificate: {e}") from None
    dns: list[str] = []
    ips: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
        ips = [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return CertInfo(cert.subject.rfc4514_string(), cert.not_valid_before_utc, cert.not_valid_after_utc,
                    dns, ips, is_ca)


def _earliest_expiry(path: Path, key: str) -> CertInfo:
    """Of a PEM bundle (a client CA file may hold several), the certificate that
    expires first: once it has, the certificates chained to it are refused."""
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as e:
        raise TlsError(f"{key}: cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise TlsError(f"{key}: {path} is not a PEM certificate: {e}") from None
    first = min(certs, key=lambda c: c.not_valid_after_utc)
    return CertInfo(first.subject.rfc4514_string(), first.not_valid_before_utc, first.not_valid_after_utc,
                    is_ca=True)


def default_names() -> tuple[list[str], list[str]]:
    """The names and addresses a device may use for this box: its host name (and
    `<name>.local`, mDNS), localhost, and every address its host name resolves to."""
    host = socket.gethostname()
    names = [host, f"{host.split('.')[0]}.local", "localhost"]
    ips = ["127.0.0.1", "::1"]
    try:
        for *_, sockaddr in socket.getaddrinfo(host, None):
            ips.append(str(sockaddr[0]).split("%")[0])
    except OSError:
        pass
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:  # the address the box's default route leaves from (a UDP "connect" sends nothing)
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                ips.append(str(s.getsockname()[0]).split("%")[0])
        except OSError:
            pass
    return list(dict.fromkeys(names)), list(dict.fromkeys(ips))


#: X.509's upper bound for a common name (RFC 5280, ub-common-name).
MAX_CN = 64


def dns_name(name: str) -> str:
    """A DNS name as it goes into a certificate: lower case, IDNA-encoded (A-labels,
    `bücher.site` -> `xn--bcher-kva.site`, as every TLS client compares it), without a
    trailing dot. Raises TlsError naming what is wrong (`bad name!`, a label over 63
    characters, a wildcard)."""
    import idna

    raw = name.strip().rstrip(".")
    if not raw:
        raise TlsError(f"not a DNS name: {name!r} (empty)")
    if "*" in raw:
        raise TlsError(f"not a DNS name: {name!r} (wildcards are not issued: name the box itself)")
    try:
        ascii_name = raw.lower() if raw.isascii() else idna.encode(raw, uts46=True).decode("ascii")
    except idna.IDNAError as e:
        raise TlsError(f"not a DNS name: {name!r} ({e})") from None
    if len(ascii_name) > 253:
        raise TlsError(f"not a DNS name: {name!r} (longer than 253 characters)")
    for label in ascii_name.split("."):
        if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", label):
            why = "over 63 characters" if len(label) > 63 else \
                "an empty label" if not label else "letters, digits and inner hyphens only"
            raise TlsError(f"not a DNS name: {name!r} (label {label!r}: {why})")
    return ascii_name


def ip_address(address: str) -> str:
    """An IP address as it goes into a certificate. Raises TlsError."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        raise TlsError(f"not an IP address: {address!r}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        raise TlsError(f"not an IP address for a certificate: {address!r} (no %zone: certificates name "
                       "addresses, not interfaces)")
    return str(ip)


def client_name(common_name: str) -> str:
    """A client certificate's common name (a device id). Raises TlsError."""
    name = common_name.strip()
    if not name:
        raise TlsError("the client certificate needs a name (the device id): got an empty one")
    if len(name) > MAX_CN:
        raise TlsError(f"the client name is {len(name)} characters long; a certificate's common name holds "
                       f"at most {MAX_CN}")
    if not name.isprintable():
        raise TlsError(f"the client name {common_name!r} holds control characters")
    return name


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """`path` replaced by `data` (`mode`) through a `.tmp` of our own: made anew (O_EXCL),
    never opened through a link left there (a shared --out folder)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # whatever the umask
        f.write(data)
    tmp.replace(path)


def _write_private(path: Path, data: bytes) -> None:
    _write_new(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write_new(path, data, 0o644)


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    pem: bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    return pem


def _load_ca(directory: Path) -> tuple[Any, Any]:
    """The site CA's certificate and key, checked: a CA certificate that may sign
    certificates, and the key that belongs to it. Raises TlsError."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    crt_path, key_path = directory / "ca.crt", directory / "ca.key"
    try:
        cert = x509.load_pem_x509_certificate(crt_path.read_bytes())
    except OSError as e:
        raise TlsError(f"cannot read the site CA {crt_path}: {e.strerror}") from None
    except ValueError as e:
        raise TlsError(f"{crt_path} is not a PEM certificate: {e}") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as e:
        raise TlsError(f"cannot read the site CA's key {key_path}: {e.strerror}") from None
    except (ValueError, TypeError) as e:  # TypeError: a key with a passphrase
        raise TlsError(f"{key_path} is not an unencrypted PEM private key: {e}") from None
    if problem := _ca_problem(cert, key):
        raise TlsError(f"{crt_path} cannot be kept as the site CA: {problem}. Restore the site CA's own ca.crt "
                       f"and ca.key (from the backup of {directory}), or move both away to make a new CA "
                       "(devices that pinned the old one must then get the new ca.crt)")
    return cert, key


def _same_key(cert: Any, key: Any) -> bool:
    from cryptography.hazmat.primitives import serialization

    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki))


def _ca_problem(cert: Any, key: Any) -> str | None:
    from cryptography import x509

    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "it is not a CA certificate (no basicConstraints)"
    if not constraints.ca:
        return "it is not a CA certificate (basicConstraints CA=false)"
    try:
        if not cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign:
            return "its keyUsage does not allow signing certificates (keyCertSign)"
    except x509.ExtensionNotFound:
        pass  # no keyUsage: every use is allowed (RFC 5280 4.2.1.3)
    if not _same_key(cert, key):
        return "ca.key is not the key of ca.crt"
    if cert.not_valid_after_utc <= dt.datetime.now(dt.timezone.utc):
        return f"it expired on {cert.not_valid_after_utc:%Y-%m-%d} (what it signs would be refused)"
    return None


def check_ca(directory: Path) -> None:
    """The site CA under `directory` is usable (see `_load_ca`). Raises TlsError."""
    _load_ca(directory)


def check_served(cert_path: Path, key_path: Path, ca_path: Path | None) -> None:
    """The certificate the listeners serve: readable, its key is `key_path`, and (when
    `ca_path` is given) signed by that CA. Raises TlsError naming the problem."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as e:
        raise TlsError(f"cannot read {e.filename}: {e.strerror}") from None
    except (ValueError, TypeError) as e:
        raise TlsError(f"{cert_path} / {key_path}: not a PEM certificate and unencrypted key: {e}") from None
    if not _same_key(cert, key):
        raise TlsError(f"{key_path} is not the key of {cert_path} (tls.key / tls.cert): run `gatewayd tls init`")
    if ca_path is None:
        return
    try:
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    except (OSError, ValueError) as e:
        raise TlsError(f"cannot read the site CA {ca_path}: {e}") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise TlsError(f"{cert_path} is not signed by the site CA {ca_path}: devices that pin it would refuse "
                       "the gateway; run `gatewayd tls init`") from None


def _new_ca(directory: Path, site: str, now: dt.datetime) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gatewayd"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"gatewayd site CA {site}")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(directory / "ca.key", _key_pem(key))
    _write_public(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _issue(ca_cert: Any, ca_key: Any, common_name: str, *, days: int, now: dt.datetime, server: bool,
           dns_names: Sequence[str] = (), ip_addresses: Sequence[str] = ()) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                              else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


@dataclass(frozen=True)
class InitResult:
    directory: Path
    ca_created: bool
    server: CertInfo


def init_site(directory: Path, site: str, dns_names: list[str], ip_addresses: list[str], *,
              days: int = SERVER_DAYS, now: dt.datetime | None = None) -> InitResult:
    """Make the site CA if there is none (an existing one is kept: devices pinned it),
    then a new server certificate and key for `dns_names` and `ip_addresses`.
    Raises TlsError (a bad address, an unreadable CA)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    # Every name and address is checked before anything is written.
    dns_names = list(dict.fromkeys(dns_name(n) for n in dns_names))
    ip_addresses = list(dict.fromkeys(ip_address(a) for a in ip_addresses))
    if not dns_names and not ip_addresses:
        raise TlsError("the certificate needs at least one name or address")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    created = not (directory / "ca.crt").exists()
    if created:
        for name in ("ca.crt", "ca.key"):  # links to a disk not mounted: the CA is not there *now*
            if (directory / name).is_symlink() and not (directory / name).exists():
                raise TlsError(f"{directory / name} is a link to {os.readlink(directory / name)}, which is not "
                               "there (a disk not mounted?): mount it, or remove the link to make a new CA "
                               "(devices that pinned the old one must then get the new ca.crt)")
        if (directory / "ca.key").exists():
            raise TlsError(f"{directory / 'ca.key'} exists without ca.crt: restore ca.crt or remove both")
        ca_cert, ca_key = _new_ca(directory, site, now)
    else:
        ca_cert, ca_key = _load_ca(directory)
    # The common name is informative only (clients match the subjectAltNames); a name
    # longer than X.509's 64 characters is not one.
    common = next((n for n in [*dns_names, *ip_addresses] if len(n) <= MAX_CN), f"gatewayd {site}"[:MAX_CN])
    cert, key = _issue(ca_cert, ca_key, common, days=days, now=now,
                       server=True, dns_names=dns_names, ip_addresses=ip_addresses)
    install_pair(directory, cert, key)  # both files switched as one: never a key without its certificate
    return InitResult(directory, created, certificate_info(directory / "server.crt"))


def issue_client(directory: Path, common_name: str, out: Path, *, days: int = CLIENT_DAYS,
                 now: dt.datetime | None = None) -> tuple[Path, Path]:
    """A client certificate signed by the site CA (mutual TLS): `<out>/<cn>.crt|key`."""
    now = now or dt.datetime.now(dt.timezone.utc)
    common_name = client_name(common_name)
    if not (directory / "ca.crt").exists():
        raise TlsError(f"no site CA in {directory}: run `gatewayd tls init` first")
    ca_cert, ca_key = _load_ca(directory)
    cert, key = _issue(ca_cert, ca_key, common_name, days=days, now=now, server=False)
    out.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in common_name)
    crt_path, key_path = out / f"{safe}.crt", out / f"{safe}.key"
    # Never over an existing file: `--out <data_dir>/tls` with the name `ca` or `server`
    # would replace the site CA's or the server's key.
    if existing := [str(p) for p in (crt_path, key_path) if p.exists()]:
        raise TlsError(f"{' and '.join(existing)} exist already: choose another --out or name")
    _write_private(key_path, key)
    _write_public(crt_path, cert)
    return crt_path, key_path


# -- the running gateway's side ------------------------------------------------------


class SiteTls:
    """The TLS files one gateway serves with: their paths, the server SSLContext for
    the MQTT edge, hypercorn's settings, and the certificate's expiry for /health."""

    def __init__(self, section: TlsSection, data_dir: Path, config_dir: Path | None) -> None:
        self.section = section
        base = config_dir or Path.cwd()
        tls_dir = data_dir / "tls"

        def path(value: str, default: Path) -> Path:
            return default if not value else (Path(value) if Path(value).is_absolute() else base / value)

        self.tls_dir = tls_dir
        #: Where the certificate and key are, as configured and named in messages.
        self.cert = path(section.cert, tls_dir / "server.crt")
        self.key = path(section.key, tls_dir / "server.key")
        #: What the listeners load: `tls init`'s files are read from the pair `current`
        #: names, resolved once by `load()`, so the two are one pair even mid-renewal.
        self.files = (self.cert, self.key)
        self.client_ca = path(section.client_ca, tls_dir / "ca.crt")
        self.info: CertInfo | None = None
        #: The site CA devices pin (when `tls init` made it) and the CA client
        #: certificates chain to (with `tls.client_auth`): their expiry is in /health too.
        self.ca_info: CertInfo | None = None
        self.client_ca_info: CertInfo | None = None

    @classmethod
    def from_config(cls, config: Any) -> SiteTls:
        """From a loaded `Config` (config imports this module, not the other way round)."""
        return cls(config.tls, config.data_dir, config.source.parent if config.source else None)

    @property
    def enabled(self) -> bool:
        return self.section.enabled

    @property
    def _own_files(self) -> bool:
        return not self.section.cert and not self.section.key

    def recover(self) -> list[str]:
        """At start: finish or undo a renewal a crash interrupted (logged; tlspair.py)."""
        if not (self.enabled and self._own_files):
            return []
        try:
            return recover(self.tls_dir)
        except OSError as e:  # (a tls/ this user cannot write: load() names what is wrong, if anything)
            log.error("tls: cannot look for an interrupted renewal", tls_dir=str(self.tls_dir), error=str(e))
            return []

    def load(self) -> None:
        """Check the files now (at start), so a missing one is named before anything listens."""
        if not self.enabled:
            return
        hint = " (make them with `gatewayd tls init`)" if not self.section.cert else ""
        if self._own_files:
            try:
                self.files = served_pair(self.tls_dir) or (self.cert, self.key)
            except OSError as e:
                raise TlsError(f"tls.cert: {e.strerror}{hint}") from None
        for key, p in (("tls.cert", self.files[0]), ("tls.key", self.files[1])):
            if not p.is_file():
                raise TlsError(f"{key}: no file at {p}{hint}")
        if self.section.client_auth != "none" and not self.client_ca.is_file():
            raise TlsError(f"tls.client_ca: no file at {self.client_ca}")
        self.info = certificate_info(self.files[0])
        site_ca = self.tls_dir / "ca.crt"
        self.ca_info = certificate_info(site_ca) if self._own_files and site_ca.is_file() else None
        if self.section.client_auth != "none":
            self.client_ca_info = _earliest_expiry(self.client_ca, "tls.client_ca")
        self.server_context()  # the key matches the certificate, the CA loads

    def server_context(self) -> ssl.SSLContext:
        """For the MQTT edge: TLS 1.2+, the site certificate, client certificates as configured."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(*self.files)
        except (OSError, ssl.SSLError) as e:
            raise TlsError(f"tls.cert/tls.key: cannot use {self.cert} with {self.key}: {e}") from None
        if self.section.client_auth != "none":
            try:
                ctx.load_verify_locations(cafile=str(self.client_ca))
            except (OSError, ssl.SSLError) as e:
                raise TlsError(f"tls.client_ca: cannot load {self.client_ca}: {e}") from None
            ctx.verify_mode = ssl.CERT_REQUIRED if self.section.client_auth == "required" else ssl.CERT_OPTIONAL
        return ctx

    def hypercorn(self, config: Any) -> None:
        """Set a hypercorn Config up for HTTPS (when `tls.http`)."""
        if not self.section.http:
            return
        config.certfile = str(self.files[0])
        config.keyfile = str(self.files[1])
        if self.section.client_auth != "none":
            config.ca_certs = str(self.client_ca)
            config.verify_mode = ssl.CERT_REQUIRED if self.section.client_auth == "required" else ssl.CERT_OPTIONAL

    # -- /health and /metrics ----------------------------------------------------------

    def _watched(self) -> list[tuple[str, CertInfo, str, str]]:
        """(label, info, what it is, what to do) of each certificate whose end matters."""
        out = []
        if self.info is not None:
            out.append(("server", self.info, "the certificate", "renew it (gatewayd tls init, then restart)"))
        if self.ca_info is not None:
            out.append(("site_ca", self.ca_info, "the site CA (ca.crt, pinned by devices)",
                        "make a new one (move ca.crt and ca.key away, gatewayd tls init) and give devices the "
                        "new ca.crt"))
        if self.client_ca_info is not None:
            out.append(("client_ca", self.client_ca_info, f"the client CA (tls.client_ca, {self.client_ca})",
                        "devices' client certificates chained to it are refused after; replace it and reissue "
                        "them (gatewayd tls client)"))
        return out

    def state(self, now: dt.datetime | None = None) -> ComponentState:
        if not self.enabled:
            return ComponentState("off")
        if self.info is None:
            return ComponentState("starting")
        left = self.info.days_left(now)
        details: dict[str, Any] = {"expires_at": _iso(self.info.not_after), "days_left": round(left, 1),
                                   "cert": str(self.cert)}
        for label, info, _, _ in self._watched()[1:]:
            details[label] = {"expires_at": _iso(info.not_after), "days_left": round(info.days_left(now), 1)}
        # Expired: devices that check it refuse the listener, the gateway cannot do its
        # job (503). Expiring: a warning (200), renewal has `warn_days` to happen. The
        # first certificate to end decides (the CAs with the same window as the server's).
        label, info, what, todo = min(self._watched(), key=lambda w: w[1].not_after)
        left = info.days_left(now)
        if left <= 0:
            refused = "devices refuse it" if label != "client_ca" else "devices' client certificates are refused"
            return ComponentState("expired", f"{what} expired: {refused}; {todo}", details)
        if left <= self.section.warn_days:
            return ComponentState("expiring", f"{what} expires in {left:.0f} days: {todo}", details, critical=False)
        return ComponentState("ok", None, details)

    def register(self, health: Any, metrics: Metrics, clock: Any) -> None:
        from .metrics import Sample

        if not self.enabled:
            return
        health.probe("tls", lambda: self.state(dt.datetime.fromtimestamp(clock(), dt.timezone.utc)))
        metrics.collector(
            "gatewayd_tls_certificate_expiry_timestamp_seconds", "gauge",
            "When a certificate expires (Unix time): the one the listeners serve (server), the site CA, the "
            "client CA",
            lambda: [Sample("gatewayd_tls_certificate_expiry_timestamp_seconds", {"cert": label},
                            info.not_after.timestamp()) for label, info, _, _ in self._watched()])
        metrics.collector(
            "gatewayd_tls_certificate_expires_in_seconds", "gauge",
            "Seconds until a certificate expires (negative: expired): server, site_ca, client_ca",
            lambda: [Sample("gatewayd_tls_certificate_expires_in_seconds", {"cert": label},
                            info.not_after.timestamp() - clock()) for label, info, _, _ in self._watched()])


def _iso(when: dt.datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")
