"""How much KV cache a decode step copies inside its graph, read from the graph itself.

The runtime binds the cache by address, so outside the graph nothing is copied (what `KVArena.bytes_copied`
audits). Inside, a portable graph joins past and new K/V with Concat and lays them out for the attention
matmuls with Transpose: each such node writes a new tensor as long as the whole context, every step. The
ONNX Runtime graph hands the cache to GroupQueryAttention, which reads it where it is and writes only the
new positions.

Counted: nodes on a path from a `past.*` input to the first node that only reads it (a matmul, the fused
attention), whose output is a new tensor of the cache's size. Reshape-like nodes are views and pass
through uncounted. This is the exported graph; ONNX Runtime's optimizer may fold a Transpose into the
matmul that follows it (which then reads the cache strided instead).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

COPIES = {"Concat", "Transpose", "Expand", "Tile", "Cast", "Pad", "Slice", "Where", "Gather"}
VIEWS = {"Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten"}


def cache_copy_nodes(graph_path: str | Path) -> int:
    """Number of whole-context copies of one step, summed over every past.* input (all layers, K and V)."""
    import onnx
    graph = onnx.load(str(graph_path), load_external_data=False).graph
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    total = 0
    for value in (i.name for i in graph.input if i.name.startswith("past.")):
        frontier, seen = [value], set()
        while frontier:
            for node in consumers[frontier.pop()]:
                if node.name in seen or node.op_type not in COPIES | VIEWS:
                    continue
                seen.add(node.name)
                total += node.op_type in COPIES
                frontier.extend(node.output)
    return total


def bytes_per_step(copy_nodes: int, context: int, row_bytes: int) -> int:
    """Bytes those copies write in one step at `context` positions (after the step), `row_bytes` being
    one position of one layer's K (or V) for the whole batch."""
    return copy_nodes * context * row_bytes
