"""Griffe extension: render the docstrings, written for ``help()`` and doctest, as the site's markdown.

- Sphinx roles (``:class:`~binom_opt.Options```) become mkdocstrings cross-references
  (``[`Options`][binom_opt.Options]``), which the strict build checks: a target that does not exist
  fails it. A role naming an internal object (the ``binom_opt.core`` modules, private functions), which the
  reference does not document, stays as code.
- ``docs/design.md`` becomes a link to the Design page.
- Doctest blocks become ``pycon`` code blocks, so their output (``[[0, 2, 4], [1, 3]]``) is not read as
  markdown. A block under a heading line (``Example:``) stays inside that heading's indented body; one
  indented below a paragraph moves to the paragraph's indentation, since markdown would otherwise
  take its fence for code.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|exc|data|obj):`(~?)([^`]+)`")
DESIGN = "[docs/design.md][how-binom_opt-computes-a-meta-gradient]"  # the Design page's title anchor
HEADING = re.compile(r"^\s*\w[\w\s-]*:\s*$")  # what griffe's Google parser takes for a section or admonition title


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        public = _public_paths(pkg)
        for obj in _walk(pkg):
            if obj.docstring is not None:
                text = ROLE.sub(lambda m, obj=obj: _link(m, obj, pkg, public), obj.docstring.value)
                text = text.replace("docs/design.md", DESIGN)
                obj.docstring.value = _fence_doctests(text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _fence_doctests(text: str) -> str:
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        if not lines[i].lstrip().startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        end = i
        while end < len(lines) and lines[end].strip():
            end += 1
        before = next((line for line in reversed(out) if line.strip()), "")
        indent, heading = _indent(lines[i]), bool(HEADING.match(before))
        if not heading:
            indent = min(indent, _indent(before))
        pad = " " * indent
        block = [pad + line[_indent(lines[i]):] if line.strip() else line for line in lines[i:end]]
        if out and out[-1].strip() and not heading:  # a heading's body must follow it directly
            out.append("")
        out += [pad + "```pycon", *block, pad + "```"]
        i = end
    return "\n".join(out)


def _walk(obj):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _public_paths(pkg) -> dict:
    """Canonical path -> the path the reference documents it under (re-exports win over defining modules)."""
    public = {}
    for name, member in pkg.members.items():
        target = _target(member)
        if name.startswith("_") or name == "core" or target is None or not target.path.startswith(pkg.path):
            continue
        public[target.path] = f"{pkg.path}.{name}"
        if target.is_module or target.is_class:
            exported = getattr(target, "exports", None)
            for sub_name, sub in target.members.items():
                sub_target = _target(sub)
                if exported is not None and sub_name not in exported:
                    continue
                if not sub_name.startswith("_") and sub_target is not None and sub_target.path.startswith(pkg.path):
                    public.setdefault(sub_target.path, f"{public[target.path]}.{sub_name}")
    return public


def _target(member):
    """What a member is, through import aliases; None for an import of something outside the package."""
    try:
        return member.final_target if member.is_alias else member
    except griffe.AliasResolutionError:
        return None


def _resolve(name: str, obj, pkg):
    """The object a role names, looked up as Sphinx would: dotted from the package, else around ``obj``."""
    if name.startswith(pkg.path + "."):
        try:
            found = pkg[name[len(pkg.path) + 1:]]
        except KeyError:
            return None
        return _target(found)
    scope = obj
    while scope is not None:
        head, _, rest = name.partition(".")
        if head in scope.members:
            found = scope.members[head]
            found = _target(found)
            try:
                return found[rest] if rest and found is not None else found
            except KeyError:
                return None
        scope = scope.parent
    return None


def _link(match, obj, pkg, public) -> str:
    short, name = match.group(1) == "~", match.group(2)
    shown = f"`{name.rsplit('.', 1)[-1] if short else name}`"
    target = _resolve(name, obj, pkg)
    if target is None:
        return f"[{shown}][{name}]"  # left for autorefs to report as a broken reference
    path = target.path
    if path in public:
        return f"[{shown}][{public[path]}]"
    parent = path.rsplit(".", 1)[0]
    if parent in public:
        return f"[{shown}][{public[parent]}.{path.rsplit('.', 1)[1]}]"
    return shown
