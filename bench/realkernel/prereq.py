"""What ``kpbench kernel`` needs from the machine, detected tool by tool.

A *tool* is one way of loading a mode's rules into the kernel: ``iptables-legacy`` and
``iptables-nft`` (iptables mode through the legacy x_tables or the nf_tables backend),
``nftables`` (``nft -f``) and ``ipvs``. A missing tool skips that tool with one line naming
the apt package to install; IPVS is probed in a throwaway namespace because the tools can be
installed while the kernel lacks IPVS.

``python -m bench.realkernel.prereq --install`` installs the apt packages that are missing
(what ``make bench-kernel`` runs first).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from bench.errors import InputError
from bench.realkernel import netns

# mode → its tools; tool → the programs it runs.
MODE_TOOLS = {"iptables": ("iptables-legacy", "iptables-nft"), "nftables": ("nftables",), "ipvs": ("ipvs",)}
PROGRAMS = {
    "iptables-legacy": ("iptables-legacy-restore", "iptables-legacy-save"),
    "iptables-nft": ("iptables-nft-restore", "iptables-nft-save"),
    "nftables": ("nft",),
    "ipvs": ("ipvsadm", "ipset"),
}
ALWAYS = ("ip", "sysctl")
APT_PACKAGES = {"ip": "iproute2", "sysctl": "procps", "iptables-legacy-restore": "iptables",
                "iptables-legacy-save": "iptables", "iptables-nft-restore": "iptables",
                "iptables-nft-save": "iptables", "nft": "nftables", "ipvsadm": "ipvsadm", "ipset": "ipset"}
IPVS_UNAVAILABLE = "IPVS not available in this kernel"


def require_root() -> None:
    if os.geteuid() != 0:
        raise InputError("needs root (it creates network namespaces and loads rules into them); "
                         "run it with sudo", "kpbench kernel")


def missing_programs(tool: str) -> list[str]:
    return [p for p in ALWAYS + PROGRAMS[tool] if shutil.which(p) is None]


def install_hint(programs: list[str]) -> str:
    packages = sorted({APT_PACKAGES[p] for p in programs})
    return f"install with: apt-get install {' '.join(packages)} (or make bench-kernel)"


def ipvs_status() -> str | None:
    """None when the kernel accepts an IPVS virtual service (tried in a throwaway namespace);
    otherwise why not."""
    missing = missing_programs("ipvs")
    if missing:
        return f"{', '.join(missing)} not installed; {install_hint(missing)}"
    with netns.Namespaces() as spaces:
        probe = spaces.add("probe")
        done = netns.run(["ipvsadm", "-A", "-t", "10.0.0.1:80", "-s", "rr"], probe, check=False)
    if done.returncode != 0:
        reason = (done.stderr.strip() or done.stdout.strip()).splitlines()
        return f"{IPVS_UNAVAILABLE} ({reason[0] if reason else 'ipvsadm failed'})"
    return None


def tool_status(tool: str) -> str | None:
    """None when ``tool`` can run here; otherwise one line saying why not."""
    if tool == "ipvs":
        return ipvs_status()
    missing = missing_programs(tool)
    return f"{', '.join(missing)} not installed; {install_hint(missing)}" if missing else None


def install() -> str | None:
    """Install the missing apt packages; None on success, else why it was impossible."""
    missing = sorted({p for tool in PROGRAMS for p in missing_programs(tool)})
    if not missing:
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{', '.join(missing)} missing and apt-get as root is not available"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    packages = sorted({APT_PACKAGES[p] for p in missing})
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            return f"{' '.join(command[:2])} failed: {lines[-1] if lines else done.returncode}"
    return None


def main(argv: list[str]) -> int:
    if argv != ["--install"]:
        print("usage: python -m bench.realkernel.prereq --install", file=sys.stderr)
        return 2
    problem = install()
    if problem:
        print(f"kpbench: error: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
