"""Host-based access rules for clients, in pg_hba.conf syntax.

A rule is one pg_hba.conf line: ``TYPE DATABASE USER ADDRESS METHOD``, where
TYPE is ``host`` (TLS or not), ``hostssl`` (TLS only) or ``hostnossl``;
DATABASE and USER are ``all`` or comma-separated names; ADDRESS is ``all``, a
CIDR block or a bare IP address; METHOD is ``scram-sha-256``, ``md5``,
``trust`` or ``reject``. As in PostgreSQL the first rule that matches the
connection decides, and a connection no rule matches is refused.

Rules come from ``general.hba`` (a list of such lines) or ``general.hba_file``
(a file of them, ``#`` comments allowed); ``config.py`` turns a ValueError
from :func:`parse_rule` into a ConfigError naming the file and the entry.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

CONNECTION_TYPES = ("host", "hostssl", "hostnossl")
METHODS = ("scram-sha-256", "md5", "trust", "reject")
ALL = "all"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class HbaRule:
    connection_type: str
    databases: frozenset[str] | None  # None = all
    users: frozenset[str] | None  # None = all
    network: IPNetwork | None  # None = all
    method: str
    text: str  # the rule as written, for log lines

    def __str__(self) -> str:
        return self.text

    def matches(self, address: str, database: str, user: str, tls: bool) -> bool:
        if self.connection_type == "hostssl" and not tls:
            return False
        if self.connection_type == "hostnossl" and tls:
            return False
        if self.databases is not None and database not in self.databases:
            return False
        if self.users is not None and user not in self.users:
            return False
        if self.network is None:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.version == self.network.version and ip in self.network


def _names(field: str, what: str) -> frozenset[str] | None:
    names = [n for n in field.split(",")]
    if any(n == "" for n in names):
        raise ValueError(f"empty {what} name in {field!r}")
    if ALL in names:
        if len(names) > 1:
            raise ValueError(f'"all" cannot be combined with other {what} names')
        return None
    for name in names:
        if name.startswith(("+", "@")) or name in ("sameuser", "samerole", "replication"):
            raise ValueError(f"{what} {name!r}: groups, files and keywords other than \"all\" are not supported")
    return frozenset(n.strip('"') for n in names)


def parse_rule(line: str) -> HbaRule:
    """One pg_hba-style line -> HbaRule; ValueError says what is wrong with it."""
    fields = line.split()
    if len(fields) != 5:
        raise ValueError(f"expected 5 fields (type database user address method), got {len(fields)}")
    connection_type, database, user, address, method = fields
    if connection_type not in CONNECTION_TYPES:
        expected = ", ".join(CONNECTION_TYPES)
        raise ValueError(f"connection type {connection_type!r} is not one of {expected} "
                         "(pypool listens on TCP only)")
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    network: IPNetwork | None = None
    if address != ALL:
        try:
            network = ipaddress.ip_network(address, strict=True)
        except ValueError as exc:
            raise ValueError(f"address {address!r} is not \"all\", an IP address or a CIDR block: {exc}") from None
    return HbaRule(connection_type, _names(database, "database"), _names(user, "user"), network, method,
                   " ".join(fields))


def parse_file_text(text: str) -> list[tuple[int, str]]:
    """The rule lines of a pg_hba-format file as (line number, text), comments and blanks dropped."""
    out = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            out.append((number, line))
    return out


def first_match(rules: tuple[HbaRule, ...], address: str, database: str, user: str, tls: bool) -> HbaRule | None:
    for rule in rules:
        if rule.matches(address, database, user, tls):
            return rule
    return None
