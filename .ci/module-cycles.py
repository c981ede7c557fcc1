#!/usr/bin/env python3
"""Lists each crate's module imports and fails if any modules import each
other in a cycle.

A module is a source file (`src/llama/step.rs` is `llama::step`,
`src/llama/mod.rs` is `llama`, `src/lib.rs` or `src/main.rs` is the root).
An edge A -> B is a path in A's code that names B: `use crate::b::..`,
`crate::b::..` anywhere, `super::..` and `self::..` resolved from A's
place, and in the root a bare `b::..`. A name the root re-exports
(`pub use b::Item`) leads to the module it comes from; any other item of
the root leads to the root. Two kinds of naming are not edges: a module
naming its own submodules (a parent declares its children; a child's
`impl` blocks on its parent's types are one module in several files),
and the root's `mod` and `pub use` lines (a table of contents). Comments
are skipped.

    .ci/module-cycles.py           check every crate, print the cycles
    .ci/module-cycles.py --edges   also print every edge
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_of(src: Path, path: Path) -> tuple:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "mod":
        parts.pop()
    if parts in (["lib"], ["main"]):
        return ()
    return tuple(parts)


def modules(src: Path) -> dict:
    return {module_of(src, p): p for p in sorted(src.rglob("*.rs"))}


def strip_comments(text: str) -> str:
    """The code without comments and without inline `mod name { .. }`
    blocks (unit tests), whose `super` is the file's own module."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = "\n".join(line.split("//")[0] for line in text.splitlines())
    while (found := re.search(r"\bmod\s+\w+\s*\{", text)) :
        depth, end = 0, found.end() - 1
        for end in range(found.end() - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                break
        text = text[: found.start()] + text[end + 1 :]
    return text


def resolve(known: set, start: tuple) -> tuple:
    """The longest known module that `start` (a module path, maybe followed
    by item names) begins with."""
    for n in range(len(start), 0, -1):
        if start[:n] in known:
            return start[:n]
    return ()


def reexports(text: str) -> dict:
    """The names the root re-exports, and the module each comes from."""
    names = {}
    for use in re.findall(r"\bpub\s+use\s+([^;]+);", text, flags=re.S):
        use = re.sub(r"\s+", "", use)
        head, _, group = use.partition("{")
        head = head.removeprefix("crate::").rstrip(":")
        items = group.rstrip("}").split(",") if group else [head.rsplit("::", 1)[-1]]
        module = tuple(p for p in head.split("::") if p)
        if not group:
            module = module[:-1]
        for item in items:
            item = item.split("::")[-1].split(" as ")[-1]
            if item and module:
                names[item] = module
    return names


def edges(src: Path) -> dict:
    found = modules(src)
    known = set(found)
    graph = {m: set() for m in found}
    root_file = found.get(())
    exported = reexports(root_file.read_text()) if root_file else {}
    for module, path in found.items():
        text = strip_comments(path.read_text())
        if module == ():
            # The table of contents is not an edge.
            text = re.sub(r"\bpub\s+use\s+[^;]+;", "", text, flags=re.S)
            text = re.sub(r"\b(pub(\([^)]*\))?\s+)?mod\s+\w+\s*;", "", text)
            for child in sorted(m for m in known if len(m) == 1):
                if re.search(r"(?<![:\w])" + child[0] + r"::", text):
                    graph[()].add(child)
        # `use` statements may group paths: expand one level of braces.
        targets = []
        for use in re.findall(r"\buse\s+([^;]+);", text, flags=re.S):
            use = re.sub(r"\s+", "", use)
            head, _, group = use.partition("{")
            if group:
                for item in group.rstrip("}").split(","):
                    targets.append(head + item.split("{")[0])
            else:
                targets.append(use)
        targets += re.findall(r"\b((?:crate|super|self)(?:::\w+)+)", text)
        for target in targets:
            segments = [s for s in target.split("::") if s]
            if not segments:
                continue
            base = module if path.name == "mod.rs" or module == () else module
            if segments[0] == "crate":
                absolute = tuple(segments[1:])
            elif segments[0] in ("super", "self"):
                current = list(base)
                # A file `a/b.rs` is module a::b; its super is a.
                while segments and segments[0] in ("super", "self"):
                    if segments[0] == "super" and current:
                        current.pop()
                    segments = segments[1:]
                absolute = tuple(current) + tuple(segments)
            else:
                continue
            other = resolve(known, absolute)
            if other == () and absolute:
                # An item of the root: re-exported from a module, or the
                # root's own.
                other = exported.get(absolute[0], ())
            if other == module or (other == () and module == ()):
                continue
            # A module naming its own submodule is its parent declaring it.
            if module != () and other[: len(module)] == module:
                continue
            graph[module].add(other)
    return graph


def cycles(graph: dict) -> list:
    """Every elementary cycle's nodes, found by depth-first search (the
    graphs are small)."""
    found = []
    seen = set()

    def walk(node, stack):
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                cycle = stack[stack.index(nxt):]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    found.append(cycle + [nxt])
            elif len(stack) < 12:
                walk(nxt, stack + [nxt])

    for start in sorted(graph):
        walk(start, [start])
    return found


def name(module: tuple) -> str:
    return "::".join(module) or "(root)"


def main() -> int:
    show = "--edges" in sys.argv
    bad = 0
    for manifest in sorted((ROOT / "crates").glob("*/Cargo.toml")):
        src = manifest.parent / "src"
        graph = edges(src)
        count = sum(len(v) for v in graph.values())
        loops = cycles(graph)
        print(f"{manifest.parent.name}: {len(graph)} modules, {count} edges, {len(loops)} cycles")
        if show:
            for module in sorted(graph):
                for other in sorted(graph[module]):
                    print(f"    {name(module)} -> {name(other)}")
        for loop in loops:
            bad += 1
            print("    cycle: " + " -> ".join(name(m) for m in loop))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
