"""The precisions both ports compute in (``build(..., precision=…)``, ``--precision``), and the
rules of mixed precision, written once here and followed by each port's model:

- ``float32``: every product (conv, linear) in full float32, also on GPUs and TPUs, whose
  defaults are lower (TF32 on recent NVIDIA GPUs, bfloat16 passes on TPUs).
- ``bfloat16``: mixed precision as each framework's users write it (``torch.autocast``; in
  Flax, the layers' computation ``dtype``). Each conv and linear layer rounds its input and its
  float32 parameters to bfloat16 and returns bfloat16 (products accumulated in float32);
  elementwise layers (activations, pooling, dropout, scale) compute in the dtype they are given;
  batch_norm normalises in float32 and returns its input's dtype, its statistics float32; the
  network's output is widened to float32, and a final log_softmax or softmax is computed in
  float32, as are the loss and the optimizer. The parameters (master weights), optimizer state,
  checkpoints and weights files stay float32.
- ``tf32``: float32 with products in TensorFloat-32 (10-bit mantissa inputs, float32
  accumulation) on GPUs that have it (NVIDIA Ampere or newer); refused elsewhere.
"""

from __future__ import annotations

PRECISIONS = ("float32", "bfloat16", "tf32")
"""The ``precision=`` choices."""

UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "tf32": 2.0**-11}
"""Half the distance from 1 to the next number of each format (its significand's bits, the
implicit one included: 24, 8, 11): rounding to nearest moves a value by at most this fraction
of its magnitude."""


def check_precision(precision: str) -> None:
    """Raise one ValueError naming the choices when ``precision`` is not one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of "
                         f"{', '.join(PRECISIONS)}")
