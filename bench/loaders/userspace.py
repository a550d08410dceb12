"""userspace mode's loader: the iptables loader, with REDIRECT turned into the DNAT it performs.

The portal rules are ordinary nat rules, so bench/loaders/iptables.py loads them, except for
their ``-j REDIRECT --to-ports P`` target, which the iptables kernel model does not have.
REDIRECT is a DNAT whose address the kernel picks per packet (``nf_nat_redirect_ipv4``): at
OUTPUT 127.0.0.1, elsewhere the first address of the interface the packet came in on. The
model has no interfaces, so REDIRECT rules in the built-in OUTPUT chain become
``-j DNAT --to-destination 127.0.0.1:P`` and all others (the portal rules, reached from
PREROUTING) ``-j DNAT --to-destination INTERFACE_IP:P``. Each line stays one line, so errors
still name the line of the original text. The cost model accounts for the target-size
difference (bench/costs/userspace.py).
"""
from __future__ import annotations

import re

from bench.errors import InputError
from bench.loaders.iptables import Ruleset, load as load_iptables
from bench.netaddr import ip_to_int

LOCAL_OUT_REDIRECT_IP = "127.0.0.1"
_FILTER_TABLE = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
_REDIRECT = re.compile(r"-j REDIRECT(?: --to-ports (\S+))?\s*$")


def load(text: str, interface_ip: str, source: str = "<string>") -> Ruleset:
    """Load portal rules; a packet REDIRECTed at PREROUTING goes to ``interface_ip``.

    The userspace proxier wrote nothing into the filter table, so when the text has none an
    empty one (built-in chains, ACCEPT policies) is added: a node always has it.
    """
    ip_to_int(interface_ip, source, "interface address")
    ruleset = load_iptables(redirects_as_dnat(text, interface_ip), source)
    if "filter" not in ruleset.tables:
        ruleset = load_iptables(_FILTER_TABLE, source, base=ruleset, noflush=True)
    return ruleset


def redirects_as_dnat(text: str, interface_ip: str) -> str:
    return "\n".join(_translate(line, number, interface_ip)
                     for number, line in enumerate(text.split("\n"), 1))


def _translate(line: str, number: int, interface_ip: str) -> str:
    found = _REDIRECT.search(line) if line.startswith("-A ") else None
    if not found:
        return line
    ports = found.group(1)
    if ports is not None and not ports.isdigit():
        raise InputError(f"REDIRECT --to-ports {ports!r}: only a single port is modelled", f"line {number}",
                         "--to-ports")
    address = LOCAL_OUT_REDIRECT_IP if line.split()[1] == "OUTPUT" else interface_ip
    target = f"-j DNAT --to-destination {address}" + (f":{ports}" if ports else "")
    return line[:found.start()] + target
