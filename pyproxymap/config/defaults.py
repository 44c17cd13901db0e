"""Postfix's built-in parameter defaults, unexpanded, as ``postconf -d`` prints them.

Only the parameters pyproxymap reads are here, plus every parameter that the
proxy_read_maps / proxy_write_maps defaults name, and the parameters those name
in turn. A ``proxy:`` table in any of them is approved even when the
administrator never lists it, so the allow-list is only right if these are.

For the proxy_*_maps lists and their members we follow the newest Postfix
(3.12, ``global/mail_params.h``); comments say what 3.7 lacked or spelled
differently. Compatibility-level-dependent defaults are written as mail_params.h
writes them, with ``<level`` expressions, which our expander evaluates.

myhostname, mydomain and mynetworks have no fixed default: Postfix computes them
at start-up from the host, and so do the functions in ``COMPUTED``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import ipaddress
import socket
import sys
from collections.abc import Callable, Mapping
from types import MappingProxyType

#: Looks up the fully expanded value of a parameter, or None when it is undefined.
Lookup = Callable[[str], str | None]
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Parameters that the 3.7 proxy_read_maps default names, in Postfix's order.
_READ_MAPS_37 = [
    "local_recipient_maps",
    "mydestination",
    "virtual_alias_maps",
    "virtual_alias_domains",
    "virtual_mailbox_maps",
    "virtual_mailbox_domains",
    "relay_recipient_maps",
    "relay_domains",
    "canonical_maps",
    "sender_canonical_maps",
    "recipient_canonical_maps",
    "relocated_maps",
    "transport_maps",
    "mynetworks",
    "smtpd_sender_login_maps",
    "sender_bcc_maps",
    "recipient_bcc_maps",
    "smtp_generic_maps",
    "lmtp_generic_maps",
    "alias_maps",
    "smtpd_client_restrictions",
    "smtpd_helo_restrictions",
    "smtpd_sender_restrictions",
    "smtpd_relay_restrictions",
    "smtpd_recipient_restrictions",
    "address_verify_sender_dependent_default_transport_maps",
    "address_verify_sender_dependent_relayhost_maps",
    "address_verify_transport_maps",
    "fallback_transport_maps",
    "lmtp_discard_lhlo_keyword_address_maps",
    "lmtp_pix_workaround_maps",
    "lmtp_sasl_password_maps",
    "lmtp_tls_policy_maps",
    "mailbox_command_maps",
    "mailbox_transport_maps",
    "postscreen_discard_ehlo_keyword_address_maps",
    "rbl_reply_maps",
    "sender_dependent_default_transport_maps",
    "sender_dependent_relayhost_maps",
    "smtp_discard_ehlo_keyword_address_maps",
    "smtp_pix_workaround_maps",
    "smtp_sasl_password_maps",
    "smtp_tls_policy_maps",
    "smtpd_discard_ehlo_keyword_address_maps",
    "smtpd_milter_maps",
    "virtual_gid_maps",
    "virtual_uid_maps",
    "local_login_sender_maps",
    "postscreen_reject_footer_maps",
    "smtpd_reject_footer_maps",
    "tls_server_sni_maps",
    "tlsproxy_client_policy_maps",
    "default_delivery_status_filter",
    "lmtp_delivery_status_filter",
    "lmtp_dns_reply_filter",
    "lmtp_reply_filter",
    "local_delivery_status_filter",
    "pipe_delivery_status_filter",
    "postscreen_command_filter",
    "smtp_delivery_status_filter",
    "smtp_dns_reply_filter",
    "smtp_reply_filter",
    "smtpd_command_filter",
    "smtpd_dns_reply_filter",
    "virtual_delivery_status_filter",
    "body_checks",
    "header_checks",
    "lmtp_body_checks",
    "lmtp_header_checks",
    "lmtp_mime_header_checks",
    "lmtp_nested_header_checks",
    "milter_header_checks",
    "mime_header_checks",
    "nested_header_checks",
    "smtp_body_checks",
    "smtp_header_checks",
    "smtp_mime_header_checks",
    "smtp_nested_header_checks",
]

# Appended by newer Postfix (3.12): every other parameter that holds a table.
# 3.7 does not approve proxy: tables in these unless proxy_read_maps is edited.
_READ_MAPS_NEW = [
    "smtpd_reject_filter_maps",
    "debug_peer_list",
    "smtpd_etrn_restrictions",
    "fast_flush_domains",
    "authorized_flush_users",
    "lmtp_connection_cache_destinations",
    "local_header_rewrite_clients",
    "masquerade_exceptions",
    "postscreen_access_list",
    "postscreen_allowlist_interfaces",
    "postscreen_forbidden_commands",
    "qmqpd_authorized_clients",
    "authorized_mailq_users",
    "smtp_connection_cache_destinations",
    "smtpd_log_access_permit_actions",
    "smtpd_forbidden_commands",
    "smtpd_client_event_limit_exceptions",
    "smtpd_sasl_exceptions_networks",
    "smtpd_sasl_mechanism_filter",
    "smtp_requiretls_policy",
    "smtp_sasl_mechanism_filter",
    "authorized_submit_users",
    "smtpd_authorized_verp_clients",
    "smtpd_authorized_xclient_hosts",
    "smtpd_authorized_xforward_hosts",
    "lmtp_tls_loglevel_maps",
    "postscreen_tls_loglevel_maps",
    "smtp_tls_loglevel_maps",
    "smtpd_tls_loglevel_maps",
]

_WRITE_MAPS = [
    "smtp_sasl_auth_cache_name",
    "lmtp_sasl_auth_cache_name",
    "address_verify_map",
    "postscreen_cache_map",
]

#: Parameter names whose $-references make up the default of each proxy_*_maps list.
PROXY_READ_MAPS_NAMES: tuple[str, ...] = tuple(_READ_MAPS_37 + _READ_MAPS_NEW)
PROXY_WRITE_MAPS_NAMES: tuple[str, ...] = tuple(_WRITE_MAPS)

_COMPAT_LT_1 = "${{$compatibility_level} <level {1} ? {%s} : {%s}}"
_COMPAT_LT_2 = "${{$compatibility_level} <level {2} ? {%s} : {%s}}"

_MAP_DEFAULTS = {
    # Members of the proxy_read_maps default that are not empty.
    "local_recipient_maps": "proxy:unix:passwd.byname $alias_maps",
    "mydestination": "$myhostname, localhost.$mydomain, localhost",
    "virtual_alias_maps": "$virtual_maps",
    "virtual_alias_domains": "$virtual_alias_maps",
    "virtual_mailbox_domains": "$virtual_mailbox_maps",
    "relay_domains": _COMPAT_LT_2 % ("$mydestination", ""),
    # 3.7 spells the database type out: "hash:/etc/aliases, nis:mail.aliases".
    # The nis: part is there because Debian builds with NIS, as `postconf -d` shows.
    "alias_maps": "$default_database_type:/etc/aliases, nis:mail.aliases",
    "smtpd_relay_restrictions": _COMPAT_LT_1
    % ("", "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination"),
    "address_verify_sender_dependent_default_transport_maps": (
        "$sender_dependent_default_transport_maps"
    ),
    "address_verify_sender_dependent_relayhost_maps": "$sender_dependent_relayhost_maps",
    "address_verify_transport_maps": "$transport_maps",
    "postscreen_discard_ehlo_keyword_address_maps": "$smtpd_discard_ehlo_keyword_address_maps",
    "local_login_sender_maps": "static:*",
    "postscreen_reject_footer_maps": "$smtpd_reject_footer_maps",
    # 3.7 had "${tlsproxy_client_policy:$smtp_tls_policy_maps}", which drops the
    # legacy setting instead of using it.
    "tlsproxy_client_policy_maps": (
        "${tlsproxy_client_policy?{$tlsproxy_client_policy}:{$smtp_tls_policy_maps}}"
    ),
    "lmtp_delivery_status_filter": "$default_delivery_status_filter",
    "local_delivery_status_filter": "$default_delivery_status_filter",
    "pipe_delivery_status_filter": "$default_delivery_status_filter",
    "smtp_delivery_status_filter": "$default_delivery_status_filter",
    "virtual_delivery_status_filter": "$default_delivery_status_filter",
    "mime_header_checks": "$header_checks",
    "nested_header_checks": "$header_checks",
    "fast_flush_domains": "$relay_domains",
    "authorized_flush_users": "static:anyone",
    "local_header_rewrite_clients": "permit_inet_interfaces",
    "postscreen_access_list": "permit_mynetworks",
    "postscreen_allowlist_interfaces": (
        "${postscreen_whitelist_interfaces?{$postscreen_whitelist_interfaces}:{static:all}}"
    ),
    "postscreen_forbidden_commands": "$smtpd_forbidden_commands",
    "authorized_mailq_users": "static:anyone",
    "smtpd_forbidden_commands": "CONNECT GET POST regexp:{{/^[^A-Z]/ Bogus}}",
    "smtpd_client_event_limit_exceptions": (
        "${smtpd_client_connection_limit_exceptions:$mynetworks}"
    ),
    "smtpd_sasl_mechanism_filter": "!external, static:rest",
    # Not in 3.7 at all.
    "smtp_requiretls_policy": (
        "inline:{{${domain_to_ascii{$mydomain}}=opportunistic},"
        " {.${domain_to_ascii{$mydomain}}=opportunistic}, {localhost=opportunistic}},"
        " cidr:{{0.0.0.0/0 opportunistic}, {::/0 opportunistic}}, enforce"
    ),
    "authorized_submit_users": "static:anyone",
    "smtpd_authorized_verp_clients": "$authorized_verp_clients",
    "postscreen_tls_loglevel_maps": "$smtpd_tls_loglevel_maps",
    # Members of the proxy_write_maps default; 3.7 has "btree:" for the cache type.
    "address_verify_map": "$default_cache_db_type:$data_directory/verify_cache",
    "postscreen_cache_map": "$default_cache_db_type:$data_directory/postscreen_cache",
    # Named by the values above.
    "default_database_type": "hash",
    "default_cache_db_type": "btree",  # new in 3.11
    "data_directory": "/var/lib/postfix",
    "compatibility_level": "0",
    "mynetworks_style": _COMPAT_LT_2 % ("subnet", "host"),
}

_SERVICE_DEFAULTS = {
    "queue_directory": "/var/spool/postfix",
    "mail_owner": "postfix",
    "smtputf8_enable": _COMPAT_LT_1 % ("no", "yes"),
    "proxymap_service_name": "proxymap",
    "proxywrite_service_name": "proxywrite",
    "smtpd_restriction_classes": "",
    "default_process_limit": "100",
    "max_use": "100",
    "max_idle": "100s",
    "ipc_timeout": "3600s",
    "daemon_timeout": "18000s",
    "line_length_limit": "2048",
    "header_size_limit": "102400",
    "myorigin": "$myhostname",
    "proxy_read_maps": " ".join("$" + name for name in PROXY_READ_MAPS_NAMES),
    "proxy_write_maps": " ".join("$" + name for name in PROXY_WRITE_MAPS_NAMES),
}

# Postfix's fallback domain for a host name without a dot.
_DEFAULT_DOMAIN = "localdomain"


@functools.cache
def _gethostname() -> str:
    return socket.gethostname()


def _myhostname(lookup: Lookup) -> str:
    """The machine name, completed with $mydomain (or "localdomain") when it has no dot.

    Like Postfix this never asks DNS: a resolver outage must not hang start-up.
    """
    name = _gethostname()
    if "." in name:
        return name
    return f"{name}.{lookup('mydomain') or _DEFAULT_DOMAIN}"


def _mydomain(lookup: Lookup) -> str:
    """$myhostname minus its first label."""
    _, dot, domain = (lookup("myhostname") or "").partition(".")
    return domain if dot else _DEFAULT_DOMAIN


class _Sockaddr(ctypes.Structure):
    # Linux: 16-bit family. BSD and macOS: 8-bit length, then 8-bit family.
    if sys.platform.startswith("linux"):
        _fields_ = [("family", ctypes.c_uint16), ("data", ctypes.c_ubyte * 26)]
    else:
        _fields_ = [("len", ctypes.c_uint8), ("family", ctypes.c_uint8),
                    ("data", ctypes.c_ubyte * 26)]  # fmt: skip


class _Ifaddrs(ctypes.Structure):
    pass


_Ifaddrs._fields_ = [
    ("next", ctypes.POINTER(_Ifaddrs)),
    ("name", ctypes.c_char_p),
    ("flags", ctypes.c_uint),
    ("addr", ctypes.POINTER(_Sockaddr)),
    ("netmask", ctypes.POINTER(_Sockaddr)),
]

_IFF_UP = 0x1
# Offset of the address inside sockaddr_in / sockaddr_in6, after the family.
_ADDR_SLICE = {socket.AF_INET: slice(2, 6), socket.AF_INET6: slice(6, 22)}


@functools.cache
def _interfaces() -> tuple[tuple[_IPAddress, int], ...]:
    """(address, netmask length) of each interface that is up, IPv4 first, as Postfix lists them.

    Falls back to the loopback addresses where getifaddrs(3) is not available.
    """
    loopback = ((ipaddress.ip_address("127.0.0.1"), 8), (ipaddress.ip_address("::1"), 128))
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return loopback
    libc = ctypes.CDLL(libc_name, use_errno=True)
    head = ctypes.POINTER(_Ifaddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        return loopback
    found: dict[int, list[tuple[_IPAddress, int]]] = {socket.AF_INET: [], socket.AF_INET6: []}
    try:
        node = head
        while node:
            ifa = node.contents
            node = ifa.next
            if not ifa.flags & _IFF_UP or not ifa.addr or not ifa.netmask:
                continue
            family = ifa.addr.contents.family
            if family not in found:
                continue
            where = _ADDR_SLICE[family]
            addr = ipaddress.ip_address(bytes(ifa.addr.contents.data[where]))
            mask = int.from_bytes(bytes(ifa.netmask.contents.data[where]))
            if not addr.is_unspecified:
                # Like Postfix: the mask length ends at its lowest set bit.
                found[family].append(
                    (addr, addr.max_prefixlen - (mask & -mask).bit_length() + 1 if mask else 0)
                )
    finally:
        libc.freeifaddrs(head)
    return tuple(found[socket.AF_INET] + found[socket.AF_INET6]) or loopback


def _classful(addr: _IPAddress) -> int:
    """The pre-CIDR prefix length of an IPv4 address (class A, B, C, else D)."""
    first = addr.packed[0]
    return 8 if first < 128 else 16 if first < 192 else 24 if first < 224 else 4


def _mynetworks(lookup: Lookup) -> str:
    """The networks of this host's interfaces, masked as $mynetworks_style says."""
    style = (lookup("mynetworks_style") or "").strip().lower()
    if style not in ("host", "subnet", "class"):
        raise ValueError(f"bad mynetworks_style value: {style}; specify exactly one value")
    networks: list[str] = []
    for addr, masklen in _interfaces():
        if style == "host":
            prefix = addr.max_prefixlen
        elif style == "class" and addr.version == 4:
            prefix = _classful(addr)
        else:  # IPv6 has no classes: Postfix uses the subnet
            prefix = masklen
        net = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
        text = str(net) if net.version == 4 else f"[{net.network_address}]/{prefix}"
        if text not in networks:
            networks.append(text)
    return " ".join(networks)


#: name -> function that computes the default from other (expanded) parameters.
COMPUTED: Mapping[str, Callable[[Lookup], str]] = MappingProxyType(
    {"myhostname": _myhostname, "mydomain": _mydomain, "mynetworks": _mynetworks}
)

#: name -> unexpanded default. Members of the proxy_*_maps lists that are neither
#: computed nor listed above default to the empty string.
DEFAULTS: Mapping[str, str] = MappingProxyType(
    {name: "" for name in PROXY_READ_MAPS_NAMES + PROXY_WRITE_MAPS_NAMES if name not in COMPUTED}
    | _MAP_DEFAULTS
    | _SERVICE_DEFAULTS
)
