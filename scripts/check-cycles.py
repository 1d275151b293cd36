#!/usr/bin/env python3
"""Finds dependency cycles between sibling modules of every workspace crate.

Each file under a crate's src/ is one module (src/lib.rs and src/main.rs are the crate root,
src/a.rs and src/a/mod.rs are `a`, src/a/b.rs is `a::b`). Every `crate::...` and `super::...`
path in it (grouped `use` trees included) that names a module of the crate gives an edge,
collapsed to sibling granularity: between top-level modules (`config -> proxmox`), and one
level down between the children of one top-level module (`db::store -> db::incidents`).
References inside one module, from a parent to its children and from children to their
parent are not edges. `#[cfg(test)]` modules are left out. Called by scripts/check-cycles.sh.

Usage: check-cycles.py [--root WORKSPACE]
Exit status: 0 without cycles, 1 with cycles, 2 on a usage or input error.
"""

import argparse
import collections
import glob
import os
import re
import sys
import tomllib

# Depth of the sibling graphs: 1 = top-level modules only, 2 = also siblings inside each.
MAX_DEPTH = 2


def workspace_crates(root):
    """(package name, crate dir) of every workspace member that has a src/ folder."""
    with open(os.path.join(root, "Cargo.toml"), "rb") as f:
        manifest = tomllib.load(f)
    workspace = manifest.get("workspace", {})
    excluded = {os.path.normpath(os.path.join(root, e)) for e in workspace.get("exclude", [])}
    dirs = []
    if "package" in manifest:
        dirs.append(root)
    for pattern in workspace.get("members", []):
        dirs.extend(sorted(glob.glob(os.path.join(root, pattern))))
    crates = []
    seen = set()
    for d in dirs:
        d = os.path.normpath(d)
        cargo_toml = os.path.join(d, "Cargo.toml")
        if d in seen or d in excluded or not os.path.isfile(cargo_toml):
            continue
        seen.add(d)
        if not os.path.isdir(os.path.join(d, "src")):
            continue
        with open(cargo_toml, "rb") as f:
            name = tomllib.load(f).get("package", {}).get("name", os.path.basename(d))
        crates.append((name, d))
    return crates


def module_of(rel):
    """Module path of a file relative to src/, or None for files outside the library tree."""
    parts = rel.split(os.sep)
    if parts[0] == "bin":  # src/bin/*: separate binary crates
        return None
    if len(parts) == 1 and parts[0] in ("lib.rs", "main.rs"):
        return ()
    stem = parts[-1][: -len(".rs")]
    if stem == "mod":
        return tuple(parts[:-1])
    return tuple(parts[:-1]) + (stem,)


def blank_comments_and_strings(text):
    """Replaces comments and string/char literals by spaces, keeping newlines and offsets."""
    out = list(text)
    n = len(text)
    i = 0

    def blank(a, b):
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    def ident_char(c):
        return c.isalnum() or c == "_"

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j)
            i = j
        elif c in "rb" and (i == 0 or not ident_char(text[i - 1])) and (
            m := re.match(r'(?:br|rb|r)(#*)"', text[i:i + 260])
        ):
            # Raw string: r"..", r#".."#, br"..".
            close = '"' + m.group(1)
            j = text.find(close, i + m.end())
            j = n if j < 0 else j + len(close)
            blank(i, j)
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            blank(i, j + 1)
            i = j + 1
        elif c == "'":
            # A char literal ('x', '\n', '\u{1F600}') or else a lifetime ('a).
            if text.startswith("\\", i + 1):
                j = text.find("'", i + 2)
                j = n if j < 0 else j
                blank(i, j + 1)
                i = j + 1
            elif i + 2 < n and text[i + 2] == "'":
                blank(i, i + 3)
                i += 3
            else:
                i += 1
        else:
            i += 1
    return "".join(out)


CFG_TEST_MOD = re.compile(
    r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]\s*"  # #[cfg(test)]
    r"(?:#\s*\[[^\]]*\]\s*)*"  # further attributes
    r"(?:pub\s*(?:\([^)]*\))?\s*)?"  # visibility
    r"mod\s+(?:r#)?(\w+)\s*([{;])"
)


def drop_test_modules(code):
    """Blanks `#[cfg(test)] mod x { ... }` blocks; returns the code and the names of
    `#[cfg(test)] mod x;` declarations (test-only files)."""
    test_files = set()
    out = list(code)
    for m in CFG_TEST_MOD.finditer(code):
        if m.group(2) == ";":
            test_files.add(m.group(1))
            continue
        depth, j = 0, m.end() - 1
        while j < len(code):
            if code[j] == "{":
                depth += 1
            elif code[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        for k in range(m.start(), min(j + 1, len(code))):
            if out[k] != "\n":
                out[k] = " "
    return "".join(out), test_files


IDENT = re.compile(r"\s*(?:r#)?([A-Za-z_]\w*)")
SEP = re.compile(r"\s*::")
AS_ALIAS = re.compile(r"\s+as\s+(?:r#)?\w+")
PATH_START = re.compile(r"(?<![\w:])\$?(crate|super)\s*::")


def parse_tree(code, pos):
    """Parses a path or `use` tree at pos; returns (list of segment lists, end)."""
    segments = []
    while True:
        m = IDENT.match(code, pos)
        if m:
            name = m.group(1)
            pos = m.end()
            if name != "self":
                segments.append(name)
            s = SEP.match(code, pos)
            if not s:
                alias = AS_ALIAS.match(code, pos)  # `x as y`: the alias is no path
                return [segments], alias.end() if alias else pos
            pos = s.end()
            continue
        stripped = code[pos:].lstrip()
        pos = len(code) - len(stripped)
        if stripped.startswith("*"):
            return [segments], pos + 1
        if stripped.startswith("{"):
            pos += 1
            paths = []
            while True:
                sub, pos = parse_tree(code, pos)
                paths.extend(segments + p for p in sub)
                rest = code[pos:].lstrip()
                pos = len(code) - len(rest)
                if rest.startswith(","):
                    pos += 1
                    continue
                if rest.startswith("}"):
                    pos += 1
                break
            return paths, pos
        return [segments], pos


def references(code, module):
    """(target path below the crate root, offset) of every crate::/super:: path."""
    found = []
    pos = 0
    while m := PATH_START.search(code, pos):
        base = [] if m.group(1) == "crate" else list(module[:-1])
        paths, end = parse_tree(code, m.end())
        for p in paths:
            target = list(base)
            for seg in p:
                if seg == "super" and not target:
                    break  # out of the crate: not ours to judge
                if seg == "super":
                    target.pop()
                elif seg == "crate":
                    target = []
                else:
                    target.append(seg)
            else:
                found.append((tuple(target), m.start()))
        pos = max(end, m.end())
    return found


def resolve(target, modules):
    """The longest prefix of target that is a module of the crate."""
    for k in range(len(target), 0, -1):
        if target[:k] in modules:
            return target[:k]
    return ()


def sibling_edge(src, dst):
    """(parent, from child, to child) for a reference src -> dst, or None."""
    k = 0
    while k < min(len(src), len(dst)) and src[k] == dst[k]:
        k += 1
    if k >= len(src) or k >= len(dst) or k >= MAX_DEPTH:
        return None  # the same module, or parent and child, or deeper than we look
    return src[:k], src[: k + 1], dst[: k + 1]


def crate_edges(crate_dir):
    """{parent: {(a, b): [example 'file:line', ...]}} for one crate."""
    src = os.path.join(crate_dir, "src")
    files = {}
    for path in sorted(glob.glob(os.path.join(src, "**", "*.rs"), recursive=True)):
        module = module_of(os.path.relpath(path, src))
        if module is not None:
            files[path] = module
    modules = set()
    for module in files.values():
        for k in range(1, len(module) + 1):
            modules.add(module[:k])
    parsed = {}
    test_only = set()
    for path, module in files.items():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        code, test_files = drop_test_modules(blank_comments_and_strings(text))
        parsed[path] = code
        test_only.update(module + (name,) for name in test_files)
    edges = collections.defaultdict(lambda: collections.defaultdict(list))
    for path, module in files.items():
        if any(module[:k] in test_only for k in range(1, len(module) + 1)):
            continue
        code = parsed[path]
        for target, offset in references(code, module):
            dst = resolve(target, modules)
            edge = sibling_edge(module, dst)
            if edge:
                parent, a, b = edge
                line = code.count("\n", 0, offset) + 1
                edges[parent][(a, b)].append(f"{os.path.relpath(path)}:{line}")
    return edges


def strongly_connected(nodes, succ):
    """Tarjan's algorithm, iterative; returns the components."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(succ[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(succ[w])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    comps.append(comp)
    return comps


def shortest_path(succ, start, goal, allowed):
    prev = {start: None}
    queue = collections.deque([start])
    while queue:
        v = queue.popleft()
        if v == goal:
            path = []
            while v is not None:
                path.append(v)
                v = prev[v]
            return path[::-1]
        for w in succ[v]:
            if w in allowed and w not in prev:
                prev[w] = v
                queue.append(w)
    return None


def cycles(edge_map):
    """(component, cycles) for every strongly connected component of more than one module;
    its cycles, shortest first, together cover every edge inside it."""
    succ = collections.defaultdict(list)
    nodes = set()
    for a, b in sorted(edge_map):
        succ[a].append(b)
        nodes.update((a, b))
    found = []
    for comp in strongly_connected(sorted(nodes), succ):
        if len(comp) < 2:
            continue
        members = set(comp)
        covered, comp_cycles = set(), []
        for a, b in sorted(e for e in edge_map if e[0] in members and e[1] in members):
            if (a, b) in covered:
                continue
            back = shortest_path(succ, b, a, members)
            cycle = [a] + back  # a -> b -> ... -> a
            start = cycle.index(min(cycle[:-1]))
            cycle = cycle[start:-1] + cycle[:start] + [cycle[start]]
            covered.update(zip(cycle, cycle[1:]))
            comp_cycles.append(cycle)
        found.append((sorted(comp), sorted(comp_cycles, key=lambda c: (len(c), c))))
    return sorted(found)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.join(os.path.dirname(__file__), ".."))
    args = parser.parse_args()
    root = os.path.abspath(args.root)
    os.chdir(root)
    crates = workspace_crates(root)
    if not crates:
        print(f"error: no workspace crates with a src/ folder under {root}", file=sys.stderr)
        return 2
    total = 0
    for name, crate_dir in crates:
        for parent, edge_map in sorted(crate_edges(crate_dir).items()):
            for comp, comp_cycles in cycles(edge_map):
                names = ", ".join("::".join(m) for m in comp)
                print(f"{name}: these modules depend on each other in circles: {names}")
                for cycle in comp_cycles:
                    total += 1
                    print(f"{name}: " + " -> ".join("::".join(m) for m in cycle))
                    for a, b in zip(cycle, cycle[1:]):
                        examples = edge_map[(a, b)]
                        more = f" (+{len(examples) - 1} more)" if len(examples) > 1 else ""
                        print(f"    {'::'.join(a)} -> {'::'.join(b)}: {examples[0]}{more}")
    if total:
        print(f"FAIL: {total} module cycle(s); each edge listed lies on a cycle")
        return 1
    print(f"ok: no module cycles in {len(crates)} crates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
