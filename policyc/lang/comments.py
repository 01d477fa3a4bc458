"""Attach source comments to IR nodes so that printing a policy loses none of them.

A comment becomes:
- the `note` of the node it trails on the same line (`keep x  # why`), or of a block whose
  header line it ends (`stage decode {  # why`);
- a leading comment of the next node in the same block, or a comment inside a multi-line
  statement (printing puts it above that statement);
- an `end_comments` line of the block (or file) when nothing follows it there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from policyc.lang import ir
from policyc.lang.parser import Comment

N = TypeVar("N", bound=ir.Commented)


def attach_comments(file: ir.PolicyFile, comments: Sequence[Comment]) -> ir.PolicyFile:
    if not comments:
        return file
    children: list[ir.Commented] = [*file.imports, *file.policies, *file.searches]
    placed, end = _distribute(children, list(comments))
    return file.model_copy(update={
        "imports": tuple(p for p in placed if isinstance(p, ir.Import)),
        "policies": tuple(p for p in placed if isinstance(p, ir.Policy)),
        "searches": tuple(p for p in placed if isinstance(p, ir.Search)),
        "end_comments": tuple(c.text for c in end),
    })


def _distribute(children: list[ir.Commented], comments: list[Comment]) -> tuple[list[ir.Commented], list[Comment]]:
    """Hand each comment to the child it belongs to; comments after the last child are returned."""
    ordered = sorted(children, key=_start)
    owned: dict[int, list[Comment]] = {i: [] for i in range(len(ordered))}
    end: list[Comment] = []
    for comment in comments:
        owner = next((i for i, c in enumerate(ordered) if _start(c)[0] <= comment.line <= _end_line(c)), None)
        if owner is None:
            owner = next((i for i, c in enumerate(ordered) if _start(c)[0] > comment.line), None)
        if owner is None:
            end.append(comment)
        else:
            owned[owner].append(comment)
    placed = [_give(child, owned[i]) for i, child in enumerate(ordered)]
    by_identity = {id(c): p for c, p in zip(ordered, placed, strict=True)}
    return [by_identity[id(c)] for c in children], end


def _give(node: N, comments: list[Comment]) -> N:
    """Attach `comments` (all located before or within `node`) to `node` or its children."""
    if not comments or node.span is None:
        return node
    before = [c for c in comments if c.line < node.span.line]
    inside = [c for c in comments if c.line >= node.span.line]
    update: dict[str, object] = {"comments": (*node.comments, *(c.text for c in before))}
    if isinstance(node, ir.Stage | ir.Policy | ir.Search):
        header = [c for c in inside if c.line == node.span.line and not _child_on_line(node, c.line)]
        inside = [c for c in inside if c not in header]
        if header:
            update["note"] = header[0].text
        update.update(_block_update(node, inside))
    else:
        trailing = [c for c in inside if c.line == node.span.end_line]
        if trailing:
            update["note"] = trailing[0].text
        update["comments"] = (*update["comments"], *(c.text for c in inside if c not in trailing))  # type: ignore[misc]
    return node.model_copy(update=update)


def _block_update(node: ir.Stage | ir.Policy | ir.Search, comments: list[Comment]) -> dict[str, object]:
    if isinstance(node, ir.Stage):
        body, end = _distribute(list(node.body), comments)
        return {"body": tuple(body), "end_comments": (*node.end_comments, *(c.text for c in end))}
    if isinstance(node, ir.Search):
        placed, end = _distribute(_members(node), comments)
        return {
            "meta": tuple(m for m in placed if isinstance(m, ir.Meta)),
            "choose": next((m for m in placed if isinstance(m, ir.Choose)), None),
            "params": tuple(m for m in placed if isinstance(m, ir.SearchParam)),
            "end_comments": (*node.end_comments, *(c.text for c in end)),
        }
    placed, end = _distribute(_members(node), comments)
    return {
        "meta": tuple(m for m in placed if isinstance(m, ir.Meta)),
        "params": tuple(m for m in placed if isinstance(m, ir.Param)),
        "uses": tuple(m for m in placed if isinstance(m, ir.Use)),
        "stages": tuple(m for m in placed if isinstance(m, ir.Stage)),
        "end_comments": (*node.end_comments, *(c.text for c in end)),
    }


def _members(node: ir.Stage | ir.Policy | ir.Search) -> list[ir.Commented]:
    if isinstance(node, ir.Stage):
        return list(node.body)
    if isinstance(node, ir.Search):
        return [*node.meta, *([node.choose] if node.choose else []), *node.params]
    return [*node.meta, *node.params, *node.uses, *node.stages]


def _child_on_line(node: ir.Stage | ir.Policy | ir.Search, line: int) -> bool:
    children = _members(node)
    return any(c.span is not None and c.span.line <= line <= c.span.end_line for c in children)


def _start(node: ir.Node) -> tuple[int, int]:
    return (node.span.line, node.span.column) if node.span else (0, 0)


def _end_line(node: ir.Node) -> int:
    return node.span.end_line if node.span else 0
