"""ldap: search an LDAP directory as Postfix's dict_ldap does (ldap_table(5)).

``ldap:/file.cf`` is read with every parameter ldap_table(5) lists, and a
lookup is Postfix's: the domain list, the search base and filter expanded
from the key (RFC 4514/4515 quoting), one search, then the values of the
result attributes of every entry found, each through result_format and joined
with commas; DN and URL values of special result attributes are searched in
turn, terminal attributes replace all others of their entry, leaf attributes
are skipped in entries that lead on. Limits (size, expansion, recursion),
timeouts, a vanished search base and any search error are RETRY, never "not
found"; a connection the server dropped is replaced and the search tried once
more, as Postfix does. server_host may list several servers: the LDAP library
tries them in turn.

The driver is python-ldap, which wraps the same libldap Postfix uses, so every
option (protocol version, dereferencing, referrals, TLS, SASL) means what it
means to Postfix. Its calls block, so each table has its own pool of at most
``max_connections`` connections, each used by one worker thread at a time: a
hung server ties up only its own table's threads, and its lookups RETRY after
the table's timeout. Idle connections are recycled; after a failed connect,
lookups fail fast for at most half a second before the next attempt.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import ldap  # python-ldap
import ldap.sasl

from ..wire.proxymap import FIXED
from .backoff import Backoff
from .base import Maybe, OpenContext, Table, TableConfigError, TableRetry
from .netclient import MAX_IDLE, MAX_TTL
from .source import CHARS_COMMA_SP, as_bytes, printable, refuse_writes, utf8_enabled, valid_utf8
from .sql.config import CfgFile
from .sql.query import DomainList
from .utf8layer import checked_value, key_rejected

_BIND = {"no": "none", "none": "none", "yes": "simple", "simple": "simple", "sasl": "sasl"}
_SCOPES = {"one": ldap.SCOPE_ONELEVEL, "base": ldap.SCOPE_BASE, "sub": ldap.SCOPE_SUBTREE}
#: ldap_url_parse()'s scope names.
_URL_SCOPES = {
    "one": ldap.SCOPE_ONELEVEL,
    "onelevel": ldap.SCOPE_ONELEVEL,
    "base": ldap.SCOPE_BASE,
    "sub": ldap.SCOPE_SUBTREE,
    "subtree": ldap.SCOPE_SUBTREE,
    "subord": ldap.SCOPE_SUBORDINATE,
    "subordinate": ldap.SCOPE_SUBORDINATE,
    "children": ldap.SCOPE_SUBORDINATE,
}
_URL_SCHEMES = ("ldap://", "pldap://", "ldaps://", "pldaps://", "ldapi://")
# libldap result codes the lookup tells apart.
_SUCCESS = 0
_NO_SUCH_OBJECT = 32
_DECODING_ERROR = -4
_TIMEOUT = -5
_SERVER_DOWN = -1
_CONNECT_ERROR = -11
_OTHER = 80
#: Failures after which lookups fail fast for a moment instead of trying again at once.
_BACK_OFF = (_SERVER_DOWN, _CONNECT_ERROR, _TIMEOUT)
_SEPARATORS = re.compile(f"[{re.escape(CHARS_COMMA_SP)}]")


#: Quotes one substituted value for the query language.
Quote = Callable[[bytes], bytes]

# db_common(3) template flags.
_KEY_DOMAIN = 1 << 0
_KEY_USER = 1 << 1
_VALUE_DOMAIN = 1 << 2
_VALUE_USER = 1 << 3


class _Templates:
    """db_common(3) for ldap: search base, filter and result format, parsed together.

    (The SQL drivers' sql.query.Templates has one query and whole-row results;
    ldap needs a second query template with its own quoting, to know which
    templates depend on the key, and to expand results one value at a time.)
    What one template needs (say ``%d`` in the filter) constrains the keys
    every template accepts.
    """

    def __init__(self, spec: str, log_warning: Callable[..., None]) -> None:
        self._spec = spec
        self._warn = log_warning
        self._flags = 0
        self._nparts = 0

    def parse(self, template: bytes, query: bool) -> bool:
        """Check a template and note what it needs; True when it depends on the key."""
        dynamic = False
        i = 0
        while i < len(template):
            if template[i] != 0x25:  # "%"
                i += 1
                continue
            spec = template[i + 1 : i + 2]
            i += 2
            if spec == b"%":
                continue
            dynamic = True
            if spec == b"u":
                self._flags |= _KEY_USER if query else _VALUE_USER
            elif spec == b"d":
                self._flags |= _KEY_DOMAIN if query else _VALUE_DOMAIN
            elif spec == b"U":
                self._flags |= _KEY_USER
            elif spec == b"D" or b"1" <= spec <= b"9":
                if spec != b"D":
                    self._nparts = max(self._nparts, int(spec))
                self._flags |= _KEY_DOMAIN
            elif spec not in (b"s", b"S"):
                kind = "query" if query else "result"
                raise TableConfigError(
                    f"db_common_parse: {self._spec}: Invalid {kind} template: {printable(template)}"
                )
        return dynamic

    def expand(
        self,
        template: bytes,
        value: bytes,
        key: bytes | None,
        result: bytearray,
        quote: Quote | None = None,
    ) -> bool:
        """Append the expansion to ``result`` (after a comma when it is not empty).

        ``key`` is None for a query template, where ``value`` is the lookup key;
        for a result template ``value`` is the result and ``key`` the lookup key.
        False, appending nothing, when the input lacks what the template needs.
        """
        value = value.split(b"\0", 1)[0]  # C strings
        if not value:
            if key is not None:
                self._warn(
                    'table "%s": empty lookup result for: "%s" -- ignored',
                    self._spec,
                    printable(key),
                )
            else:
                self._warn('table "%s": empty query string -- ignored', self._spec)
            return False
        vdomain = kdomain = None
        if key is not None:
            if self._flags & (_VALUE_DOMAIN | _VALUE_USER):
                vdomain = _domain_of(value)
            if (not vdomain and self._flags & _VALUE_DOMAIN) or (
                vdomain is not None and len(value) == len(vdomain) + 1 and self._flags & _VALUE_USER
            ):
                return False
            if self._flags & (_KEY_DOMAIN | _KEY_USER):
                kdomain = _domain_of(key)
            if (not kdomain and self._flags & _KEY_DOMAIN) or (
                kdomain is not None and len(key) == len(kdomain) + 1 and self._flags & _KEY_USER
            ):
                self._warn(
                    "db_common_expand: %s: lookup key '%s' skipped after query",
                    self._spec,
                    printable(value),
                )
                return False
        else:
            if self._flags & (_KEY_DOMAIN | _KEY_USER):
                vdomain = _domain_of(value)
            if (not vdomain and self._flags & _KEY_DOMAIN) or (
                vdomain is not None and len(value) == len(vdomain) + 1 and self._flags & _KEY_USER
            ):
                return False
        parts: list[bytes] = []
        if self._nparts:
            # argv_split(): empty labels ("a..b", a leading or trailing dot) do not count
            domain = (kdomain if key is not None else vdomain) or b""
            parts = [label for label in domain.split(b".") if label]
            if len(parts) < self._nparts:
                return False
        if result:
            result += b","

        def put(text: bytes) -> None:
            result.extend(quote(text) if quote else text)

        def user(address: bytes, domain: bytes | None) -> bytes:
            return address[: len(address) - len(domain) - 1] if domain is not None else address

        i = 0
        while i < len(template):
            ch = template[i : i + 1]
            i += 1
            if ch != b"%":
                result += ch
                continue
            spec = template[i : i + 1]
            i += 1
            if spec == b"%":
                result += b"%"
            elif spec == b"s":
                put(value)
            elif spec == b"u":
                put(user(value, vdomain))
            elif spec == b"d":
                put(vdomain or b"")
            elif spec == b"S":
                put(key if key is not None else value)
            elif spec == b"U":
                put(user(key, kdomain) if key is not None else user(value, vdomain))
            elif spec == b"D":
                put((kdomain if key is not None else vdomain) or b"")
            else:  # a digit: parse() allowed nothing else
                put(parts[len(parts) - int(spec)])
        return True


def _domain_of(address: bytes) -> bytes | None:
    """What follows the last '@' (Postfix's strrchr()), or None without one."""
    at = address.rfind(b"@")
    return None if at < 0 else address[at + 1 :]


def rfc2253_quote(value: bytes) -> bytes:
    """Quote a key for the search base, as dict_ldap does: ``\\XX`` for DN specials."""
    return _hex_quote(value, b' \t"#+,;<>\\')


def rfc2254_quote(value: bytes) -> bytes:
    """Quote a key for the filter (RFC 4515): ``\\XX`` for ``*()\\``."""
    return _hex_quote(value, b"*()\\")


def _hex_quote(value: bytes, special: bytes) -> bytes:
    return b"".join(b"\\%02X" % ch if ch in special else bytes((ch,)) for ch in value)


def _subtype(a1: str, a2: str) -> int:
    """Postfix's attrdesc_subtype(): 1 when a2 is a1 or a1;options, -1 when a1 is a2;options."""
    l1, l2 = a1.lower(), a2.lower()
    i = 0
    while i < len(l1) and i < len(l2) and l1[i] == l2[i]:
        i += 1
    if i == len(l1) and (i == len(l2) or l2[i] == ";"):
        return 1
    if i == len(l2) and i < len(l1) and l1[i] == ";":
        return -1
    return 0


def _url_body(text: str) -> str | None:
    """The URL without a leading "<" or "URL:" when ldap_is_ldap_url() accepts it, else None."""
    body = text[1:] if text.startswith("<") else text
    if body[:4].lower() == "url:":
        body = body[4:]
    for scheme in _URL_SCHEMES:
        if body[: len(scheme)].lower() == scheme:
            return body
    return None


def _unhex(text: str) -> str:
    """ldap_pvt_hex_unescape(): %XX escapes; a bad escape empties the text, as in libldap."""
    raw = text.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x25:  # "%"
            pair = raw[i + 1 : i + 3]
            if len(pair) < 2 or not all(chr(c) in "0123456789abcdefABCDEF" for c in pair):
                return ""
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "replace")


@dataclass
class LdapUrl:
    """What ldap_url_parse() makes of a URL; the host part is not used."""

    scheme: str
    dn: str = ""
    attrs: list[str] | None = None
    scope: int = ldap.SCOPE_BASE
    filter: str | None = None


def parse_url(text: str) -> LdapUrl:
    """ldap_url_parse() with its historic defaults (base scope); ValueError when malformed."""
    body = _url_body(text)
    if body is None:
        raise ValueError("bad URL scheme")
    scheme, _, rest = body.partition("://")
    url = LdapUrl(scheme.lower())
    if text.startswith("<"):
        if not rest.endswith(">"):
            raise ValueError("bad URL enclosure")
        rest = rest[:-1]
    hostport, slash, rest = rest.partition("/")
    if url.scheme != "ldapi":
        host = hostport
        if host.startswith("["):
            host, bracket, after = host[1:].partition("]")
            if not bracket or (after and not after.startswith(":")):
                raise ValueError("bad URL")
            port = after[1:] if after else None
        else:
            port = host.partition(":")[2] if ":" in host else None
        if port is not None:
            port = _unhex(port)
            if not (port.isascii() and port.isdigit()):
                raise ValueError("bad URL")
    if not slash:
        return url
    parts = rest.split("?")
    if len(parts) > 5:
        raise ValueError("bad URL")
    parts += [""] * (5 - len(parts))
    dn, attrs, scope, filt, exts = parts
    url.dn = _unhex(dn)
    if attrs:
        url.attrs = [a for a in _unhex(attrs).split(",") if a]
    if scope:
        value = _URL_SCOPES.get(_unhex(scope).lower())
        if value is None:
            raise ValueError("bad URL scope")
        url.scope = value
    if filt:
        url.filter = _unhex(filt)
        if not url.filter:
            raise ValueError("bad URL filter")
    if len(rest.split("?")) == 5 and not [e for e in exts.split(",") if e]:
        raise ValueError("bad URL extensions")
    return url


def _error(e: ldap.LDAPError) -> tuple[int, str]:
    """(libldap result code, its text and the library's detail) of a python-ldap error."""
    info: Any = e.args[0] if e.args else {}
    if not isinstance(info, dict):
        return _OTHER, str(e)
    desc = str(info.get("desc", e))
    if info.get("info"):
        desc = f"{desc} ({info['info']})"
    return int(info.get("result", _OTHER)), desc


@dataclass
class _Config:
    """The parameters of one ldap table, as dict_ldap_open() reads them."""

    urls: str
    scope: int
    search_base: bytes
    query: bytes
    result_format: bytes
    dynamic_base: bool
    attributes: list[str]
    num_terminal: int
    num_leaf: int
    num_attributes: int
    timeout: int
    version: int
    bind: str
    bind_dn: str
    bind_pw: str = field(repr=False)
    recursion_limit: int
    expansion_limit: int
    size_limit: int
    dereference: int
    chase_referrals: bool
    sasl: dict[str, str]
    start_tls: bool
    ldap_ssl: bool
    tls: dict[int, str | int]


@dataclass
class _Conn:
    """One LDAP session, used by one worker thread at a time."""

    ld: Any
    born: float = field(default_factory=time.monotonic)
    used: float = field(default_factory=time.monotonic)


@dataclass
class _Walk:
    """The state of one lookup across its recursive searches (Postfix keeps it in statics)."""

    key: bytes
    result: bytearray = field(default_factory=bytearray)
    recursion: int = 0
    expansion: int = 0
    error: bool = False
    last_rc: int = _SUCCESS  # of the last search, as libldap keeps it in the session
    last_error: str = ""


class LdapTable(Table):
    """Lookup only (Postfix's ldap client is read-only)."""

    impl_flags = FIXED

    def __init__(self, ctx: OpenContext) -> None:
        super().__init__(ctx)
        self._utf8 = utf8_enabled(ctx)
        self._spec = printable(ctx.spec, self._utf8)
        refuse_writes(ctx)
        self._cfg = cfg = CfgFile(ctx.name, ctx.log)
        self._templates = _Templates(ctx.spec, ctx.log.warning)
        self.config = self._configure(cfg)
        self._domains = DomainList(cfg.get_str("domain"), ctx, cfg.path)
        size = max(1, ctx.options.max_connections)
        self._executor = ThreadPoolExecutor(size, thread_name_prefix="ldap")
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._open = 0  # connections that exist, idle or in use
        self._backoff = Backoff()

    def _configure(self, cfg: CfgFile) -> _Config:
        """Read the file as dict_ldap_open() does, with its warnings and errors."""
        log, name = self.ctx.log, cfg.path
        server_host = cfg.get_str("server_host", "localhost", 1)
        server_port = cfg.get_int("server_port", 389)
        # Upstream's default is 2, which current servers refuse; Debian's Postfix
        # (the one operators' files were written for) defaults to 3, and so do we.
        version = cfg.get_int("version", 3, 2)
        if version not in (2, 3):
            log.warning("dict_ldap_open: %s Unknown version %d, using 2.", name, version)
            version = 2
        urls: list[str] = []
        ldap_ssl = False
        for host in _split(server_host):
            if _url_body(host) is None:
                urls.append(f"ldap://{host}" if ":" in host else f"ldap://{host}:{server_port}")
                continue
            try:
                scheme = parse_url(host).scheme
            except ValueError as e:
                log.error("dict_ldap_open: error parsing URL %s: %s; skipping", host, e)
                continue
            if scheme != "ldap" and version != 3:
                log.warning("dict_ldap_open: URL scheme %s requires protocol version 3", scheme)
                version = 3
            ldap_ssl = ldap_ssl or scheme == "ldaps"
            urls.append(host)
        scope_name = cfg.get_str("scope", "sub", 1)
        scope = _SCOPES.get(scope_name.lower())
        if scope is None:
            log.warning(
                "dict_ldap_open: %s: Unrecognized value %s specified for scope; using sub",
                name,
                scope_name,
            )
            scope = ldap.SCOPE_SUBTREE
        search_base = as_bytes(cfg.get_str("search_base", ""))
        timeout = cfg.get_int("timeout", 10)
        query = as_bytes(cfg.get_str("query_filter", "(mailacceptinggeneralid=%s)"))
        result_format = cfg.get_optional("result_format") or cfg.get_str("result_filter", "%s", 1)
        dynamic_base = self._templates.parse(search_base, True)
        if not self._templates.parse(query, True):
            log.warning(
                "dict_ldap_open: %s: Fixed query_filter %s is probably useless",
                name,
                printable(query),
            )
        self._templates.parse(as_bytes(result_format), False)
        # Order matters: terminal, leaf, ordinary, then special attributes.
        attributes = _split(cfg.get_str("terminal_result_attribute", ""))
        num_terminal = len(attributes)
        attributes += _split(cfg.get_str("leaf_result_attribute", ""))
        num_leaf = len(attributes) - num_terminal
        attributes += _split(cfg.get_str("result_attribute", "maildrop"))
        num_attributes = len(attributes)
        attributes += _split(cfg.get_str("special_result_attribute", ""))
        bind_option = cfg.get_str("bind", "yes", 1)
        bind = _BIND.get(bind_option.lower())
        if bind is None:
            raise TableConfigError(f"{name}: unsupported parameter value: bind = {bind_option}")
        bind_dn = cfg.get_str("bind_dn", "")
        bind_pw = cfg.get_str("bind_pw", "")
        if cfg.get_bool("cache", False):
            log.warning("dict_ldap_open: %s ignoring cache", name)
        for ignored in ("cache_expiry", "cache_size"):
            if cfg.get_int(ignored, -1) >= 0:
                log.warning("dict_ldap_open: %s ignoring %s", name, ignored)
        recursion_limit = cfg.get_int("recursion_limit", 1000, 1)
        expansion_limit = cfg.get_int("expansion_limit", 0)
        size_limit = cfg.get_int("size_limit", expansion_limit)
        dereference = cfg.get_int("dereference", 0)
        if not 0 <= dereference <= 3:
            log.warning(
                "dict_ldap_open: %s Unrecognized value %d specified for dereference; using 0",
                name,
                dereference,
            )
            dereference = 0
        chase_referrals = cfg.get_bool("chase_referrals", False)
        sasl: dict[str, str] = {}
        if bind == "sasl":
            sasl = {
                "mechs": cfg.get_str("sasl_mechs", ""),
                "realm": cfg.get_str("sasl_realm", ""),
                "authz": cfg.get_str("sasl_authz_id", ""),
                "minssf": str(cfg.get_int("sasl_minssf", 0, 0, 4096)),
            }
        start_tls = cfg.get_bool("start_tls", False)
        if start_tls and version < 3:
            log.warning("dict_ldap_open: %s start_tls requires protocol version 3", name)
            version = 3
        require = ldap.OPT_X_TLS_DEMAND if cfg.get_bool("tls_require_cert", False) else 0
        tls: dict[int, str | int] = {ldap.OPT_X_TLS_REQUIRE_CERT: require}
        for option, param in (
            (ldap.OPT_X_TLS_RANDOM_FILE, "tls_random_file"),
            (ldap.OPT_X_TLS_CACERTFILE, "tls_ca_cert_file"),
            (ldap.OPT_X_TLS_CACERTDIR, "tls_ca_cert_dir"),
            (ldap.OPT_X_TLS_CERTFILE, "tls_cert"),
            (ldap.OPT_X_TLS_KEYFILE, "tls_key"),
            (ldap.OPT_X_TLS_CIPHER_SUITE, "tls_cipher_suite"),
        ):
            if value := cfg.get_str(param, ""):
                tls[option] = value
        cfg.get_int("debuglevel", 0)  # checked as Postfix does; libldap debugging stays off
        return _Config(
            urls=" ".join(urls),
            scope=scope,
            search_base=search_base,
            query=query,
            result_format=as_bytes(result_format),
            dynamic_base=dynamic_base,
            attributes=attributes,
            num_terminal=num_terminal,
            num_leaf=num_leaf,
            num_attributes=num_attributes,
            timeout=timeout,
            version=version,
            bind=bind,
            bind_dn=bind_dn,
            bind_pw=bind_pw,
            recursion_limit=recursion_limit,
            expansion_limit=expansion_limit,
            size_limit=size_limit,
            dereference=dereference,
            chase_referrals=chase_referrals,
            sasl=sasl,
            start_tls=start_tls,
            ldap_ssl=ldap_ssl,
            tls=tls,
        )

    # -- lookups, on the event loop ----------------------------------------------------

    def lookup(self, key: bytes, flags: int) -> Maybe[bytes | None]:
        if key_rejected(self.ctx, key) or not valid_utf8(key):
            return None  # dict_ldap skips keys that are not UTF-8
        return self._lookup(key)

    async def _lookup(self, key: bytes) -> bytes | None:
        config = self.config
        try:
            async with asyncio.timeout(self.ctx.options.timeout):
                if not await self._domains.allows(key):
                    return None
                base, query = bytearray(), bytearray()
                if not self._templates.expand(config.search_base, key, None, base, rfc2253_quote):
                    return None
                if not self._templates.expand(config.query, key, None, query, rfc2254_quote):
                    return None
                blocked = self._backoff.blocked()
                if blocked is not None:
                    raise self._retry(blocked)
                loop = asyncio.get_running_loop()
                value = await loop.run_in_executor(
                    self._executor,
                    self._search,
                    key,
                    base.decode("utf-8", "surrogateescape"),
                    query.decode("utf-8", "surrogateescape"),
                    time.monotonic(),
                )
        except TimeoutError as e:
            raise self._retry(f"no answer within {self.ctx.options.timeout:g} s") from e
        return checked_value(self.ctx, key, value)

    def changed(self) -> bool:
        return self._cfg.changed()

    def _retry(self, cause: str) -> TableRetry:
        return TableRetry(f"table {self._spec}: lookup error: server {self.config.urls}: {cause}")

    # -- lookups, in a worker thread -------------------------------------------------

    def _search(self, key: bytes, base: str, query: str, queued: float) -> bytes | None:
        """dict_ldap_lookup() from the search on; raises TableRetry for every failure."""
        if time.monotonic() - queued > self.ctx.options.pool_wait:
            raise self._retry("no free connection within pool_wait")
        config = self.config
        conn: _Conn | None = self._take()
        try:
            rc, desc, entries = self._search_st(conn, base, config.scope, query, config.attributes)
            if rc == _SERVER_DOWN:  # the connection went stale: Postfix reconnects once
                self._drop(conn)
                conn = None
                conn = self._take(fresh=True)
                rc, desc, entries = self._search_st(
                    conn, base, config.scope, query, config.attributes
                )
            if rc == _SUCCESS:
                self._backoff.succeeded()
                walk = _Walk(key)
                self._get_values(conn, entries, walk)
                if walk.last_rc not in (_SUCCESS, _DECODING_ERROR):
                    self.ctx.log.warning(
                        "%s: Had some trouble with entries returned by search: %s",
                        self._spec,
                        walk.last_error,
                    )
                if walk.error:
                    raise self._retry("lookup failed, see earlier warnings")
                return bytes(walk.result) or None
            if rc == _NO_SUCH_OBJECT:
                if config.dynamic_base:
                    return None
                self.ctx.log.warning(
                    "%s: Search base '%s' not found: %d: %s", self._spec, base, rc, desc
                )
                raise self._retry(f"search base '{base}' not found")
            self.ctx.log.warning(
                "%s: server %s: Search error %d: %s", self._spec, config.urls, rc, desc
            )
            if rc in _BACK_OFF:
                self._backoff.failed(desc)
            self._drop(conn)
            conn = None
            raise self._retry(desc)
        finally:
            if conn is not None:
                self._give(conn)

    def _search_st(
        self, conn: _Conn, base: str, scope: int, query: str, attrs: list[str]
    ) -> tuple[int, str, list[tuple[Any, Any]]]:
        """Postfix's search_st(): one search with the timeout; (rc, error text, entries)."""
        config = self.config
        ld = conn.ld
        msgid = None
        try:
            msgid = ld.search_ext(
                base,
                scope,
                query,
                attrs or None,
                0,
                None,
                None,
                config.timeout,
                config.size_limit,
            )
            _, data, _, _ = ld.result3(msgid, 1, config.timeout)
            return _SUCCESS, "", [(dn, entry) for dn, entry in data if dn is not None]
        except ldap.TIMEOUT:
            if msgid is not None:
                ld.abandon_ext(msgid)
            return _TIMEOUT, "Timed out", []
        except ldap.LDAPError as e:
            rc, desc = _error(e)
            return rc, desc, []
        except UnicodeError as e:
            return _OTHER, f"cannot send non-UTF-8 text: {e}", []

    def _get_values(self, conn: _Conn, entries: list[tuple[Any, Any]], walk: _Walk) -> None:
        """dict_ldap_get_values(): the values of one search's entries, recursing into
        DN and URL values of special attributes."""
        config = self.config
        names = config.attributes
        walk.recursion += 1
        count = 0
        try:
            for _, entry in entries:
                if config.size_limit:
                    count += 1
                    if count > config.size_limit:
                        self.ctx.log.warning(
                            "%s: Query size limit (%d) exceeded", self._spec, config.size_limit
                        )
                        walk.error = True
                        return
                lowered = {attr.lower(): values for attr, values in entry.items()}
                is_terminal = any(
                    lowered.get(name.lower()) for name in names[: config.num_terminal]
                )
                is_leaf = True
                if not is_terminal and config.num_leaf:
                    is_leaf = not any(
                        lowered.get(name.lower()) for name in names[config.num_attributes :]
                    )
                for attr, values in entry.items():
                    if not values:
                        continue
                    self._attribute(conn, attr, values, is_terminal, is_leaf, walk)
                    if walk.error:
                        return
        finally:
            walk.recursion -= 1

    def _attribute(
        self,
        conn: _Conn,
        attr: str,
        values: list[bytes],
        is_terminal: bool,
        is_leaf: bool,
        walk: _Walk,
    ) -> None:
        """The values of one attribute of one entry: results, or DNs and URLs to follow."""
        config = self.config
        names = config.attributes
        i = next((n for n, name in enumerate(names) if _subtype(name, attr) > 0), len(names))
        if i < config.num_attributes or is_terminal:
            if (is_terminal and i >= config.num_terminal) or (
                not is_leaf and i < config.num_terminal + config.num_leaf
            ):
                return  # a non-terminal attribute of a terminal entry, or a leaf-only one
            for value in values:
                if (
                    self._templates.expand(config.result_format, value, walk.key, walk.result)
                    and config.expansion_limit > 0
                ):
                    walk.expansion += 1
                    if walk.expansion > config.expansion_limit:
                        self.ctx.log.warning(
                            "%s: Expansion limit exceeded for key: '%s'",
                            self._spec,
                            printable(walk.key, self._utf8),
                        )
                        walk.error = True
                        return
        elif i < len(names) and walk.recursion < config.recursion_limit:
            for value in values:
                self._follow(conn, value.split(b"\0", 1)[0].decode("utf-8", "replace"), walk)
                if walk.error:
                    return
        elif i < len(names):
            self.ctx.log.warning(
                "%s: Recursion limit exceeded for special attribute %s=%s",
                self._spec,
                attr,
                printable(values[0], self._utf8),
            )
            walk.error = True

    def _follow(self, conn: _Conn, value: str, walk: _Walk) -> None:
        """Search what a special attribute value names: a DN, or the entries of an LDAP URL."""
        config = self.config
        if _url_body(value) is not None:
            try:
                url = parse_url(value)
            except ValueError as e:
                self.ctx.log.warning("%s: malformed URL %s: %s", self._spec, value, e)
                walk.error = True
                return
            attrs = self._url_attrs(url)
            if not attrs:
                return  # no pertinent attributes
            rc, desc, entries = self._search_st(
                conn, url.dn, url.scope, url.filter or "(objectClass=*)", attrs
            )
        else:
            rc, desc, entries = self._search_st(
                conn, value, ldap.SCOPE_BASE, "objectclass=*", config.attributes
            )
        walk.last_rc, walk.last_error = rc, desc
        if rc == _SUCCESS:
            self._get_values(conn, entries, walk)
        elif rc == _NO_SUCH_OBJECT:
            self.ctx.log.warning("%s: DN %s not found, skipping", self._spec, value)
        else:
            self.ctx.log.warning("%s: search error %d: %s", self._spec, rc, desc)
            walk.error = True

    def _url_attrs(self, url: LdapUrl) -> list[str]:
        """Postfix's url_attrs(): the URL's attributes that are also result attributes,
        the more specific description of each pair; all of ours when it names none."""
        if not url.attrs:
            return self.config.attributes
        wanted = []
        for a1 in url.attrs:
            for a2 in self.config.attributes:
                relation = _subtype(a1, a2)
                if relation > 0:
                    wanted.append(a2)
                elif relation < 0:
                    wanted.append(a1)
        return wanted

    # -- the connection pool, in worker threads ---------------------------------------

    def _take(self, fresh: bool = False) -> _Conn:
        """An idle connection that is still young enough, or a new one."""
        now = time.monotonic()
        while not fresh:
            with self._lock:
                if not self._idle:
                    break
                conn = self._idle.pop()
            if now - conn.used < MAX_IDLE and now - conn.born < MAX_TTL:
                return conn
            self._drop(conn)
        with self._lock:
            self._open += 1
        try:
            return self._connect()
        except BaseException:
            with self._lock:
                self._open -= 1
            raise

    def _give(self, conn: _Conn) -> None:
        conn.used = time.monotonic()
        with self._lock:
            self._idle.append(conn)

    def _drop(self, conn: _Conn) -> None:
        with self._lock:
            self._open -= 1
        _unbind(conn.ld)

    @property
    def open_connections(self) -> int:
        return self._open

    def stats(self) -> dict[str, int]:
        with self._lock:
            idle = len(self._idle)
            return {"pool_in_use": self._open - idle, "pool_idle": idle}

    def _connect(self) -> _Conn:
        """dict_ldap_connect(): a session with this table's options, bound if it binds."""
        config = self.config
        try:
            ld = ldap.initialize(config.urls)
            ld.set_option(ldap.OPT_NETWORK_TIMEOUT, config.timeout)
            ld.set_option(ldap.OPT_TIMEOUT, config.timeout)
            ld.set_option(ldap.OPT_PROTOCOL_VERSION, config.version)
            ld.set_option(ldap.OPT_DEREF, config.dereference)
            ld.set_option(ldap.OPT_REFERRALS, 1 if config.chase_referrals else 0)
        except (ldap.LDAPError, ValueError) as e:
            self.ctx.log.warning(
                "%s: Unable to init LDAP server %s: %s", self._spec, config.urls, e
            )
            raise self._retry(f"unable to init: {e}") from e
        try:
            if config.start_tls or config.ldap_ssl:
                for option, value in config.tls.items():
                    ld.set_option(option, value)
                ld.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
            if config.start_tls:
                ld.start_tls_s()
            if config.bind == "simple":
                msgid = ld.simple_bind(config.bind_dn, config.bind_pw)
                ld.result3(msgid, 1, config.timeout)
            elif config.bind == "sasl":
                self._bind_sasl(ld)
        except ldap.LDAPError as e:
            _unbind(ld)
            rc, desc = _error(e)
            if rc in _BACK_OFF:
                self._backoff.failed(desc)
            dn = config.bind_dn or "empty or implicit"
            self.ctx.log.warning(
                "%s: Unable to connect or bind to server %s with dn %s: %d (%s)",
                self._spec,
                config.urls,
                dn,
                rc,
                desc,
            )
            raise self._retry(desc) from e
        return _Conn(ld)

    def _bind_sasl(self, ld: Any) -> None:
        config = self.config
        ld.set_option(ldap.OPT_X_SASL_SECPROPS, f"minssf={config.sasl['minssf']}")
        callbacks = {
            ldap.sasl.CB_AUTHNAME: config.bind_dn,
            ldap.sasl.CB_PASS: config.bind_pw,
            ldap.sasl.CB_GETREALM: config.sasl["realm"],
            ldap.sasl.CB_USER: config.sasl["authz"],
        }
        ld.sasl_interactive_bind_s("", ldap.sasl.sasl(callbacks, config.sasl["mechs"]))

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for conn in idle:
            _unbind(conn.ld)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._domains.close()


def _split(text: str) -> list[str]:
    """argv_split(text, CHARS_COMMA_SP): the non-empty words."""
    return [word for word in _SEPARATORS.split(text) if word]


def _unbind(ld: Any) -> None:
    with suppress(ldap.LDAPError):
        ld.unbind_ext()
