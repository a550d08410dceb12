# C views of kernels/layout.py's PACKET_DTYPE and RESULT_DTYPE, so that numpy batches reach the
# kernels as typed memoryviews (packet_t[::1]). Packed like the dtypes; tests/test_kernels.py
# checks sizes and field offsets against them (kernels.iptables.struct_layout()).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef packed struct packet_t:
    uint32_t src
    uint32_t dst
    uint16_t sport
    uint16_t dport
    uint8_t proto
    uint8_t pad0
    uint16_t ctstate
    uint32_t mark
    uint32_t length
    uint32_t time
    char iif[16]
    char oif[16]

cdef packed struct result_t:
    uint8_t verdict
    uint8_t pad0
    uint16_t dnat_port
    uint32_t dnat_ip
    uint32_t mark
    uint32_t entries_visited
    uint32_t match_calls
    uint32_t target_calls
    uint32_t jumps
    uint32_t rng_draws
    uint64_t bytes_touched
    uint32_t set_probes
    uint32_t set_compares
