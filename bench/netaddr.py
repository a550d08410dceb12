"""IP address and port parsing: the one place that turns text into integers.

The kernels work on host-order ``uint32`` IPv4 addresses; everything that parses
an address or CIDR goes through here so errors read the same everywhere.
"""
import ipaddress
import socket

from bench.errors import InputError

PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}


def _dotted_quad(text) -> int | None:
    """Fast path for loaders: inet_pton accepts exactly the dotted quads ipaddress accepts
    (four decimal octets 0..255, no leading zeros) at a tenth of the cost. None sends the
    caller down the ipaddress path, which also words the error."""
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, TypeError, ValueError):
        return None


def ip_to_int(text: str, where: str = "", field: str = "") -> int:
    """Parse a dotted IPv4 address into a host-order integer."""
    value = _dotted_quad(text)
    if value is not None:
        return value
    try:
        return int(ipaddress.IPv4Address(str(text).strip()))
    except (ipaddress.AddressValueError, ValueError):
        raise InputError(f"not an IPv4 address: {text!r}", where, field) from None


def int_to_ip(value: int) -> str:
    """The dotted quad of a host-order integer (inet_ntoa: a quarter of ipaddress's cost)."""
    return socket.inet_ntoa(int(value).to_bytes(4, "big"))


def parse_cidr(text: str, where: str = "", field: str = "") -> tuple[int, int]:
    """Parse ``a.b.c.d[/len]`` into (network address, netmask) as host-order integers.

    Host bits are allowed (iptables accepts ``10.0.0.1/8`` and masks it).
    """
    address, slash, prefix = str(text).partition("/")
    value = _dotted_quad(address)
    if value is not None and (not slash or (prefix.isascii() and prefix.isdigit() and int(prefix) <= 32)):
        mask = (0xFFFFFFFF << (32 - int(prefix))) & 0xFFFFFFFF if slash else 0xFFFFFFFF
        return value & mask, mask
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
