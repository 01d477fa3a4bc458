"""The stage graph: signals, token sets, selections, actions and cache policies of a checked
policy as nodes; data dependencies and stage order as edges.

Built as plain data (fast, no imports) and handed to networkx for analysis and rendering.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from policyc.catalog import SETS, SIGNALS
from policyc.lang import ir
from policyc.lang.check import CheckedPolicy, StagePlan
from policyc.lang.printer import print_expr

if TYPE_CHECKING:
    import networkx

NodeKind = Literal["stage", "signal", "set", "score", "selection", "action", "cache"]
EdgeKind = Literal["data", "order", "contains"]


@dataclass(frozen=True)
class Node:
    id: str
    kind: NodeKind
    label: str
    stage: str


@dataclass
class StageGraph:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[tuple[str, str, EdgeKind]] = field(default_factory=list)

    def add(self, node: Node) -> str:
        self.nodes.setdefault(node.id, node)
        return node.id

    def link(self, source: str, target: str, kind: EdgeKind) -> None:
        if (source, target, kind) not in self.edges:
            self.edges.append((source, target, kind))

    def to_networkx(self) -> networkx.MultiDiGraph:
        import networkx

        graph = networkx.MultiDiGraph()
        for node in self.nodes.values():
            graph.add_node(node.id, kind=node.kind, label=node.label, stage=node.stage)
        for source, target, kind in self.edges:
            graph.add_edge(source, target, kind=kind)
        return graph

    def to_mermaid(self) -> str:
        shapes = {"stage": ("[[", "]]"), "signal": ("([", "])"), "set": ("[/", "/]"), "score": ("(", ")"),
                  "selection": ("{{", "}}"), "action": ("[", "]"), "cache": ("[(", ")]")}
        ids = {node_id: f"n{i}" for i, node_id in enumerate(self.nodes)}
        lines = ["flowchart TD"]
        for node in self.nodes.values():
            left, right = shapes[node.kind]
            lines.append(f'  {ids[node.id]}{left}"{_escape(node.label)}"{right}')
        arrows = {"data": "-->", "order": "==>", "contains": "-.-"}
        lines += [f"  {ids[s]} {arrows[k]} {ids[t]}" for s, t, k in self.edges]
        return "\n".join(lines) + "\n"

    def to_dot(self) -> str:
        shapes = {"stage": "box3d", "signal": "ellipse", "set": "parallelogram", "score": "oval",
                  "selection": "hexagon", "action": "box", "cache": "cylinder"}
        styles = {"data": "solid", "order": "bold", "contains": "dotted"}
        ids = {node_id: f"n{i}" for i, node_id in enumerate(self.nodes)}
        lines = ["digraph policy {", "  rankdir=TB;"]
        lines += [f'  {ids[n.id]} [label="{_escape(n.label)}", shape={shapes[n.kind]}];' for n in self.nodes.values()]
        lines += [f"  {ids[s]} -> {ids[t]} [style={styles[k]}];" for s, t, k in self.edges]
        return "\n".join([*lines, "}"]) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', "'")


def build_graph(checked: CheckedPolicy) -> StageGraph:
    graph = StageGraph()
    previous: str | None = None
    for plan in checked.stages:
        stage_id = graph.add(Node(f"stage:{plan.label}", "stage", plan.label, plan.label))
        if previous is not None:
            graph.link(previous, stage_id, "order")
        previous = stage_id
        _add_statements(graph, plan, stage_id)
    return graph


def _add_statements(graph: StageGraph, plan: StagePlan, stage_id: str) -> None:
    scope = plan.placed.scope.label
    for index, statement in enumerate(plan.placed.stage.body):
        node_id = f"{plan.label}/{index}"
        match statement:
            case ir.Let(name=name, value=value):
                node = Node(f"def:{scope}:{name}", "set", f"let {name}", plan.label)
                inputs = _inputs(graph, value, plan, scope)
            case ir.ScoreDef(name=name, value=value):
                node = Node(f"def:{scope}:{name}", "score", f"score {name}", plan.label)
                inputs = _inputs(graph, value, plan, scope)
            case ir.Cache(method=method):
                node = Node(node_id, "cache", f"cache {method}", plan.label)
                inputs = []
            case ir.Merge(method=method):
                node = Node(node_id, "action", f"merge {method}", plan.label)
                inputs = [i for part in (statement.source, statement.into, statement.by) if part is not None
                          for i in _inputs(graph, part, plan, scope)]
            case ir.Positions(mode=mode):
                node = Node(node_id, "action", f"positions {mode}", plan.label)
                inputs = []
            case _:
                verb = type(statement).__name__.lower()
                node = Node(node_id, "action", verb, plan.label)
                inputs = _inputs(graph, statement.target, plan, scope)  # type: ignore[union-attr]
        graph.add(node)
        graph.link(stage_id, node.id, "contains")
        for source in inputs:
            graph.link(source, node.id, "data")


def _inputs(graph: StageGraph, expr: ir.Expr, plan: StagePlan, scope: str) -> list[str]:
    """Nodes feeding `expr`: signals, definitions, built-in sets and selections inside it."""
    match expr:
        case ir.Select(selector=selector):
            node = Node(f"{plan.label}/select:{print_expr(expr)}", "selection", f"{selector} {print_expr(expr.amount)}",
                        plan.label)
            graph.add(node)
            for part in (expr.source, expr.by, expr.amount):
                for source in _inputs(graph, part, plan, scope) if part is not None else ():
                    graph.link(source, node.id, "data")
            return [node.id]
        case ir.Call(fn=fn) if fn in SIGNALS:
            node = Node(f"{plan.label}/signal:{print_expr(expr)}", "signal", print_expr(expr), plan.label)
            return [graph.add(node)]
        case ir.Name(id=name):
            definition = f"def:{scope}:{name}"
            if definition in graph.nodes:
                return [definition]
            if name in SETS:
                return [graph.add(Node(f"{plan.label}/set:{name}", "set", name, plan.label))]
            if name in SIGNALS:
                return [graph.add(Node(f"{plan.label}/signal:{name}", "signal", name, plan.label))]
            return []
    return [node for child in expr.children() for node in _inputs(graph, child, plan, scope)]  # type: ignore[arg-type]
