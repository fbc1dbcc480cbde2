#!/usr/bin/env python3
"""Layering checks over the Rust sources (docs/architecture.md):

- no import circle between the top-level modules of a crate: module A uses
  B when a file of A names `crate::B` (or `super::B` from A's root file);
- the agent's modules in layers (docs/architecture.md): a module uses only
  modules of its own layer or below, and every module has a layer;
- no source file over 800 lines outside tests, no function over 100 lines.

Prints every circle and every oversize item, and exits 1 if there is one.
`--allow FILE` names known debts (one `circle: crate: a b c`, `file: path` or
`fn: path::name` per line) that are reported but do not fail; a listed debt
that is no longer there fails too, so the list only shrinks.
"""

import argparse
import re
import sys
from pathlib import Path

CRATES = {"agent": "agent/src", "vmm": "vmm/src", "proto": "proto/src"}
# The agent's layers, lowest first (docs/architecture.md).
AGENT_LAYERS = [
    ["config", "root_lock", "host", "names", "notify", "cloud_init"],
    ["spec"],
    ["store", "images", "usage", "entitlement", "cgroups", "jail"],
    ["vmm_proc"],
    ["manager"],
    ["server", "api_guard", "metrics", "doctor", "fuzzing"],
]
LAYERS = {"agent": AGENT_LAYERS}
MAX_FILE_LINES = 800
MAX_FN_LINES = 100


def top_module(src: Path, path: Path) -> str:
    rel = path.relative_to(src)
    if rel.parts[0] == "bin" or rel.name in ("lib.rs", "main.rs") and len(rel.parts) == 1:
        return ""
    return rel.parts[0].removesuffix(".rs")


def strip_tests(text: str) -> str:
    """The text before a `#[cfg(test)]` module, which holds only tests."""
    m = re.search(r"^#\[cfg\(test\)\]\s*\nmod tests\b", text, re.M)
    return text[: m.start()] if m else text


def is_test_file(path: Path) -> bool:
    return path.name == "tests.rs" or "tests" in path.parts[:-1]


def module_graph(src: Path) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    modules = {top_module(src, p) for p in src.rglob("*.rs")} - {""}
    for path in src.rglob("*.rs"):
        me = top_module(src, path)
        if not me or is_test_file(path):
            continue
        text = strip_tests(path.read_text())
        used = set(re.findall(r"\bcrate::(\w+)", text))
        if path.parent == src:  # `super::x` from a crate-root child file
            used |= set(re.findall(r"\bsuper::(\w+)", text))
        # `use crate::{a, b::c}`
        for group in re.findall(r"\bcrate::\{([^}]*)\}", text):
            used |= {g.strip().split("::")[0] for g in group.split(",") if g.strip()}
        graph.setdefault(me, set()).update(u for u in used if u in modules and u != me)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_violations(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    """Uses of a higher layer's module, and modules in no layer."""
    rank = {m: i for i, layer in enumerate(layers) for m in layer}
    out = []
    for module in sorted(graph):
        if module not in rank:
            out.append(f"{module} is in no layer")
            continue
        for used in sorted(graph[module]):
            if rank.get(used, -1) > rank[module]:
                out.append(f"{module} uses {used}, a layer above it")
    return out


FN_START = re.compile(r"^(\s*)(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")


def long_functions(path: Path) -> list[tuple[str, int]]:
    """Functions whose body spans more than MAX_FN_LINES lines."""
    lines = strip_tests(path.read_text()).splitlines()
    out = []
    i = 0
    while i < len(lines):
        m = FN_START.match(lines[i])
        if not m:
            i += 1
            continue
        indent, name = m.group(1), m.group(7)
        # The body ends at the first line that closes at the same indent.
        j = i + 1
        while j < len(lines) and not re.match(rf"^{indent}\}}", lines[j]):
            if re.match(rf"^{indent}\S", lines[j]) and lines[j].rstrip().endswith(";"):
                break  # a declaration without a body (trait method)
            j += 1
        if j - i + 1 > MAX_FN_LINES:
            out.append((name, j - i + 1))
        i += 1
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--allow", type=Path)
    args = ap.parse_args()
    allowed = set()
    if args.allow:
        allowed = {
            line.split("#")[0].strip()
            for line in args.allow.read_text().splitlines()
            if line.split("#")[0].strip()
        }
    failures = debts = 0
    seen = set()

    def report(key: str, message: str) -> None:
        nonlocal failures, debts
        seen.add(key)
        if key in allowed:
            debts += 1
            print(f"known debt: {message}")
        else:
            failures += 1
            print(f"FAIL: {message}")

    for crate, src in CRATES.items():
        src = Path(src)
        for comp in circles(module_graph(src)):
            report(
                f"circle: {crate}: {' '.join(comp)}", f"{crate}: import circle {' ↔ '.join(comp)}"
            )
        for v in (
            layer_violations(module_graph(src), LAYERS.get(crate, [])) if crate in LAYERS else []
        ):
            report(f"layer: {crate}: {v}", f"{crate}: {v}")
        for path in sorted(src.rglob("*.rs")):
            if is_test_file(path):
                continue
            n = len(strip_tests(path.read_text()).splitlines())
            if n > MAX_FILE_LINES:
                report(f"file: {path}", f"{path}: {n} lines (at most {MAX_FILE_LINES})")
            for name, length in long_functions(path):
                report(
                    f"fn: {path}::{name}",
                    f"{path}: fn {name} is {length} lines (at most {MAX_FN_LINES})",
                )
    for key in sorted(allowed - seen):
        failures += 1
        print(f"FAIL: {key!r} is paid: remove it from {args.allow}")
    print(f"check-modules: {failures} new problem(s), {debts} known debt(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
