"""What a SLURM job tells its tasks through the environment, as plain values.

The rendezvous needs no shared file: every task of a job sees the same node list and job id,
so each can compute the same master address (the first node) and port (from the job id) on
its own, and a requeued job (same id, maybe other nodes) computes them again on start.
"""
from __future__ import annotations

import itertools
import os
import re

# Below Linux's ephemeral range (32768+), so an outgoing connection cannot hold the port;
# jobs whose ids differ by less than the span never collide on a shared node.
PORT_BASE = 15000
PORT_SPAN = 15000

# SLURM refuses a bracket range wider than this; the same cap keeps a typo such as
# 'n[0-999999999]' from expanding into memory.
MAX_RANGE = 64 * 1024

_BRACKET = re.compile(r"(\[[^\[\]]*\])")
_DIGITS = re.compile(r"[0-9]+")


def expand_hostlist(nodelist: str) -> list[str]:
    """Every host of a SLURM host list, in SLURM's order.

    'a[1-2]-b[01-02],c' → a1-b01, a1-b02, a2-b01, a2-b02, c: several bracket groups, text
    after a group, comma lists inside brackets and between names, zero padding kept.
    """
    return list(_hostnames(_parse_hostlist(nodelist)))


def first_node(nodelist: str) -> str:
    """First host of a compressed SLURM node list: 'rack[1-2]-node[01-04]' → 'rack1-node01'."""
    # The whole list is parsed (so a malformed tail is still an error) but only one host is made.
    return next(_hostnames(_parse_hostlist(nodelist)))


def _hostnames(patterns: list[list[tuple[str, ...]]]):
    # The first bracket group varies slowest, as scontrol show hostnames lists them.
    for pieces in patterns:
        for parts in itertools.product(*pieces):
            yield "".join(parts)


def _parse_hostlist(nodelist: str) -> list[list[tuple[str, ...]]]:
    """Each host expression as pieces: a literal is a 1-tuple, a bracket group its numbers."""
    try:
        patterns = [_parse_expression(expr) for expr in _split_top_level(nodelist)]
    except ValueError as err:
        raise ValueError(f"cannot read SLURM node list '{nodelist}': {err}") from None
    if not patterns:
        raise ValueError(f"cannot read SLURM node list '{nodelist}': it names no host")
    return patterns


def _split_top_level(nodelist: str) -> list[str]:
    """Split at commas and blanks outside brackets: 'a[1,3],b' → 'a[1,3]', 'b'."""
    words, start, inside = [], 0, False
    for i, char in enumerate(nodelist + ","):
        if char == "[":
            if inside:
                raise ValueError("brackets do not nest")
            inside = True
        elif char == "]":
            inside = False
        elif char in ", \t\n" and not inside:
            words.append(nodelist[start:i])
            start = i + 1
    if inside:
        raise ValueError("a '[' is never closed")
    return [w for w in words if w]


def _parse_expression(expr: str) -> list[tuple[str, ...]]:
    pieces = []
    for i, text in enumerate(_BRACKET.split(expr)):
        if i % 2 == 1:
            pieces.append(_parse_ranges(text[1:-1]))
        elif "[" in text or "]" in text:
            raise ValueError(f"unmatched bracket in '{expr}'")
        elif text:
            pieces.append((text,))
    return pieces


def _parse_ranges(spec: str) -> tuple[str, ...]:
    """'01-03,7' → ('01', '02', '03', '7'): a range is as wide as its first number's text."""
    numbers = []
    for part in spec.split(","):
        lo, dash, hi = part.partition("-")
        hi = hi if dash else lo
        if not (_DIGITS.fullmatch(lo) and _DIGITS.fullmatch(hi)) or int(lo) > int(hi):
            raise ValueError(f"'{part}' is not a number or a rising range like 01-04")
        if int(hi) - int(lo) >= MAX_RANGE:
            raise ValueError(f"range '{part}' has more than {MAX_RANGE} hosts")
        numbers.extend(f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1))
    return tuple(numbers)


def port_for_job(job_id: str | int) -> int:
    digits = re.sub(r"\D", "", str(job_id))  # submitit writes array tasks as 1234_5
    if not digits:
        raise ValueError(f"cannot derive a port from SLURM job id '{job_id}'")
    return PORT_BASE + int(digits) % PORT_SPAN


def slurm_job_id() -> str | None:
    """The job id (each array task has its own); None outside SLURM."""
    return os.environ.get("SLURM_JOB_ID") or None


def slurm_restart_count() -> int:
    """How many times this job was requeued; SLURM leaves it unset on the first run."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def slurm_rendezvous() -> tuple[str, int] | None:
    """(master address, port) for a multi-task SLURM job, or None outside one."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    job_id = slurm_job_id()
    if not nodelist or not job_id or "SLURM_PROCID" not in os.environ:
        return None
    return first_node(nodelist), port_for_job(job_id)


def under_slurm() -> bool:
    return slurm_job_id() is not None
