"""An attack's settings as plain data: nested frozen dataclasses, named presets, and a dict round trip.

    config = get_config("batch")                       # a preset
    config = config.override(steps=300, labels="joint")  # flat names reach into the sections
    AttackConfig.from_dict(config.to_dict()) == config  # what config.json stores and a resume compares

breaching's vocabulary: the *case* is the model and the client (what it shares); the *attack* is what the
attacker brings: how labels are found, how the dummy is parametrised, the objective (a gradient distance plus a
prior), the solver and the attempt rules. This module holds the attack; the case's parts are named in the
registries of `dlg_jax.models` and `dlg_jax.client`.

Every name here is checked against the registry that will run it, so a typo fails when the config is made,
not deep inside a compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

LABEL_STRATEGIES = ("joint", "idlg")
PRECISIONS = ("float32", "float64")
LINESEARCH_CONDITIONS = ("armijo", "wolfe", "strong-wolfe")
SCHEDULES = ("constant", "step", "cosine")


@dataclasses.dataclass(frozen=True)
class Objective:
    """What is minimised: `distance` between the dummy's gradient and the shared one, plus an image `prior`
    (total variation) of weight `tv_weight` in the first stage, divided by 10 at each of `tv_stages` equal stages
    of the iterations, and 0 in the last (so an attack ends on the gradient distance alone); `tv_stages=0`: the
    weight stays `tv_weight` throughout (Inverting Gradients)."""

    distance: str = "l2"  # dlg_jax.parts.objectives.DISTANCES
    tv_weight: float = 0.0
    tv_stages: int = 4
    prior: str = "tv"  # dlg_jax.parts.objectives.PRIORS: tv (colour, smoothed), tv-anisotropic (Inverting Gradients)

    @property
    def stages(self) -> int:
        """Stages of an attempt: `tv_stages` with a staged prior, one without a prior or with a constant one."""
        return self.tv_stages if self.tv_weight > 0 and self.tv_stages > 0 else 1

    @property
    def constant_prior(self) -> bool:
        return self.tv_weight > 0 and self.tv_stages == 0


@dataclasses.dataclass(frozen=True)
class Solver:
    """Which solver runs, with its settings (each solver reads the ones it knows)."""

    optimizer: str = "lbfgs"  # dlg_jax.solvers.SOLVERS
    history_size: int = 100  # L-BFGS pairs
    linesearch_condition: str = "armijo"  # what backtracking accepts: sufficient decrease alone, or (strong) Wolfe
    linesearch_decrease: float = 0.5  # backtracking's step shrink per rejected trial
    max_linesearch_steps: int = 30
    learning_rate: float = 0.1  # Adam
    schedule: str = "constant"  # Adam: constant, step (x0.1 at 3/8, 5/8, 7/8 of the iterations), cosine
    signed: bool = False  # Adam on sign(gradient) (Inverting Gradients)


@dataclasses.dataclass(frozen=True)
class Rules:
    """The attempt rules (`dlg_jax.parts.attempts`): budgets, convergence, stall probe, retries."""

    steps: int = 300  # reported steps, as the reference's 300 `optimizer.step` calls
    iterations_per_step: int = 20  # solver iterations per step (torch's max_iter)
    evaluations_per_step: int | None = None  # evaluations per step; None: torch's max_eval, max_iter * 5 // 4
    tolerance: float = 1e-7  # converged when D <= tolerance * ||shared gradient||^2 (~36-40 dB on CIFAR)
    retries: int | None = None  # fresh random starts after an attempt stalls or diverges; None: while the budget
    #                             leaves room for another probe (steps // probe_steps - 1: 11 for 300 steps)
    probe_steps: int = 25  # an attempt must have cut D by `probe_reduction` after this many steps...
    probe_reduction: float = 1e-2  # ...or it counts as stalled
    plateau_reduction: float = 0.5  # ...and by this much in every `probe_steps` after that (0: no plateau rule)...
    plateau_floor: float = 1e3  # ...while D > plateau_floor x the convergence target (near the float floor it may slow)
    float64_retry: bool = True  # a float32 attack that ends on its budget unconverged runs again in float64
    #                             (engine.scheduler.wants_float64_retry: CIFAR-10 class 5, float32's floor)

    @property
    def max_retries(self) -> int:
        if self.retries is not None:
            return self.retries
        return max(0, self.steps // self.probe_steps - 1) if self.probe_steps > 0 else 0

    @property
    def max_iterations(self) -> int:
        return self.steps * self.iterations_per_step

    @property
    def step_evaluations(self) -> int:
        return self.iterations_per_step * 5 // 4 if self.evaluations_per_step is None else self.evaluations_per_step

    @property
    def max_evaluations(self) -> int:
        """The budget of evaluations over all attempts: near float rounding every line search can fail, and
        an iteration then costs `max_linesearch_steps` evaluations."""
        return self.steps * self.step_evaluations


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """One attack. The defaults are the paper's objective with the measured solver settings (preset `dlg`)."""

    labels: str = "joint"  # joint: optimise softmax(dummy logits) with the inputs; idlg: read them off the gradient
    dummy: str = "free"  # dlg_jax.parts.dummies.DUMMIES: free pixels, sigmoid pixels
    precision: str = "float32"
    adaptive: bool = False  # model the client's defenses: match the shared entries, in their precision (defenses.py)
    objective: Objective = Objective()
    solver: Solver = Solver()
    rules: Rules = Rules()

    def __post_init__(self):
        from dlg_jax.parts.dummies import DUMMIES, PROJECTED
        from dlg_jax.parts.objectives import DISTANCES, PRIORS
        from dlg_jax.solvers import SOLVERS

        o, s, r = self.objective, self.solver, self.rules
        for name, value, allowed in (("labels", self.labels, LABEL_STRATEGIES), ("dummy", self.dummy, DUMMIES),
                                     ("precision", self.precision, PRECISIONS), ("distance", o.distance, DISTANCES),
                                     ("prior", o.prior, PRIORS),
                                     ("optimizer", s.optimizer, SOLVERS), ("schedule", s.schedule, SCHEDULES),
                                     ("linesearch_condition", s.linesearch_condition, LINESEARCH_CONDITIONS)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r}: choose from {', '.join(allowed)}")
        if min(r.steps, r.iterations_per_step, r.step_evaluations, s.history_size, s.max_linesearch_steps) <= 0:
            raise ValueError("steps, iterations_per_step, evaluations_per_step, history_size and "
                             "max_linesearch_steps must be positive")
        if r.max_evaluations >= 2**31 or r.max_iterations >= 2**31:
            raise ValueError(f"steps x evaluations per step ({r.max_evaluations}) must stay below 2^31 (int32 counters)")
        if (r.retries is not None and r.retries < 0) or r.probe_steps < 0 or not 0 <= r.tolerance < 1:
            raise ValueError("retries and probe_steps must be >= 0 and tolerance in [0, 1)")
        if not 0 <= r.plateau_reduction < 1 or not r.plateau_floor >= 0:
            raise ValueError("plateau_reduction must be in [0, 1) and plateau_floor >= 0")
        if not 0 < s.linesearch_decrease < 1:
            raise ValueError("linesearch_decrease must be between 0 and 1")
        if not 0 < s.learning_rate < float("inf"):
            raise ValueError("learning_rate must be a positive number")
        if not 0 <= o.tv_weight < 1e6 or o.tv_stages < 0 or (o.tv_weight > 0 and o.tv_stages > r.steps):
            raise ValueError("tv_weight must be in [0, 1e6) and tv_stages between 0 (constant) and steps")
        if self.dummy in PROJECTED and s.optimizer != "adam":
            raise ValueError(f"dummy {self.dummy!r} is projected after every step: a projected-gradient method, "
                             "for optimizer adam (L-BFGS's curvature pairs would not hold)")
        if s.optimizer == "torch-lbfgs" and (self.dummy != "free" or o.tv_weight > 0):
            raise ValueError("the image prior (sigmoid pixels, TV) is not for torch-lbfgs, the reference's optimizer")

    @property
    def dtype(self):
        import jax.numpy as jnp

        return jnp.float64 if self.precision == "float64" else jnp.float32

    # -- plain data
    def to_dict(self) -> dict:
        """The fields as plain data; `adaptive` only when set and the prior only when not `tv`, so sweeps stored
        before they existed still resume."""
        data = dataclasses.asdict(self)
        if not data["adaptive"]:
            del data["adaptive"]
        if data["objective"]["prior"] == "tv":
            del data["objective"]["prior"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "AttackConfig":
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kinds = dict(objective=Objective, solver=Solver, rules=Rules)
        unknown = set(data) - set(sections)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**{k: kinds[k](**v) if k in kinds else v for k, v in data.items()})

    def override(self, **changes: Any) -> "AttackConfig":
        """This config with fields changed by their own names, wherever they live: `override(steps=600,
        tv_weight=1e-5, labels="idlg")`. The names are unique across sections (checked)."""
        top, nested = {}, {}
        for name, value in changes.items():
            section = FIELD_SECTIONS.get(name)
            if section is None:
                raise ValueError(f"unknown attack setting {name!r}")
            if section == "":
                top[name] = value
            else:
                nested.setdefault(section, {})[name] = value
        for section, values in nested.items():
            top[section] = dataclasses.replace(getattr(self, section), **values)
        return dataclasses.replace(self, **top)


def _field_sections() -> dict[str, str]:
    out: dict[str, str] = {}
    for field in dataclasses.fields(AttackConfig):
        kind = {"objective": Objective, "solver": Solver, "rules": Rules}.get(field.name)
        names = [f.name for f in dataclasses.fields(kind)] if kind else [field.name]
        for name in names:
            assert name not in out, f"attack setting {name!r} is in two sections"
            out[name] = field.name if kind else ""
    return out


FIELD_SECTIONS = _field_sections()

# ----------------------------------------------------------------------------------------------------------
# Presets: named starting points, as flax examples' get_config().

# Inverting Gradients' TV weight on [0, 1] pixels. Measured on CIFAR-10 train 100-102 (not the benchmark's images),
# untrained ResNet-20, 4,800 iterations, median PSNR: 5e-4 12.2, 1.5e-2 16.8, 5e-2 15.7, 1.5e-1 17.1, 0.5 14.6 dB
# (means 12.2, 17.1, 16.7, 16.7, 15.1): flat from 1.5e-2 to 1.5e-1; the middle of it.
IG_TV_WEIGHT = 5e-2

PRESETS: dict[str, AttackConfig] = {
    # The paper: joint labels, free pixels, squared L2 distance, L-BFGS (measured settings: docs/performance.md).
    "dlg": AttackConfig(),
    # iDLG: the label read off the last layer's gradient (exact for one image), the images optimised alone.
    "idlg": AttackConfig(labels="idlg"),
    # Batches of 2-8 images (docs/batches.md): analytic labels, sigmoid pixels, colour TV 1e-5 in 4 stages.
    "batch": AttackConfig(labels="idlg", dummy="sigmoid", objective=Objective(tv_weight=1e-5, tv_stages=4),
                          rules=Rules(steps=600, retries=3, plateau_reduction=0.0, float64_retry=False)),
    # The reference procedure: torch.optim.LBFGS's semantics, one attempt, every step run (no early stop).
    "reference": AttackConfig(solver=Solver(optimizer="torch-lbfgs"), rules=Rules(retries=0, tolerance=0.0)),
    # Inverting Gradients (Geiping et al., 2020; inversefed's defaults): one cosine distance over all layers,
    # anisotropic TV at a constant weight, Adam lr 0.1 on the gradient's sign, x0.1 at 3/8, 5/8, 7/8 of 4,800
    # iterations, pixels boxed to [0, 1], iDLG labels, one restart run to the end (no early stop, no stall probe).
    # inversefed's TV weight 1e-1 is on images normalised by the CIFAR std (~0.2): 0.5 on our [0, 1] pixels;
    # ours is IG_TV_WEIGHT (measured).
    "inverting-gradients": AttackConfig(
        labels="idlg", dummy="box", objective=Objective(distance="cosine", tv_weight=IG_TV_WEIGHT, tv_stages=0,
                                                        prior="tv-anisotropic"),
        solver=Solver(optimizer="adam", learning_rate=0.1, schedule="step", signed=True),
        rules=Rules(steps=240, tolerance=0.0, retries=0, probe_steps=0, plateau_reduction=0.0)),
}


def get_config(name: str = "dlg") -> AttackConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}: choose from {', '.join(PRESETS)}") from None
