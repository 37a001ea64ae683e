"""The control-flow check that Linux before 6.2 runs before it verifies a
program (check_cfg), on the program's bytes: a depth-first walk that
refuses an edge back to an instruction still on the walk's stack when the
edge is a fall-through (after an ordinary instruction or a call); a jump's
edge back is a bounded loop the later kernels allow. Clang may enter a
loop in its middle, which turns its back-edge into a fall-through."""

from __future__ import annotations

import struct

_INSTRUCTION = struct.Struct("<BBhi")  # opcode, registers, offset, immediate
_LOAD_IMM64 = 0x18                      # two instruction slots
_JMP, _JMP32 = 0x05, 0x06


def _successors(program: list[tuple[int, int, int, int]], at: int) -> list[tuple[int, bool]]:
    """(next instruction, is a jump's edge) for each way out of `at`."""
    opcode, _, offset, immediate = program[at]
    if opcode == _LOAD_IMM64:
        return [(at + 2, False)]
    if opcode & 0x07 not in (_JMP, _JMP32):
        return [(at + 1, False)]
    operation = opcode & 0xF0
    if operation == 0x90:   # exit
        return []
    if operation == 0x80:   # call
        return [(at + 1, False)]
    if operation == 0x00:   # ja (its 32-bit form keeps the offset in the immediate)
        return [(at + 1 + (immediate if opcode & 0x07 == _JMP32 else offset), True)]
    return [(at + 1, True), (at + 1 + offset, True)]


def refused_back_edges(code: bytes) -> list[tuple[int, int]]:
    """The fall-through back-edges (from, to) Linux 6.1 refuses."""
    program = [_INSTRUCTION.unpack_from(code, at) for at in range(0, len(code), 8)]
    on_stack, done = set(), set()
    refused = []
    stack = [(0, iter(_successors(program, 0)))]
    on_stack.add(0)
    while stack:
        at, ways = stack[-1]
        for to, jump in ways:
            if to in on_stack:
                if not jump:
                    refused.append((at, to))
            elif to not in done:
                on_stack.add(to)
                stack.append((to, iter(_successors(program, to))))
                break
        else:
            stack.pop()
            on_stack.discard(at)
            done.add(at)
    return refused
