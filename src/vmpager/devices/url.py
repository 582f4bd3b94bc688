"""Swap devices named by URL: the one place a ``scheme://`` swap spec is parsed.

Wherever swap is given (``VM(swap=[...])``, ``VM.swapon``, every ``--swap`` of
the command line), a string with ``://`` is a URL:

- ``redis://[user:password@]host[:port][/db]?size=4G`` -- one Redis server;
- ``rediss://...`` -- the same over TLS;
- ``redis+cluster://host[:port]?size=64G`` (and ``rediss+cluster://``) -- a
  Redis Cluster, reached through any of its nodes.

Query parameters: ``size`` (required; bytes or ``512M``/``4G``...),
``replicas`` (a write is acknowledged only once on that many replicas as
well; default: the VM's ``replicas`` argument, else 0), ``timeout`` (seconds
per network call, default 5), ``retry`` (seconds a request keeps
reconnecting before it fails, default 3 for a server, 15 for a cluster, which
covers a failover), ``prefix`` (key prefix; default a fresh random one),
``ca`` (a CA file for TLS). Anything else is refused.

Parsing never touches the network; ``devices/by_url.py``'s ``open_swap_url``
opens the device, which connects and checks the server(s) before returning.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from vmpager.units import check_int, parse_size

__all__ = ["SwapURL", "is_swap_url", "parse_swap_url", "redact_url"]

SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster")
PARAMETERS = ("size", "replicas", "timeout", "retry", "prefix", "ca")
DEFAULT_PORT = 6379
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_RETRY_S = 3.0
DEFAULT_CLUSTER_RETRY_S = 15.0
#: More replicas than any real deployment has; the bound catches typos.
MAX_REPLICAS = 16


@dataclass(frozen=True, slots=True)
class SwapURL:
    """A parsed swap URL. ``display`` is the URL without password or query (for names)."""

    scheme: str
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    size: int
    replicas: int | None
    timeout_s: float
    retry_s: float
    prefix: str | None
    ca: str | None

    @property
    def tls(self) -> bool:
        """True for ``rediss://`` and ``rediss+cluster://``."""
        return self.scheme.startswith("rediss")

    @property
    def cluster(self) -> bool:
        """True for ``redis+cluster://`` and ``rediss+cluster://``."""
        return self.scheme.endswith("+cluster")

    @property
    def display(self) -> str:
        """``scheme://host:port[/db]``: safe to print (no credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        tail = "" if self.cluster else f"/{self.db}"
        return f"{self.scheme}://{host}:{self.port}{tail}"


def is_swap_url(spec: object) -> bool:
    """True when ``spec`` is a string naming a swap device by URL (it contains ``://``)."""
    return isinstance(spec, str) and "://" in spec


def redact_url(text: str) -> str:
    """``text`` with any URL password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        return text.split("@", 1)[-1] if "@" in text else text
    if parts.password is None:
        return text
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _number(value: str, what: str, url: str, *, low: float, high: float) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not low <= number <= high:  # also catches nan
        raise ValueError(
            f"swap URL {url}: {what} must be a number in [{low:g}, {high:g}], got {value!r}"
        )
    return number


def parse_swap_url(spec: str) -> SwapURL:
    """Parse a swap URL; ``ValueError`` naming the URL (password hidden) and what is wrong.

    Pure: no network access. See the module docstring for the syntax.
    """
    if not isinstance(spec, str):
        raise TypeError(f"a swap URL must be a string, got {type(spec).__name__}")
    shown = redact_url(spec)
    try:
        parts = urllib.parse.urlsplit(spec)
        port = parts.port
    except ValueError as error:
        raise ValueError(f"swap URL {shown}: {error}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(
            f"swap URL {shown}: unknown scheme {parts.scheme!r} (allowed: "
            f"{', '.join(s + '://' for s in SCHEMES)})"
        )
    if not parts.hostname:
        raise ValueError(f"swap URL {shown}: no host (expected e.g. {scheme}://host:6379?size=4G)")
    if parts.fragment:
        raise ValueError(f"swap URL {shown}: a fragment ('#...') is not allowed")
    path = parts.path.strip("/")
    db = 0
    if path:
        if scheme.endswith("+cluster"):
            raise ValueError(f"swap URL {shown}: a cluster has only database 0; drop '/{path}'")
        if not path.isdigit():
            raise ValueError(f"swap URL {shown}: the database must be a number, got {path!r}")
        db = int(path)
    try:
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    except ValueError as error:
        raise ValueError(f"swap URL {shown}: {error}") from None
    unknown = sorted(set(query) - set(PARAMETERS))
    if unknown:
        raise ValueError(
            f"swap URL {shown}: unknown parameter(s) {', '.join(unknown)} "
            f"(allowed: {', '.join(PARAMETERS)})"
        )
    repeated = sorted(key for key, values in query.items() if len(values) > 1)
    if repeated:
        raise ValueError(f"swap URL {shown}: parameter(s) given twice: {', '.join(repeated)}")
    params = {key: values[0] for key, values in query.items()}
    if "size" not in params:
        raise ValueError(f"swap URL {shown}: the size parameter is required, e.g. ?size=4G")
    size = parse_size(params["size"], f"swap URL {shown}: size", minimum=1)
    replicas = None
    if "replicas" in params:
        text = params["replicas"]
        if not text.isdigit():
            raise ValueError(
                f"swap URL {shown}: replicas must be an integer in [0, {MAX_REPLICAS}], "
                f"got {text!r}"
            )
        replicas = check_int(
            int(text), f"swap URL {shown}: replicas", minimum=0, maximum=MAX_REPLICAS
        )
    cluster = scheme.endswith("+cluster")
    timeout_s = DEFAULT_TIMEOUT_S
    if "timeout" in params:
        timeout_s = _number(params["timeout"], "timeout (seconds)", shown, low=0.001, high=3600)
    retry_s = DEFAULT_CLUSTER_RETRY_S if cluster else DEFAULT_RETRY_S
    if "retry" in params:
        retry_s = _number(params["retry"], "retry (seconds)", shown, low=0, high=3600)
    prefix = params.get("prefix")
    if prefix is not None and (not prefix or "{" in prefix or "}" in prefix):
        raise ValueError(
            f"swap URL {shown}: prefix must be non-empty and without braces, got {prefix!r}"
        )
    ca = params.get("ca")
    if ca is not None and not scheme.startswith("rediss"):
        raise ValueError(f"swap URL {shown}: ca is for TLS (rediss://) only")
    return SwapURL(
        scheme=scheme,
        host=parts.hostname,
        port=port if port is not None else DEFAULT_PORT,
        db=db,
        username=urllib.parse.unquote(parts.username) if parts.username else None,
        password=urllib.parse.unquote(parts.password) if parts.password is not None else None,
        size=size,
        replicas=replicas,
        timeout_s=timeout_s,
        retry_s=retry_s,
        prefix=prefix,
        ca=ca,
    )
