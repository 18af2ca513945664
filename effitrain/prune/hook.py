"""Masks during training, as a trainer hook: gradients of cut weights are zeroed after
backward and the weights re-zeroed after every optimizer step (so momentum and weight decay
cannot revive them), and the schedule changes the masks at its steps:

- gradual (Zhu & Gupta 2018): s_t = s_f + (s_i − s_f)(1 − (t − t0)/(n Δt))³, masks recomputed
  every Δt steps from t0 to t0 + n Δt;
- rigl (Evci et al. 2020): constant sparsity; every ΔT steps until `end`, each layer drops the
  fraction f_t = f_0/2 (1 + cos(π t / end)) of its active weights with the smallest magnitude
  and regrows as many inactive ones with the largest dense-gradient magnitude (starting at 0).

Masks and the schedule's position are the hook's state, saved in the epoch checkpoints, so a
resumed run continues the schedule where it stopped. In a multi-process run every process
computes the same masks (same weights, all-reduced gradients, the same scoring batches); each
change is still taken from the trainer's leader, so the replicas can never drift apart.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from effitrain.parallel.world import broadcast_tensors
from effitrain.prune.masks import apply_masks, prunable
from effitrain.trainer import Hook


def polynomial_sparsity(step: int, initial: float, final: float, begin: int, end: int) -> float:
    """Zhu & Gupta's cubic ramp from `initial` at `begin` to `final` at `end` (constant outside)."""
    if step <= begin:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1 - (step - begin) / (end - begin)) ** 3


def scheduled_sparsity(step: int, initial: float, final: float, begin: int, end: int, frequency: int) -> float:
    """The gradual schedule's target after `step` optimizer steps: the cubic ramp as of its last
    update (every `frequency` steps from `begin`, and at `end`), `initial` before `begin`."""
    if step < begin:
        return initial
    updated = min(step, end) if step >= end else begin + (step - begin) // frequency * frequency
    return polynomial_sparsity(updated, initial, final, begin, end)


def rigl_fraction(step: int, initial: float, end: int) -> float:
    """RigL's cosine-decaying update fraction: initial/2 · (1 + cos(π step / end)), 0 after `end`."""
    if step >= end:
        return 0.0
    return initial / 2 * (1 + math.cos(math.pi * step / end))


class MaskHook(Hook):
    """Keeps masked weights at zero and moves the masks along a schedule.

    Args:
        masks: initial boolean keep-masks by layer name.
        schedule: 'fixed' (masks never change), 'gradual' or 'rigl'.
        remask: for 'gradual', remask(model, sparsity) -> new masks at that sparsity.
        initial_sparsity, final_sparsity: the gradual ramp's ends.
        begin_step, end_step: the schedule's window; end_step None = 75% of the stage's steps.
        frequency: Δt (gradual) or ΔT (rigl) in optimizer steps.
        drop_fraction: RigL's initial update fraction f_0.
        measured: the layers whose sparsity is compared with the target in the log (default: all
            masked layers; layers with their own override have their own targets).
    """

    def __init__(
        self,
        masks: dict[str, Tensor],
        schedule: str = "fixed",
        remask: Callable[[nn.Module, float], dict[str, Tensor]] | None = None,
        initial_sparsity: float = 0.0,
        final_sparsity: float = 0.0,
        begin_step: int = 0,
        end_step: int | None = None,
        frequency: int = 10,
        drop_fraction: float = 0.3,
        measured: Sequence[str] | None = None,
    ) -> None:
        self.masks = masks
        self.schedule = schedule
        self.remask = remask
        self.initial_sparsity = initial_sparsity
        self.final_sparsity = final_sparsity
        self.begin_step = begin_step
        self.end_step = end_step
        self.frequency = frequency
        self.drop_fraction = drop_fraction
        self.measured = list(measured) if measured else list(masks)
        self.current_sparsity = initial_sparsity if schedule == "gradual" else final_sparsity
        self.updates = 0
        self._dense_grads: dict[str, Tensor] = {}

    def _end(self, trainer: Any) -> int:
        return self.end(trainer.total_steps)

    def end(self, total_steps: int) -> int:
        """The step where the schedule ends: end_step, or 75% of the stage's steps."""
        return self.end_step if self.end_step is not None else max(1, int(0.75 * total_steps))

    def target(self, step: int, total_steps: int) -> float:
        """The sparsity the schedule asks for after `step` of `total_steps` optimizer steps."""
        if self.schedule != "gradual":
            return self.final_sparsity
        return scheduled_sparsity(step, self.initial_sparsity, self.final_sparsity, self.begin_step, self.end(total_steps), self.frequency)

    def achieved(self) -> float:
        """The fraction of the measured layers' weights the masks cut now."""
        kept = sum(int(self.masks[name].sum()) for name in self.measured)
        return 1 - kept / max(sum(self.masks[name].numel() for name in self.measured), 1)

    def logged(self, trainer: Any) -> dict[str, float]:
        return {"target_sparsity": self.current_sparsity, "achieved_sparsity": self.achieved()}

    def on_fit_start(self, trainer: Any) -> None:
        self.masks = broadcast_tensors(self.masks, getattr(trainer, "group", None))
        apply_masks(trainer.model, self.masks)

    def _due(self, step: int, trainer: Any) -> bool:
        """Whether the step about to finish (step + 1) changes the masks."""
        upcoming = step + 1
        return self.schedule in ("gradual", "rigl") and self.begin_step <= upcoming <= self._end(trainer) and (upcoming - self.begin_step) % self.frequency == 0

    def after_backward(self, trainer: Any) -> None:
        weights = prunable(trainer.model)
        if self.schedule == "rigl" and self._due(trainer.step, trainer):
            self._dense_grads = {name: weights[name].grad.detach().clone() for name in self.masks if weights[name].grad is not None}
        for name, mask in self.masks.items():
            if weights[name].grad is not None:
                weights[name].grad.mul_(mask.to(weights[name].grad.dtype))

    def after_step(self, trainer: Any) -> None:
        model, step = trainer.model, trainer.step
        if self.schedule == "gradual":
            target = self.target(step, trainer.total_steps)
            if target != self.current_sparsity:
                assert self.remask is not None
                self.masks = broadcast_tensors(self.remask(model, target), getattr(trainer, "group", None))
                self.current_sparsity = target
                self.updates += 1
        elif self.schedule == "rigl" and self._dense_grads:
            self._rigl_update(model, rigl_fraction(step, self.drop_fraction, self._end(trainer)))
            self.masks = broadcast_tensors(self.masks, getattr(trainer, "group", None))
            self._dense_grads = {}
            self.updates += 1
        apply_masks(model, self.masks)

    def _rigl_update(self, model: nn.Module, fraction: float) -> None:
        weights = prunable(model)
        for name, mask in self.masks.items():
            grad = self._dense_grads.get(name)
            active = int(mask.sum())
            count = int(fraction * active)
            if grad is None or count == 0 or active == mask.numel():
                continue
            flat_mask = mask.flatten().clone()
            magnitude = weights[name].detach().abs().flatten().float()
            magnitude[~flat_mask] = math.inf  # only active weights can be dropped
            drop = torch.argsort(magnitude, stable=True)[:count]
            growth = grad.abs().flatten().float()
            growth[flat_mask] = -math.inf  # only inactive (before this update) weights can grow
            grow = torch.argsort(growth, descending=True, stable=True)[:count]
            flat_mask[drop] = False
            flat_mask[grow] = True
            with torch.no_grad():
                weights[name].view(-1)[grow] = 0.0  # regrown connections start at zero (RigL)
            self.masks[name] = flat_mask.view_as(mask)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {name: mask.cpu() for name, mask in self.masks.items()},
                "current_sparsity": self.current_sparsity, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = next(iter(self.masks.values())).device if self.masks else torch.device("cpu")
        self.masks = {name: mask.to(device) for name, mask in state["masks"].items()}
        self.current_sparsity = state["current_sparsity"]
        self.updates = state["updates"]
