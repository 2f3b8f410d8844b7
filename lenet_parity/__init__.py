"""Both ports side by side on any spec: ``python -m lenet_parity SPEC`` runs the checks the
tests run on the presets — per layer outputs, per parameter gradients, an SGD trajectory,
batch_norm statistics — and says where the ports first diverge."""

from lenet_parity.battery import (
    GRAD_TOL,
    LOGIT_TOL,
    STATS_TOL,
    TRAJ_LOSS_TOL,
    TRAJ_PARAM_TOL,
)
from lenet_parity.check import Report, Row, check

__all__ = ["GRAD_TOL", "LOGIT_TOL", "STATS_TOL", "TRAJ_LOSS_TOL", "TRAJ_PARAM_TOL", "Report",
           "Row", "check"]
