"""Choose, check and picture a pipeline x data (x model) parallel rank layout.

Everything here is a thin layer over DeepSpeed's own ``ProcessTopology``: ``make_topology`` returns DeepSpeed's
classes, so ``PipelineModule(topology=...)`` takes the result unchanged, and every lookup goes through DeepSpeed's
``get_coord`` / ``filter_match`` / ``get_axis_comm_lists``, so the answers are the ones the engine will use.
"""

from __future__ import annotations

from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, PipeModelDataParallelTopology, ProcessTopology

#: How each DeepSpeed axis is called in the lookups and in ``describe``.
_AXIS_WORDS = {"pipe": "stage", "data": "replica", "model": "slice"}


def divisors(n: int) -> list[int]:
    """Every size that splits ``n`` ranks (or samples) evenly, smallest first."""
    return [d for d in range(1, n + 1) if n % d == 0]


def _listed(values: list[int]) -> str:
    return ", ".join(map(str, values))


def make_topology(world_size: int, pipe: int, data: int | None = None, model: int = 1) -> ProcessTopology:
    """DeepSpeed's topology for ``pipe`` stages x ``data`` replicas x ``model`` slices over ``world_size`` ranks.

    ``data=None`` takes whatever the other sizes leave. A layout that does not fill the world exactly raises a
    ``ValueError`` naming the sizes that would, instead of DeepSpeed's bare ``assert`` deep inside the engine.
    """
    sizes = {"world size": world_size, "pipeline size": pipe, "model size": model}
    if data is not None:
        sizes["data size"] = data
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"{name} must be at least 1, got {size}")
    if world_size % model:
        raise ValueError(
            f"model size {model} does not divide world size {world_size}; "
            f"valid model sizes for world size {world_size}: {_listed(divisors(world_size))}"
        )
    pipe_x_data = world_size // model
    if pipe_x_data % pipe:
        given_model = f" with model size {model}" if model > 1 else ""
        divides = f"world size {world_size}" if model == 1 else f"world size {world_size} / model size {model}"
        raise ValueError(
            f"pipeline size {pipe} does not divide {divides}; "
            f"valid pipeline sizes for world size {world_size}{given_model}: {_listed(divisors(pipe_x_data))}"
        )
    fitting_data = pipe_x_data // pipe
    if data is None:
        data = fitting_data
    elif data != fitting_data:
        raise ValueError(
            f"pipeline {pipe} x data {data} x model {model} = {pipe * data * model} ranks, "
            f"not world size {world_size}; "
            f"with pipeline size {pipe} and model size {model} the data size must be {fitting_data} (or left out)"
        )
    if model == 1:
        return PipeDataParallelTopology(num_pp=pipe, num_dp=data)
    return PipeModelDataParallelTopology(num_pp=pipe, num_mp=model, num_dp=data)


def stage_of(topo: ProcessTopology, rank: int) -> int:
    """The pipeline stage ``rank`` runs."""
    return topo.get_coord(rank).pipe


def replica_of(topo: ProcessTopology, rank: int) -> int:
    """The data-parallel replica (which copy of the whole pipeline) ``rank`` belongs to."""
    return topo.get_coord(rank).data


def ranks_of_stage(topo: ProcessTopology, stage: int) -> list[int]:
    """Every rank that runs ``stage``: one per replica (and per model slice)."""
    stages = topo.get_dim("pipe")
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is out of range; this topology has stages 0..{stages - 1}")
    return topo.filter_match(pipe=stage)


def pipeline_neighbors(topo: ProcessTopology, rank: int) -> tuple[int | None, int | None]:
    """The ranks ``rank`` receives activations from and sends them to (``None`` past the first or last stage).

    Same coordinates but the stage, as DeepSpeed's ``PipelineParallelGrid.stage_to_global`` finds them.
    """
    coord = topo.get_coord(rank)
    previous = topo.get_rank(**coord._replace(pipe=coord.pipe - 1)._asdict()) if coord.pipe > 0 else None
    has_next = coord.pipe + 1 < topo.get_dim("pipe")
    following = topo.get_rank(**coord._replace(pipe=coord.pipe + 1)._asdict()) if has_next else None
    return previous, following


def allreduce_groups(topo: ProcessTopology) -> list[list[int]]:
    """The gradient all-reduce groups: the ranks holding the same stage and model slice, one per replica.

    These are the groups ``PipelineParallelGrid`` all-reduces gradients over (its ``dp_groups``).
    """
    return topo.get_axis_comm_lists("data")


def pipeline_groups(topo: ProcessTopology) -> list[list[int]]:
    """The ranks that form one pipeline, first stage to last, one list per replica (and model slice)."""
    return topo.get_axis_comm_lists("pipe")


def pipeline_links(topo: ProcessTopology) -> list[tuple[int, int]]:
    """Every (sender, receiver) pair of neighbouring stages: activations go forward, their gradients back."""
    return [link for group in pipeline_groups(topo) for link in zip(group, group[1:])]


def _label(topo: ProcessTopology, group: list[int], axis: str) -> str:
    """Name a group along ``axis`` by the coordinates its ranks share, e.g. ``replica 1, slice 0``."""
    coord = topo.get_coord(group[0])._asdict()
    return ", ".join(
        f"{_AXIS_WORDS.get(other, other)} {coord[other]}" for other in topo.get_axis_names() if other != axis
    )


def _communicating_groups(topo: ProcessTopology, axis: str) -> list[list[int]]:
    return [group for group in topo.get_axis_comm_lists(axis) if len(group) > 1]


def _counted(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _nodes(ranks: list[int], ranks_per_node: int) -> list[int]:
    return sorted({rank // ranks_per_node for rank in ranks})


def _node_tag(ranks: list[int], ranks_per_node: int | None) -> str:
    if ranks_per_node is None:
        return ""
    return " @" + ",".join(f"n{node}" for node in _nodes(ranks, ranks_per_node))


def _grid_lines(topo: ProcessTopology, ranks_per_node: int | None) -> list[str]:
    stages, replicas = range(topo.get_dim("pipe")), range(topo.get_dim("data"))
    cells = {}
    for stage in stages:
        for replica in replicas:
            ranks = topo.filter_match(pipe=stage, data=replica)
            cells[stage, replica] = ",".join(map(str, ranks)) + _node_tag(ranks, ranks_per_node)
    row_labels = {stage: f"stage {stage}" for stage in stages}
    header = {replica: f"replica {replica}" for replica in replicas}
    label_width = max(map(len, row_labels.values()))
    width = max(map(len, [*header.values(), *cells.values()]))
    lines = [" " * label_width + "".join(f"  {header[replica]:<{width}}" for replica in replicas)]
    for stage in stages:
        lines.append(f"{row_labels[stage]:<{label_width}}" + "".join(f"  {cells[stage, r]:<{width}}" for r in replicas))
    return ["  " + line.rstrip() for line in lines]


def _pipeline_lines(topo: ProcessTopology, ranks_per_node: int | None) -> list[str]:
    pipelines = pipeline_groups(topo)
    if topo.get_dim("pipe") == 1:
        return ["pipeline send/receive links: none (1 stage)"]
    legend = ", => crosses nodes" if ranks_per_node else ""
    lines = [f"pipeline send/receive links (activations forward, their gradients back, every micro-batch{legend}):"]
    for pipeline in pipelines:
        chain = str(pipeline[0])
        for sender, receiver in zip(pipeline, pipeline[1:]):
            crosses = ranks_per_node is not None and len(_nodes([sender, receiver], ranks_per_node)) > 1
            chain += f" {'=>' if crosses else '->'} {receiver}"
        lines.append(f"  {_label(topo, pipeline, 'pipe')}: {chain}")
    return lines


def _group_lines(topo: ProcessTopology, axis: str, title: str, ranks_per_node: int | None) -> list[str]:
    groups = _communicating_groups(topo, axis)
    if not groups:
        return [f"{title}: none (1 {_AXIS_WORDS[axis]})"]
    entries = [f"  {_label(topo, group, axis)}: {', '.join(map(str, group))}" for group in groups]
    width = max(map(len, entries))
    lines = [f"{title}:"]
    for entry, group in zip(entries, groups):
        nodes = _nodes(group, ranks_per_node) if ranks_per_node is not None else []
        crossing = f"   crosses nodes {', '.join(f'n{node}' for node in nodes)}" if len(nodes) > 1 else ""
        lines.append(f"{entry:<{width}}{crossing}".rstrip())
    return lines


#: Traffic kinds from heaviest to lightest: tensor-slice all-reduces sit inside every layer, gradient all-reduces
#: move a stage's full gradients every step, pipeline links move one micro-batch's activations at a time.
_TRAFFIC = {
    "model": ("model-parallel groups", "tensor-slice all-reduce traffic"),
    "data": ("gradient all-reduce groups", "gradient all-reduce traffic"),
    "pipe": ("pipeline links", "pipeline traffic"),
}


def _node_crossings(topo: ProcessTopology, ranks_per_node: int) -> dict[str, tuple[int, int, int]]:
    """Per traffic kind: (how many cross nodes, how many there are, inter-node hops).

    A ring all-reduce over k > 1 nodes makes k inter-node hops, so hops (not crossing groups) measure how much of
    the traffic goes over the network; a pipeline link that crosses is one hop.
    """
    crossings = {}
    for axis in _TRAFFIC:
        if axis == "pipe":
            groups = [list(link) for link in pipeline_links(topo)]
        else:
            groups = _communicating_groups(topo, axis)
        spans = [len(_nodes(group, ranks_per_node)) for group in groups]
        crossing = [span for span in spans if span > 1]
        hops = len(crossing) if axis == "pipe" else sum(crossing)
        crossings[axis] = (len(crossing), len(groups), hops)
    return crossings


def _swap_pipe_and_data(topo: ProcessTopology) -> ProcessTopology:
    axes = list(topo.get_axis_names())
    pipe, data = axes.index("pipe"), axes.index("data")
    axes[pipe], axes[data] = axes[data], axes[pipe]
    return ProcessTopology(axes=axes, dims=[topo.get_dim(axis) for axis in axes])


def _order_lines(topo: ProcessTopology, ranks_per_node: int) -> list[str]:
    """The node-crossing table for this order and the swapped one, and which to use."""
    other = _swap_pipe_and_data(topo)
    ours, theirs = _node_crossings(topo, ranks_per_node), _node_crossings(other, ranks_per_node)

    def cell(axis: str, crossing: int, total: int, hops: int) -> str:
        return f"{crossing} of {total}" + (f" ({hops} inter-node ring hops)" if axis != "pipe" and hops else "")

    title = f"crossing nodes ({ranks_per_node} ranks per node)"
    table = [(title, f"this order {topo.get_axis_names()}", f"other order {other.get_axis_names()}")]
    table += [
        (f"  {name}", cell(axis, *ours[axis]), cell(axis, *theirs[axis]))
        for axis, (name, _) in _TRAFFIC.items()
        if ours[axis][1]
    ]
    widths = [max(len(row[column]) for row in table) for column in range(2)]
    lines = [f"{name:<{widths[0]}}  {mine:<{widths[1]}}  {alt}" for name, mine, alt in table]
    return [*lines, "recommendation: " + _recommendation(topo, other, ours, theirs)]


def _recommendation(
    topo: ProcessTopology,
    other: ProcessTopology,
    ours: dict[str, tuple[int, int, int]],
    theirs: dict[str, tuple[int, int, int]],
) -> str:
    if topo.get_dim("pipe") == 1 or topo.get_dim("data") == 1:
        return "nothing to choose: with one stage or one replica both orders place the ranks alike"
    our_hops, their_hops = ([crossings[axis][2] for axis in _TRAFFIC] for crossings in (ours, theirs))
    if our_hops == their_hops:
        return "either order: both send the same traffic across nodes"
    better, worse = (ours, theirs) if our_hops < their_hops else (theirs, ours)
    decisive = next(axis for axis in _TRAFFIC if better[axis][2] != worse[axis][2])
    if better is ours:
        advice = f"keep {topo.get_axis_names()}"
    else:
        axes = other.get_axis_names()
        advice = f"use ProcessTopology(axes={axes}, dims={[other.get_dim(axis) for axis in axes]})"
    advice += f": it sends less {_TRAFFIC[decisive][1]} across nodes"
    costs = [
        f"{better[axis][2] - worse[axis][2]} more crossing pipeline links"
        if axis == "pipe"
        else f"{better[axis][2] - worse[axis][2]} more inter-node hops of {traffic}"
        for axis, (_, traffic) in _TRAFFIC.items()
        if better[axis][2] > worse[axis][2]
    ]
    return advice + (f", worth the {' and '.join(costs)}" if costs else "")


def describe(topo: ProcessTopology, ranks_per_node: int | None = None) -> str:
    """A text picture of the layout: the stage x replica grid of ranks, the pipeline links, the all-reduce groups.

    Given ``ranks_per_node``, traffic that crosses nodes is marked and the layout is compared with the other axis
    order (data outermost instead of pipe, or back). Heaviest traffic decides: tensor-slice all-reduces, then
    gradient all-reduces (a stage's full gradients every step), then pipeline links (activations per micro-batch).
    """
    if not {"pipe", "data"} <= set(topo.get_axis_names()):
        raise ValueError(f"describe needs a topology with 'pipe' and 'data' axes, got axes {topo.get_axis_names()}")
    if ranks_per_node is not None and ranks_per_node < 1:
        raise ValueError(f"ranks per node must be at least 1, got {ranks_per_node}")
    dims = " x ".join(_counted(topo.get_dim(axis), _AXIS_WORDS.get(axis, axis)) for axis in topo.get_axis_names())
    headline = f"{topo.world_size()} ranks = {dims}, axes {topo.get_axis_names()} (last axis varies fastest)"
    if ranks_per_node is not None:
        nodes = _counted(-(-topo.world_size() // ranks_per_node), "node")
        headline += f", {ranks_per_node} ranks per node ({nodes}, node = rank // {ranks_per_node})"
    lines = [headline, "", *_grid_lines(topo, ranks_per_node), "", *_pipeline_lines(topo, ranks_per_node)]
    lines += _group_lines(
        topo, "data", "gradient all-reduce groups (each stage's full gradients, every step)", ranks_per_node
    )
    if topo.get_dim("model") > 1:
        lines += _group_lines(
            topo, "model", "model-parallel groups (tensor-slice all-reduces in every layer)", ranks_per_node
        )
    if ranks_per_node is not None:
        lines += ["", *_order_lines(topo, ranks_per_node)]
    return "\n".join(lines)
