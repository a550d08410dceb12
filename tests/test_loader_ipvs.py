"""The IPVS loader: ipvsadm-save -n, ipset save and kpbench's sectioned IPVS-mode output; and
the iptables loader's -m set, -m physdev and -m ipvs, which IPVS mode's iptables rules use.
"""
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.cluster.model import Cluster, Endpoint, EndpointPort, EndpointSlice, Node, ProxyConfig, Service, ServicePort
from bench.errors import InputError
from bench.loaders import iptables
from bench.loaders.ipvs import (FLAG_PERSISTENT, FLAG_SCHED1, FLAG_SCHED2, FWD_MASQ, FWD_ROUTE, FWD_TUNNEL,
                                SECTION_ADDRESSES, SECTION_IPSET, SECTION_IPTABLES, IpSet,
                                RealServer, VirtualService, dump_addresses, dump_ipset, dump_ipvsadm, load,
                                load_ipset, load_ipvsadm)
from bench.netaddr import ip_to_int as ip
from bench.proxies.ipvs import IpvsWriterOptions, write
from kernels import layout as L

TCP, UDP, SCTP = 6, 17, 132

# What a kubeadm node shows (kube-proxy in IPVS mode, CoreDNS and the API server), plus the
# forms kube-proxy never writes but ipvsadm does.
IPVSADM_SAVE = """\
-A -t 10.96.0.1:443 -s rr
-a -t 10.96.0.1:443 -r 192.168.0.2:6443 -m -w 1
-A -t 10.96.0.10:53 -s rr
-a -t 10.96.0.10:53 -r 10.244.0.2:53 -m -w 1
-a -t 10.96.0.10:53 -r 10.244.0.3:53 -m -w 1
-A -u 10.96.0.10:53 -s rr -p 10800
-a -u 10.96.0.10:53 -r 10.244.0.2:53 -m -w 1
-A --sctp-service 10.96.0.20:9000 -s mh -b mh-port
-A -t 10.0.0.1:80 -s sh -p 60 -M 255.255.255.0 -b sh-fallback,sh-port
-a -t 10.0.0.1:80 -r 10.0.0.9:8080 -i -w 0
-A -f 100 -s wrr
-a -f 100 -r 10.0.0.9:0 -g -w 3
"""

# `ipset save` of ipset v7.17 on Linux 6.18 (bucketsize and initval are printed since 7.x).
IPSET_SAVE = """\
create KUBE-LOOP-BACK hash:ip,port,ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x45913c4f
add KUBE-LOOP-BACK 10.0.0.5,tcp:8080,10.0.0.5
create KUBE-LOAD-BALANCER-SOURCE-CIDR hash:ip,port,net family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0xf0129b6d
add KUBE-LOAD-BALANCER-SOURCE-CIDR 1.2.3.4,tcp:81,0.0.0.0/1
add KUBE-LOAD-BALANCER-SOURCE-CIDR 1.2.3.4,tcp:80,203.0.113.0/25
add KUBE-LOAD-BALANCER-SOURCE-CIDR 1.2.3.4,tcp:80,198.51.100.7
create KUBE-NODE-PORT-TCP bitmap:port range 0-65535
add KUBE-NODE-PORT-TCP 3000
add KUBE-NODE-PORT-TCP 30080
create KUBE-IPVS-IPS hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x835fcff9
add KUBE-IPVS-IPS 10.96.0.1
create KUBE-NODE-PORT-SCTP-HASH hash:ip,port family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x93c55666
add KUBE-NODE-PORT-SCTP-HASH 192.168.0.2,tcp:30002
add KUBE-NODE-PORT-SCTP-HASH 192.168.0.2,sctp:30001
add KUBE-NODE-PORT-SCTP-HASH 192.168.0.2,udp:0
create NETS hash:net family inet hashsize 64 maxelem 2
add NETS 10.0.0.0/8
"""


def error_of(load_function, text):
    with pytest.raises(InputError) as error:
        load_function(text, "in.txt")
    return error.value


# ---- ipvsadm-save -n -----------------------------------------------------------------------------

def test_ipvsadm_save_reads_services_and_real_servers():
    services = {svc.key: svc for svc in load_ipvsadm(IPVSADM_SAVE)}
    assert services[(0, TCP, ip("10.96.0.10"), 53)] == VirtualService(
        TCP, ip("10.96.0.10"), 53, "rr",
        real_servers=[RealServer(ip("10.244.0.2"), 53, 1, FWD_MASQ), RealServer(ip("10.244.0.3"), 53, 1, FWD_MASQ)])
    dns_udp = services[(0, UDP, ip("10.96.0.10"), 53)]
    assert (dns_udp.flags, dns_udp.timeout, dns_udp.persistent) == (FLAG_PERSISTENT, 10800, True)
    assert services[(0, SCTP, ip("10.96.0.20"), 9000)].flags == FLAG_SCHED2
    sh = services[(0, TCP, ip("10.0.0.1"), 80)]
    assert (sh.scheduler, sh.flags, sh.timeout, sh.netmask) == (
        "sh", FLAG_PERSISTENT | FLAG_SCHED1 | FLAG_SCHED2, 60, 0xFFFFFF00)
    assert sh.real_servers == [RealServer(ip("10.0.0.9"), 8080, 0, FWD_TUNNEL)]
    fwmark = services[(100, 0, 0, 0)]
    assert (fwmark.scheduler, fwmark.real_servers) == ("wrr", [RealServer(ip("10.0.0.9"), 0, 3, FWD_ROUTE)])


def test_ipvsadm_defaults_are_ipvsadms():
    svc, port_zero = load_ipvsadm("-A -t 10.0.0.3:80\n-a -t 10.0.0.3:80 -r 10.0.0.4\n-A -t 10.0.0.5:0 -p\n")
    # wlc without -s, gatewaying without -m/-g/-i, weight 1, the service's port, 300 s for a bare -p.
    assert svc == VirtualService(TCP, ip("10.0.0.3"), 80, "wlc", real_servers=[RealServer(ip("10.0.0.4"), 80, 1, FWD_ROUTE)])
    assert (port_zero.timeout, port_zero.port) == (300, 0)


def test_ipvsadm_long_options_mean_the_short_ones():
    long = load_ipvsadm("--add-service --tcp-service 10.0.0.1:80 --scheduler lc --persistent 5\n"
                        "--add-server --tcp-service 10.0.0.1:80 --real-server 10.0.0.2:81 --masquerading --weight 2\n")
    assert long == load_ipvsadm("-A -t 10.0.0.1:80 -s lc -p 5\n-a -t 10.0.0.1:80 -r 10.0.0.2:81 -m -w 2\n")


def test_dump_ipvsadm_prints_ipvsadm_save_and_reads_back():
    services = load_ipvsadm(IPVSADM_SAVE)
    text = dump_ipvsadm(services)
    assert text.splitlines()[:5] == [
        "-A -t 10.0.0.1:80 -s sh -p 60 -M 255.255.255.0 -b sh-fallback,sh-port",
        "-a -t 10.0.0.1:80 -r 10.0.0.9:8080 -i -w 0",
        "-A -t 10.96.0.1:443 -s rr",
        "-a -t 10.96.0.1:443 -r 192.168.0.2:6443 -m -w 1",
        "-A -t 10.96.0.10:53 -s rr",
    ]
    assert text.splitlines()[-3:] == ["-A --sctp-service 10.96.0.20:9000 -s mh -b mh-port", "-A -f 100 -s wrr",
                                      "-a -f 100 -r 10.0.0.9:0 -g -w 3"]
    assert sorted(load_ipvsadm(text), key=lambda s: s.key) == sorted(services, key=lambda s: s.key)
    assert dump_ipvsadm(load_ipvsadm(text)) == text


@pytest.mark.parametrize("text, line, field, message", [
    ("-A -t 10.0.0.1:80 -s rr\n-A -t 10.0.0.2:80 -s foo\n", 2, "-s", "unknown scheduler 'foo'"),
    ("-a -t 10.0.0.1:80 -r 10.0.0.2:80 -m -w 1\n", 1, "-t", "no such service"),
    ("-A -t 10.0.0.1:80\n\n-a -u 10.0.0.1:80 -r 10.0.0.2\n", 3, "-u", "no such service"),
    ("-A -t 10.0.0.300:80 -s rr\n", 1, "-t", "not an IPv4 address"),
    ("-A -t 10.0.0.1:http -s rr\n", 1, "-t", "save with -n"),
    ("-A -t 10.0.0.1:65536 -s rr\n", 1, "-t", "out of range"),
    ("-A -t 10.0.0.1 -s rr\n", 1, "-t", "ADDRESS:PORT"),
    ("-A -t [::1]:80 -s rr\n", 1, "-t", "IPv6"),
    ("-A -t 10.0.0.1:80 -s rr --pe sip\n", 1, "--pe", "unknown option"),
    ("-A -t 10.0.0.1:80 -s rr extra\n", 1, "extra", "unexpected argument"),
    ("-A -t 10.0.0.1:80 -s rr -s lc\n", 1, "-s", "repeats"),
    ("-A -t 10.0.0.1:80 -u 10.0.0.1:80\n", 1, "-u", "conflicts with -t"),
    ("-A -s rr\n", 1, "-A", "needs -t, -u, --sctp-service or -f"),
    ("-A -t 10.0.0.1:80 -s\n", 1, "-s", "needs an argument"),
    ("-A -t 10.0.0.1:80\n-A -t 10.0.0.1:80\n", 2, "-t", "already exists"),
    ("-A -t 10.0.0.1:80\n-a -t 10.0.0.1:80 -r 10.0.0.2\n-a -t 10.0.0.1:80 -r 10.0.0.2:80 -m\n", 3, "-r",
     "destination already exists"),
    ("-A -t 10.0.0.1:80\n-a -t 10.0.0.1:80 -m\n", 2, "-a", "needs -r"),
    ("-A -t 10.0.0.1:80\n-a -t 10.0.0.1:80 -r 10.0.0.2 -m -g\n", 2, "-g", "conflicts with -m"),
    ("-A -t 10.0.0.1:80\n-a -t 10.0.0.1:80 -r 10.0.0.2 -w 70000\n", 2, "-w", "0 to 65535"),
    ("-A -t 10.0.0.1:80 -p x\n", 1, "-p", "number"),
    ("-A -t 10.0.0.1:0 -s rr\n", 1, "-t", "must be persistent"),
    ("-A -t 10.0.0.1:80 -s rr -b sh-port\n", 1, "-b", "needs scheduler sh"),
    ("-A -t 10.0.0.1:80 -s rr -b fast\n", 1, "-b", "invalid scheduler flag"),
    ("-A -t 10.0.0.1:80 -p 5 -M 255.0.255.0\n", 1, "-M", "contiguous"),
    ("-A -f 0 -s rr\n", 1, "-f", "1 to"),
    ("-E -t 10.0.0.1:80 -s rr\n", 1, "-E", "unknown command"),
])
def test_ipvsadm_errors_name_the_line_and_option(text, line, field, message):
    error = error_of(load_ipvsadm, text)
    assert (error.where, error.field) == (f"in.txt:{line}", field)
    assert message in error.message


# ---- ipset save ----------------------------------------------------------------------------------

def test_ipset_save_reads_typed_entries():
    sets = load_ipset(IPSET_SAVE)
    assert list(sets) == ["KUBE-LOOP-BACK", "KUBE-LOAD-BALANCER-SOURCE-CIDR", "KUBE-NODE-PORT-TCP", "KUBE-IPVS-IPS",
                          "KUBE-NODE-PORT-SCTP-HASH", "NETS"]
    assert sets["KUBE-LOOP-BACK"] == IpSet("KUBE-LOOP-BACK", "hash:ip,port,ip",
                                           [(ip("10.0.0.5"), TCP, 8080, ip("10.0.0.5"))])
    assert sets["KUBE-LOAD-BALANCER-SOURCE-CIDR"].entries == [
        (ip("1.2.3.4"), TCP, 81, (0, 1)), (ip("1.2.3.4"), TCP, 80, (ip("203.0.113.0"), 25)),
        (ip("1.2.3.4"), TCP, 80, (ip("198.51.100.7"), 32))]
    ports = sets["KUBE-NODE-PORT-TCP"]
    assert (ports.type, ports.port_range, ports.entries) == ("bitmap:port", (0, 65535), [(3000,), (30080,)])
    assert sets["KUBE-IPVS-IPS"].entries == [(ip("10.96.0.1"),)]
    assert sets["KUBE-NODE-PORT-SCTP-HASH"].entries == [
        (ip("192.168.0.2"), TCP, 30002), (ip("192.168.0.2"), SCTP, 30001), (ip("192.168.0.2"), UDP, 0)]
    nets = sets["NETS"]
    assert (nets.hashsize, nets.maxelem, nets.entries) == (64, 2, [((ip("10.0.0.0"), 8),)])


def test_ipset_entry_forms_ipset_accepts():
    sets = load_ipset("create A hash:ip,port,net\nadd A 1.2.3.4,80,10.1.2.3/24\n")
    # A bare port is TCP; a net is stored masked, as the kernel stores it.
    assert sets["A"].entries == [(ip("1.2.3.4"), TCP, 80, (ip("10.1.2.0"), 24))]
    assert (sets["A"].family, sets["A"].hashsize, sets["A"].maxelem) == ("inet", 1024, 65536)


def test_dump_ipset_prints_ipset_save_and_reads_back():
    sets = load_ipset(IPSET_SAVE)
    text = dump_ipset(list(sets.values()))
    assert text.splitlines()[:4] == [
        "create KUBE-LOOP-BACK hash:ip,port,ip family inet hashsize 1024 maxelem 65536",
        "add KUBE-LOOP-BACK 10.0.0.5,tcp:8080,10.0.0.5",
        "create KUBE-LOAD-BALANCER-SOURCE-CIDR hash:ip,port,net family inet hashsize 1024 maxelem 65536",
        "add KUBE-LOAD-BALANCER-SOURCE-CIDR 1.2.3.4,tcp:80,198.51.100.7",
    ]
    assert "create KUBE-NODE-PORT-TCP bitmap:port range 0-65535" in text
    again = load_ipset(text)
    assert {name: sorted(s.entries) for name, s in again.items()} == {name: sorted(s.entries) for name, s in sets.items()}
    assert dump_ipset(list(again.values())) == text


@pytest.mark.parametrize("text, line, field, message", [
    ("create A list:set\n", 1, "list:set", "unsupported set type 'list:set'"),
    ("create A hash:ip\ncreate A hash:ip\n", 2, "A", "already exists"),
    ("create A hash:ip family inet6\n", 1, "family", "only family inet"),
    ("create A hash:ip timeout 5\n", 1, "timeout", "not supported for hash:ip"),
    ("create A hash:ip counters\n", 1, "counters", "needs a value or is not supported"),
    ("create A hash:ip hashsize 0\n", 1, "hashsize", "1 to"),
    ("create A hash:ip maxelem 10 maxelem 20\n", 1, "maxelem", "twice"),
    ("create A hash:ip initval 12\n", 1, "initval", "hex"),
    ("create A bitmap:port\n", 1, "bitmap:port", "needs range"),
    ("create A bitmap:port range 10-5\n", 1, "range", "backwards"),
    ("create A bitmap:port range 0-65536\n", 1, "range", "out of range"),
    ("create A bitmap:port range 0-100 hashsize 64\n", 1, "hashsize", "not supported for bitmap:port"),
    ("create " + "N" * 32 + " hash:ip\n", 1, "N" * 32, "longer than 31"),
    ("create A\n", 1, "create", "needs a set name and a type"),
    ("add A 1.2.3.4\n", 1, "A", "no set named 'A'"),
    ("create A hash:ip,port\nadd A 1.2.3.4\n", 2, "1.2.3.4", "does not fit hash:ip,port (expected IP,PROTO:PORT)"),
    ("create A hash:ip,port\nadd A 1.2.3.4,icmp:0\n", 2, "1.2.3.4,icmp:0", "unsupported protocol 'icmp'"),
    ("create A hash:ip,port\nadd A 1.2.3.4,tcp:x\n", 2, "1.2.3.4,tcp:x", "not a port number"),
    ("create A hash:ip\nadd A 1.2.3.256\n", 2, "1.2.3.256", "not an IPv4 address"),
    ("create A hash:ip\nadd A 10.0.0.0/24\n", 2, "10.0.0.0/24", "ranges are not expanded"),
    ("create A hash:ip\nadd A 10.0.0.1\n\nadd A 10.0.0.1\n", 4, "10.0.0.1", "already in A"),
    ("create A hash:ip maxelem 1\nadd A 10.0.0.1\nadd A 10.0.0.2\n", 3, "10.0.0.2", "full"),
    ("create A hash:ip,port,net\nadd A 1.2.3.4,tcp:80,0.0.0.0/0\n", 2, "1.2.3.4,tcp:80,0.0.0.0/0", "/0"),
    ("create A bitmap:port range 1000-2000\nadd A 999\n", 2, "999", "outside A's range 1000-2000"),
    ("create A hash:ip\nadd A 10.0.0.1 timeout 5\n", 2, "timeout", "extensions are not supported"),
    ("create A hash:ip\ndel A 10.0.0.1\n", 2, "del", "unknown or unsupported command"),
])
def test_ipset_errors_name_the_line_and_field(text, line, field, message):
    error = error_of(load_ipset, text)
    assert (error.where, error.field) == (f"in.txt:{line}", field)
    assert message in error.message


# ---- the sectioned output ------------------------------------------------------------------------

def small_cluster(**config):
    svc = Service("ns1", "svc1", "LoadBalancer", "172.30.0.41", [ServicePort("p80", "tcp", 80, 80, 3001)],
                  external_ips=["192.168.99.11"], load_balancer_ips=["1.2.3.4"],
                  load_balancer_source_ranges=["203.0.113.0/25"])
    eps = EndpointSlice("ns1", "svc1-abc", "svc1", [EndpointPort("p80", "tcp", 80)],
                        [Endpoint("10.180.0.1", "node1"), Endpoint("10.180.0.2", "node2")])
    values = dict(mode="ipvs", cluster_cidr="10.0.0.0/8", node_ips=["192.168.0.2"])
    values.update(config)
    return Cluster([svc], [eps], [Node("node1", ["192.168.0.2"])], ProxyConfig(**values), node_name="node1")


def test_load_reads_every_section_of_the_writer_output():
    text = write(small_cluster(), IpvsWriterOptions(include_jump_rules=True))
    ruleset = load(text, "ipvs.txt")
    assert [(svc.addr, svc.port) for svc in ruleset.services] == [
        (ip("1.2.3.4"), 80), (ip("172.30.0.41"), 80), (ip("192.168.0.2"), 3001), (ip("192.168.99.11"), 80)]
    assert len(ruleset.ipsets) == 17
    assert ruleset.addresses == [ip("172.30.0.41"), ip("192.168.99.11"), ip("1.2.3.4")]
    assert "KUBE-IPVS-FILTER" in ruleset.iptables.chains("filter")
    assert ruleset.source == "ipvs.txt"


def test_address_section_takes_pasted_ip_addr_output():
    text = write(small_cluster()).replace(
        f"{SECTION_ADDRESSES}\n",
        f"{SECTION_ADDRESSES}\n5: kube-ipvs0: <BROADCAST,NOARP> mtu 1500 qdisc noop state DOWN group default\n"
        "    link/ether 6e:4a:5e:1c:9a:1b brd ff:ff:ff:ff:ff:ff\n"
        "    inet 10.96.0.1/32 scope global kube-ipvs0\n       valid_lft forever preferred_lft forever\n")
    assert load(text).addresses[0] == ip("10.96.0.1")
    assert dump_addresses([ip("10.96.0.1")]) == "inet 10.96.0.1/32 scope global kube-ipvs0\n"


def line_of(text, start):
    return next(number for number, line in enumerate(text.split("\n"), 1) if line.startswith(start))


def test_errors_carry_the_files_line_numbers_in_every_section():
    text = write(small_cluster())
    broken = text.replace("-a -t 172.30.0.41:80", "-a -t 172.30.0.99:80", 1)
    error = error_of(load, broken)
    assert error.where == f"in.txt:{line_of(broken, '-a -t 172.30.0.99:80')}"
    broken = text.replace("add KUBE-CLUSTER-IP 172.30.0.41,tcp:80", "add KUBE-CLUSTER-IP 172.30.0.41")
    assert error_of(load, broken).where == f"in.txt:{line_of(broken, 'add KUBE-CLUSTER-IP')}"
    broken = text.replace("-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ", "-A KUBE-LOAD-BALANCER -j NOWHERE")
    assert error_of(load, broken).where == f"in.txt:{line_of(broken, '-A KUBE-LOAD-BALANCER -j NOWHERE')}"
    broken = text.replace("inet 1.2.3.4/32", "inet 1.2.3.400/32")
    assert error_of(load, broken).where == f"in.txt:{line_of(broken, 'inet 1.2.3.400')}"


def test_a_rule_naming_a_set_that_is_not_there_is_refused():
    text = write(small_cluster())
    broken = "\n".join(line for line in text.split("\n") if not line.startswith("create KUBE-IPVS-IPS"))
    error = error_of(load, broken.replace("add KUBE-IPVS-IPS", "# add KUBE-IPVS-IPS"))
    assert "set 'KUBE-IPVS-IPS' is not in the ipset section" in error.message
    assert error.field == "--match-set"
    assert error.where == f"in.txt:{line_of(broken, '-A KUBE-IPVS-FILTER -m conntrack')}"


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace(SECTION_IPSET + "\n", ""), "missing section '# kpbench: ipset save'"),
    (lambda t: t + SECTION_IPSET + "\n", "appears twice"),
    (lambda t: t.replace(SECTION_IPTABLES, "# kpbench: nft list ruleset"), "unknown section"),
    (lambda t: "junk\n" + t, "line before the first section"),
])
def test_section_errors(edit, message):
    assert message in error_of(load, edit(write(small_cluster()))).message


def test_kube_ipvs0_lines_must_be_inet_lines():
    text = write(small_cluster()) + "inet6 ::1/128 scope host\n"
    assert "expected 'inet ADDRESS/PREFIX" in error_of(load, text).message
    text = write(small_cluster()) + "inet 172.30.0.41/32 scope global kube-ipvs0\n"
    assert "listed twice" in error_of(load, text).message


# ---- -m set, -m physdev and -m ipvs in the iptables loader -------------------------------------------

IPTABLES = """\
*nat
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
-A KUBE-SERVICES -m set ! --match-set KUBE-LOOP-BACK dst,dst,src -j ACCEPT
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP src,dst -m physdev ! --physdev-is-in --physdev-out eth+ -j ACCEPT
COMMIT
*filter
-A OUTPUT -s 1.2.3.4 -m ipvs --vaddr 1.2.3.4 --vproto tcp ! --vport 80 -j DROP
-A OUTPUT -m ipvs ! --ipvs -j DROP
-A OUTPUT -m ipvs --vaddr 10.0.0.0/8 -j DROP
COMMIT
"""


def payload(table, chain, number, match_index):
    offset = next(e.offset for e in table.entries if e.chain == chain and e.kind == "rule" and e.rule_number == number)
    at = offset + L.ENTRY_SIZE
    for _ in range(match_index):
        at += struct.unpack_from("<H", table.blob, at + L.X_SIZE)[0]
    kind, = struct.unpack_from("<B", table.blob, at + L.X_KIND)
    size, = struct.unpack_from("<H", table.blob, at + L.X_SIZE)
    return kind, size, at


def read(table, fmt, at):
    return struct.unpack_from("<" + fmt, table.blob, at)[0]


def test_match_set_lays_out_like_xt_set_info():
    nat = iptables.load(IPTABLES).tables["nat"]
    assert nat.set_names == ["KUBE-CLUSTER-IP", "KUBE-LOOP-BACK"]
    kind, size, at = payload(nat, "KUBE-SERVICES", 2, 0)
    assert (kind, size) == (L.MATCH_SET, 80)
    assert nat.set_names[read(nat, "H", at + L.SET_ID)] == "KUBE-LOOP-BACK"
    assert read(nat, "B", at + L.SET_DIM) == 3
    assert read(nat, "B", at + L.SET_FLAGS) == L.SET_INVERT | 1 << 3  # dimension 3 from the source
    kind, size, at = payload(nat, "KUBE-SERVICES", 3, 0)
    assert (read(nat, "H", at + L.SET_ID), read(nat, "B", at + L.SET_FLAGS)) == (0, 1 << 1)


def test_match_physdev_and_ipvs_fields():
    tables = iptables.load(IPTABLES).tables
    nat, filt = tables["nat"], tables["filter"]
    kind, size, at = payload(nat, "KUBE-SERVICES", 3, 1)
    assert (kind, size) == (L.MATCH_PHYSDEV, 104)
    assert read(nat, "B", at + L.PHYSDEV_BITMASK) == L.PHYSDEV_ISIN | L.PHYSDEV_OUT
    assert read(nat, "B", at + L.PHYSDEV_INVERT) == L.PHYSDEV_ISIN
    assert struct.unpack_from("<16s", nat.blob, at + L.PHYSDEV_OUT_NAME)[0].rstrip(b"\0") == b"eth"
    kind, size, at = payload(filt, "OUTPUT", 1, 0)
    assert (kind, size) == (L.MATCH_IPVS, 72)
    assert (read(filt, "I", at + L.IPVS_VADDR), read(filt, "I", at + L.IPVS_VMASK)) == (ip("1.2.3.4"), 0xFFFFFFFF)
    assert (read(filt, "H", at + L.IPVS_VPORT), read(filt, "B", at + L.IPVS_L4PROTO)) == (80, TCP)
    assert read(filt, "B", at + L.IPVS_BITMASK) == L.IPVS_PROPERTY | L.IPVS_PROTO | L.IPVS_ADDR | L.IPVS_PORT
    assert read(filt, "B", at + L.IPVS_INVERT) == L.IPVS_PORT


def test_set_physdev_and_ipvs_dump_as_iptables_save_prints_them():
    text = iptables.dump(iptables.load(IPTABLES))
    # The first three lines are what iptables-save v1.8.9 printed for these rules.
    assert "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT" in text
    assert "-A KUBE-SERVICES -m set ! --match-set KUBE-LOOP-BACK dst,dst,src -j ACCEPT" in text
    assert ("-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP src,dst -m physdev ! --physdev-is-in "
            "--physdev-out eth+ -j ACCEPT") in text
    assert "-A OUTPUT -s 1.2.3.4/32 -m ipvs --vproto 6 --vaddr 1.2.3.4 ! --vport 80 -j DROP" in text
    assert "-A OUTPUT -m ipvs ! --ipvs -j DROP" in text
    assert "-A OUTPUT -m ipvs --vaddr 10.0.0.0/8 -j DROP" in text
    assert iptables.dump(iptables.load(text)) == text


@pytest.mark.parametrize("rule, field, message", [
    ("-m set --match-set A dst,dst,dst,dst,dst,dst,dst", "--match-set", "1 to 6"),
    ("-m set --match-set A dst,to", "--match-set", "src or dst"),
    ("-m set --match-set A", "--match-set", "needs 2 arguments"),
    ("-m set --match-set " + "S" * 32 + " dst", "--match-set", "31 bytes"),
    ("-m set", "-m set", "needs --match-set"),
    ("-m set --return-nomatch", "--return-nomatch", "unknown option"),
    ("-m physdev", "-m physdev", "needs one of its options"),
    ("-m physdev --physdev-in a/b", "--physdev-in", "interface name"),
    ("-m ipvs", "-m ipvs", "needs --ipvs"),
    ("-m ipvs --vport 70000", "--vport", "out of range"),
    ("-m ipvs --vaddr 1.2.3", "--vaddr", "IPv4"),
    ("-m ipvs --vdir ORIGINAL", "--vdir", "unknown option"),
])
def test_new_matches_refuse_bad_options(rule, field, message):
    with pytest.raises(InputError) as error:
        iptables.load(f"*nat\n:A - [0:0]\n-A A -j ACCEPT {rule}\nCOMMIT\n", "in.txt")
    assert (error.value.where, error.value.field) == ("in.txt:3", field)
    assert message in error.value.message


# ---- fuzzing: only InputError escapes ------------------------------------------------------------------

WORDS = ["-A", "-a", "-t", "-u", "-f", "-r", "-s", "-p", "-m", "-g", "-i", "-w", "-b", "-M", "--sctp-service",
         "rr", "mh", "sh", "foo", "sh-port", "mh-port", "1", "0", "65536", "10.0.0.1:80", "10.0.0.2", "[::1]:80",
         "10.0.0.1:x", "255.255.255.0", "create", "add", "hash:ip", "hash:ip,port", "hash:ip,port,net",
         "bitmap:port", "range", "0-100", "family", "inet", "hashsize", "maxelem", "1.2.3.4,tcp:80",
         "1.2.3.4,tcp:80,10.0.0.0/8", "A", "B", "#", "", "ö", "1.2.3.4", "80", "tcp:70000", "0.0.0.0/0"]


def mutated(draw, text):
    """``text`` with a few lines changed: words dropped, swapped in, or lines moved."""
    lines = text.split("\n")
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(lines) - 1))
        words = lines[index].split(" ")
        action = draw(st.sampled_from(["drop", "insert", "replace", "move", "garble"]))
        position = draw(st.integers(0, len(words)))
        if action == "drop" and words:
            del words[min(position, len(words) - 1)]
        elif action in ("insert", "replace"):
            word = draw(st.sampled_from(WORDS))
            words[min(position, len(words) - 1):min(position, len(words) - 1) + (action == "replace")] = [word]
        elif action == "move":
            lines.insert(draw(st.integers(0, len(lines))), lines.pop(index))
            continue
        else:
            words.append(draw(st.text(max_size=8)))
        lines[index] = " ".join(words)
    return "\n".join(lines)


def only_input_errors(load_function, text):
    try:
        load_function(text, "fuzz")
    except InputError as error:
        assert error.where.startswith("fuzz")


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.data())
def test_fuzzed_ipvsadm_and_ipset_text_only_raises_input_errors(data):
    only_input_errors(load_ipvsadm, mutated(data.draw, IPVSADM_SAVE))
    only_input_errors(load_ipset, mutated(data.draw, IPSET_SAVE))


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.lists(st.lists(st.sampled_from(WORDS), max_size=8).map(" ".join), max_size=6).map("\n".join))
def test_word_soup_only_raises_input_errors(text):
    only_input_errors(load_ipvsadm, text)
    only_input_errors(load_ipset, text)


WRITTEN = write(small_cluster(), IpvsWriterOptions(include_jump_rules=True))


@settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_sectioned_output_only_raises_input_errors(data):
    only_input_errors(load, mutated(data.draw, WRITTEN))


@settings(max_examples=100, derandomize=True, deadline=None)
@given(st.sampled_from(["dst", "src", "src,dst", "dst,dst,src", "dst,", ",", "x", ""]), st.booleans(),
       st.sampled_from(["--physdev-is-in", "--physdev-is-out", "--physdev-is-bridged", "--physdev-in", ""]),
       st.sampled_from(["--ipvs", "--vproto 6", "--vaddr 1.2.3.4/24", "--vport 80", "--vport", ""]))
def test_fuzzed_new_matches_only_raise_input_errors(directions, invert, physdev, ipvs):
    rule = f"-m set {'! ' if invert else ''}--match-set S {directions} -m physdev {physdev} -m ipvs {ipvs}"
    try:
        loaded = iptables.load(f"*filter\n-A INPUT {rule} -j DROP\nCOMMIT\n")
    except InputError:
        return
    text = iptables.dump(loaded)
    assert iptables.dump(iptables.load(text)) == text
