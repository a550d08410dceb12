"""IP address and port parsing: the one place that turns text into integers.

The kernels work on host-order ``uint32`` IPv4 addresses; everything that parses
an address or CIDR goes through here so errors read the same everywhere.
"""
import ipaddress

from bench.errors import InputError

PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}


def ip_to_int(text: str, where: str = "", field: str = "") -> int:
    """Parse a dotted IPv4 address into a host-order integer."""
    try:
        return int(ipaddress.IPv4Address(str(text).strip()))
    except (ipaddress.AddressValueError, ValueError):
        raise InputError(f"not an IPv4 address: {text!r}", where, field) from None


def int_to_ip(value: int) -> str:
    return str(ipaddress.IPv4Address(int(value)))


def parse_cidr(text: str, where: str = "", field: str = "") -> tuple[int, int]:
    """Parse ``a.b.c.d[/len]`` into (network address, netmask) as host-order integers.

    Host bits are allowed (iptables accepts ``10.0.0.1/8`` and masks it).
    """
    try:
        net = ipaddress.IPv4Network(str(text).strip(), strict=False)
    except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError):
        raise InputError(f"not an IPv4 address or CIDR: {text!r}", where, field) from None
    return int(net.network_address), int(net.netmask)


def is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(str(text).strip())
        return True
    except (ipaddress.AddressValueError, ValueError):
        return False


def parse_port(value, where: str = "", field: str = "", allow_zero: bool = False) -> int:
    """Parse a TCP/UDP/SCTP port number (1..65535, or 0 when allowed)."""
    try:
        port = int(str(value).strip())
    except (TypeError, ValueError):
        raise InputError(f"not a port number: {value!r}", where, field) from None
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise InputError(f"port out of range {low}..65535: {port}", where, field)
    return port


def parse_protocol(value, where: str = "", field: str = "") -> str:
    """Return the lower-case protocol name (tcp, udp, sctp)."""
    name = str(value).strip().lower()
    if name not in PROTOCOLS:
        raise InputError(f"unknown protocol {value!r} (expected TCP, UDP or SCTP)", where, field)
    return name
