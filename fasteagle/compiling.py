"""How a phase is compiled, in one place: the engine's phases and the cost table's timings of them (autotune) must
run the same kind of graph, or the shape chooser times something the engine does not run."""
import torch


def compile_phase(fn, device: torch.device, cuda_graph: bool = True):
    """torch.compile(fn) with one graph per input shape (dynamic=False) and no graph breaks (fullgraph: a break would
    split a round and add host syncs, so it fails loudly instead). On CUDA, with cuda_graph, also CUDA graphs
    (mode "reduce-overhead"): a phase is then one graph replay."""
    mode = "reduce-overhead" if device.type == "cuda" and cuda_graph else "default"
    return torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)
