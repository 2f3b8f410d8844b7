"""Port a torch module to a spec: :func:`to_spec` turns an ``nn.Module`` written the way the
PyTorch tutorial writes one into a :class:`~lenet_spec.Spec` and its canonical weights, checked
to give the module's logits.

``python -m lenet_port FILE.py:CLASS --input-shape C,H,W -o SPEC.json`` does it from the
command line and prints the spec's summary table.

The module is traced with ``torch.fx`` where it can be, else with ``torch.export`` (which
also follows Python loops over ``x.size()``); the traced graph is then run on a small batch, so
every node's input and output shapes are known, and read as a chain of the spec's layers. Any
node that is not one of them, or that makes the graph anything but a chain, is one
:class:`PortError` naming the node or module, the operation and the source line.

The stages, one module each: :mod:`~lenet_port.trace` (the graph and every node's value),
:mod:`~lenet_port.args` (a node's arguments), :mod:`~lenet_port.ops` (modules and ops as spec
layers: the table of what is supported), :mod:`~lenet_port.chain` (the graph as one chain),
:mod:`~lenet_port.assemble` (the spec, its weights and the logit check), and the command line
in :mod:`~lenet_port.__main__`.
"""

from lenet_port.assemble import LOGIT_TOL, Ported, port, to_spec
from lenet_port.errors import SUPPORTED, PortError
from lenet_port.files import read_state_dict
from lenet_port.ops import MODULES, OPS

__all__ = ["LOGIT_TOL", "MODULES", "OPS", "SUPPORTED", "PortError", "Ported", "port",
           "read_state_dict", "to_spec"]
