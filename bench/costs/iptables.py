"""iptables mode's cost model: the kernel memory a loaded ruleset takes, and what a sync costs.

Memory follows kernel-internals §1.1: the table blob itself (entries at real struct sizes),
16 bytes of per-CPU counters per entry per CPU, and a per-CPU jump stack of
``8 B × stacksize × 2``. A sync replaces whole tables (IPT_SO_SET_REPLACE), so its kernel work
is proportional to the entries of every table it touches, however small the change
(kernel-internals §1.7: ``a + b·entries``). The constants are estimates of that kernel work
(translate_table's checks, match and target lookups, per-CPU counter allocation, freeing the
old table), not measurements: about a microsecond per entry.
"""
from __future__ import annotations

from dataclasses import dataclass

from kernels.blob import CompiledTable

REPLACE_BASE_SECONDS = 0.5e-3  # a table replacement's fixed cost: sockopt, locks, swap
REPLACE_SECONDS_PER_ENTRY = 1e-6  # translate_table, find_check_entry, counters, per entry
COUNTER_BYTES = 16  # struct xt_counters, per entry per possible CPU
JUMPSTACK_SLOT_BYTES = 8  # one pointer per slot; the kernel allocates stacksize × 2 slots


@dataclass(frozen=True)
class TableMemory:
    table: str
    entries: int
    blob_bytes: int
    counter_bytes: int
    jumpstack_bytes: int

    @property
    def total(self) -> int:
        return self.blob_bytes + self.counter_bytes + self.jumpstack_bytes


def table_memory(table: CompiledTable, n_cpus: int) -> TableMemory:
    return TableMemory(
        table=table.name,
        entries=table.n_entries,
        blob_bytes=int(table.blob.nbytes),
        counter_bytes=COUNTER_BYTES * table.n_entries * n_cpus,
        jumpstack_bytes=JUMPSTACK_SLOT_BYTES * table.stacksize * 2 * n_cpus,
    )


def kernel_bytes(tables: dict[str, CompiledTable], n_cpus: int) -> int:
    """Modelled kernel memory of all tables on a node with ``n_cpus`` possible CPUs."""
    return sum(table_memory(t, n_cpus).total for t in tables.values())


def sync_entries(tables: dict[str, CompiledTable]) -> int:
    """Entries the kernel translates and checks when the tables are replaced (§1.7)."""
    return sum(t.n_entries for t in tables.values())


def replaced_tables(payload: str) -> list[str]:
    """The tables an iptables-restore payload names: each one is replaced whole."""
    return [line[1:].strip() for line in payload.splitlines() if line.startswith("*")]


def replace_entries(tables: dict[str, CompiledTable], payload: str) -> int:
    """Entries the kernel checks to replace the tables ``payload`` names, after loading it."""
    return sum(tables[name].n_entries for name in replaced_tables(payload) if name in tables)


def replace_seconds(tables: dict[str, CompiledTable], payload: str) -> float:
    """Modelled kernel time of the table replacements a payload causes (see the constants)."""
    named = [name for name in replaced_tables(payload) if name in tables]
    return len(named) * REPLACE_BASE_SECONDS + REPLACE_SECONDS_PER_ENTRY * replace_entries(tables, payload)
